"""Config: one schema for YAML, --set overrides and the API; errors name the key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from textclass.config import Config, build_config, load_config, save_config
from textclass.errors import UserError

BASE = {"data": {"dataset": "bbc-news"}}


def test_defaults_fill_every_section() -> None:
    cfg = build_config(BASE)
    assert cfg.model.family == "encoder"
    assert cfg.model.name == "sentence-transformers/all-MiniLM-L6-v2"
    assert cfg.training.epochs == 3.0
    assert cfg.training.batch_size is None and cfg.training.learning_rate is None  # the family's, at train time
    assert cfg.evaluation.threshold == 0.5


def test_overrides_are_typed_by_yaml_rules() -> None:
    cfg = build_config(BASE, ["training.epochs=2", "training.learning_rate=1e-4", "model.pooling=mean", "data.dedup=true"])
    assert cfg.training.epochs == 2.0
    assert cfg.training.learning_rate == pytest.approx(1e-4)
    assert cfg.model.pooling == "mean"
    assert cfg.data.dedup is True


def test_override_switches_family() -> None:
    cfg = build_config(BASE, ["model.family=small", "model.arch=textcnn"])
    assert cfg.model.family == "small" and cfg.model.arch == "textcnn"


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["training.epochz=2"], "training.epochz"),
        (["training.batch_size=0"], "training.batch_size"),
        (["model.pooling=max"], "model.pooling"),
        (["data.valid_ratio=0.9"], "data.valid_ratio"),
        (["training.best_metric=auc"], "training.best_metric"),
        (["training.final_model=first"], "training.final_model"),
        (["training.final_model=last", "training.early_stopping_patience=2"], "use final_model=best"),
    ],
)
def test_bad_keys_and_values_name_the_key(overrides: list[str], needle: str) -> None:
    with pytest.raises(UserError) as exc:
        build_config(BASE, overrides)
    assert needle in str(exc.value)
    assert "\n" not in str(exc.value)


def test_unknown_key_lists_allowed_keys() -> None:
    with pytest.raises(UserError, match="allowed here: .*epochs"):
        build_config(BASE, ["training.epochz=2"])


def test_set_without_section_or_equals() -> None:
    with pytest.raises(UserError, match="key=value"):
        build_config(BASE, ["training.epochs"])
    with pytest.raises(UserError, match="start with a section"):
        build_config(BASE, ["epochs=2"])


def test_data_source_required() -> None:
    with pytest.raises(UserError, match="data.train"):
        build_config({})


def test_yaml_file_roundtrip(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  dataset: bbc-news\ntraining:\n  epochs: 1\n", encoding="utf-8")
    cfg = load_config(p, ["training.batch_size=4"])
    out = tmp_path / "resolved.yaml"
    save_config(cfg, out)
    again = load_config(out)
    assert again == cfg and isinstance(again, Config)


def test_yaml_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  dataset: [unclosed\n", encoding="utf-8")
    with pytest.raises(UserError, match="bad.yaml line"):
        load_config(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("data:\n  dataset: bbc-news\ntrainig:\n  epochs: 1\n", encoding="utf-8")
    with pytest.raises(UserError, match="typo.yaml: bad config key `trainig`"):
        load_config(typo)


def test_all_example_configs_validate() -> None:
    configs = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))
    assert len(configs) >= 5
    for p in configs:
        load_config(p)
