"""Config: one schema for YAML, --set overrides and the API; errors name the key path."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from textclass.config import (
    SMALL_ARCHS,
    Config,
    FastTextConfig,
    SmallModelConfig,
    build_config,
    load_config,
    save_config,
    upgrade_run_config,
)
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
    for p in (p for p in configs if not p.name.endswith("_space.yaml")):  # tune's search spaces: test_tune.py
        # a distillation student's config may leave the data to its teacher (`distill_config` fills it in)
        load_config(p, ["data.dataset=bbc-news"] if "distill:" in p.read_text() else [])


# The small family: each arch has its own keys (model.arch picks the class).

SMALL = {"family": "small"}
OWN_KEYS = {
    "fasttext": {"word_ngrams": 3, "minn": 2, "maxn": 5, "buckets": 1000},
    "textcnn": {"filter_sizes": [3, 5], "num_filters": 32, "dropout": 0.2},
    "textrnn": {"hidden_size": 64, "num_layers": 2, "rnn_type": "gru", "rnn_pooling": "attention", "dropout": 0.2},
    "textrcnn": {"hidden_size": 64, "num_layers": 2, "rnn_type": "gru", "dropout": 0.2},
    "transformer": {
        "hidden_size": 64, "num_layers": 2, "num_heads": 8, "positional_encoding": "learned", "dropout": 0.2
    },
}
FOREIGN_KEY = {"fasttext": "dropout", "textcnn": "word_ngrams", "textrnn": "num_heads", "textrcnn": "rnn_pooling",
               "transformer": "filter_sizes"}


@pytest.mark.parametrize("arch", list(OWN_KEYS))
def test_each_arch_takes_its_own_keys(arch: str) -> None:
    cfg = build_config({**BASE, "model": {**SMALL, "arch": arch, "embedding_dim": 16, **OWN_KEYS[arch]}})
    assert isinstance(cfg.model, SmallModelConfig) and isinstance(cfg.model, SMALL_ARCHS[arch])
    assert cfg.model.arch == arch and cfg.model.embedding_dim == 16
    assert {k: getattr(cfg.model, k) for k in OWN_KEYS[arch]} == OWN_KEYS[arch]
    assert set(cfg.model.model_dump()) == set(SMALL_ARCHS[arch].model_fields)  # config.yaml lists only its keys
    assert build_config(cfg.model_dump(mode="json")) == cfg


@pytest.mark.parametrize("arch", list(OWN_KEYS))
def test_a_key_of_another_arch_is_refused_with_its_path_and_the_archs_keys(arch: str) -> None:
    key = FOREIGN_KEY[arch]
    with pytest.raises(UserError) as exc:
        build_config({**BASE, "model": {**SMALL, "arch": arch, key: 1}})
    msg = str(exc.value)
    assert f"bad config key `model.{key}`: unknown key; allowed here: " in msg and "\n" not in msg
    allowed = msg.split("allowed here: ")[1].split(" (")[0].split(", ")
    assert set(allowed) == set(SMALL_ARCHS[arch].model_fields) and key not in allowed
    assert f"arch {arch}" in msg


def test_the_issues_example_textcnn_with_word_ngrams() -> None:
    with pytest.raises(UserError, match=r"`model\.word_ngrams`: unknown key; allowed here: .*filter_sizes"):
        build_config({**BASE, "model": {"family": "small", "arch": "textcnn", "word_ngrams": 3}})
    with pytest.raises(UserError, match=r"`model\.word_ngrams`"):  # the same through --set
        build_config(BASE, ["model.family=small", "model.arch=textcnn", "model.word_ngrams=3"])


def test_small_section_without_arch_is_fasttext() -> None:
    for cfg in (
        build_config({**BASE, "model": {"family": "small", "word_ngrams": 3}}),
        build_config(BASE, ["model.family=small"]),
        Config(data={"dataset": "bbc-news"}, model={"family": "small"}),
    ):
        assert isinstance(cfg.model, FastTextConfig) and cfg.model.arch == "fasttext"


def test_unknown_arch_and_family_list_the_choices() -> None:
    with pytest.raises(UserError, match=r"`model\.arch`: unknown arch 'cnn'; must be one of 'fasttext', 'textcnn'"):
        build_config({**BASE, "model": {"family": "small", "arch": "cnn"}})
    with pytest.raises(UserError, match=r"`model\.family`: unknown family 'big'; must be one of 'encoder', 'llm', 'small'"):
        build_config({**BASE, "model": {"family": "big"}})
    with pytest.raises(UserError, match=r"`model\.poolin`: unknown key; allowed here: .*pooling"):
        build_config({**BASE, "model": {"poolin": "mean"}})  # the encoder's keys


@pytest.mark.parametrize(
    "model, message",
    [
        ({"arch": "textcnn", "filter_sizes": []}, r"`model\.filter_sizes`: \[\] must be a non-empty list"),
        ({"arch": "textcnn", "filter_sizes": [0, 2]}, r"`model\.filter_sizes`: \[0, 2\] must be a non-empty list"),
        (
            {"arch": "transformer", "hidden_size": 100, "num_heads": 8},
            r"`model\.num_heads`: 8 does not divide model\.hidden_size 100",
        ),
        ({"arch": "fasttext", "minn": 5, "maxn": 3}, r"`model\.minn`: 5 is larger than model\.maxn 3"),
    ],
)
def test_cross_key_checks_fail_at_config_time(model: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        build_config({**BASE, "model": {"family": "small", **model}})


def test_cross_key_checks_accept_valid_combinations() -> None:
    # maxn 0: no char n-grams, whatever minn says
    build_config({**BASE, "model": {"family": "small", "arch": "fasttext", "minn": 3, "maxn": 0}})
    build_config({**BASE, "model": {"family": "small", "arch": "transformer", "hidden_size": 96, "num_heads": 3}})


def test_small_model_config_builds_the_archs_class() -> None:
    assert type(SmallModelConfig()) is FastTextConfig
    for arch, cls in SMALL_ARCHS.items():
        assert type(SmallModelConfig(arch=arch)) is cls and issubclass(cls, SmallModelConfig)
        assert type(SmallModelConfig.model_validate({"arch": arch})) is cls
    assert SmallModelConfig(arch="textcnn", num_filters=8).num_filters == 8
    with pytest.raises(ValidationError):
        SmallModelConfig(arch="textcnn", buckets=10)
    with pytest.raises(ValidationError):
        SmallModelConfig(arch="cnn")


# What textclass wrote into run directories before each arch had its own keys: every small key for every arch.
OLD_SMALL_MODEL = {
    "family": "small", "arch": "textcnn", "tokenizer": "auto", "lowercase": True, "min_freq": 1, "max_vocab": 50000,
    "max_length": 256, "embedding_dim": 128, "pretrained_vectors": None, "dropout": 0.3, "word_ngrams": 2, "minn": 0,
    "maxn": 0, "buckets": 2000000, "filter_sizes": [2, 3, 4], "num_filters": 64, "hidden_size": 128, "num_layers": 1,
    "rnn_type": "lstm", "rnn_pooling": "max", "num_heads": 4, "positional_encoding": "sinusoidal",
}


@pytest.mark.parametrize("arch", list(OWN_KEYS))
def test_old_run_config_with_every_small_key_upgrades_and_loads(arch: str) -> None:
    raw = {**BASE, "model": {**OLD_SMALL_MODEL, "arch": arch}, "training": {"epochs": 1}}
    with pytest.raises(UserError, match="unknown key"):
        build_config(raw)
    upgraded = upgrade_run_config(raw)
    assert raw["model"] == {**OLD_SMALL_MODEL, "arch": arch}  # the input is left as it was
    cfg = build_config(upgraded)
    assert type(cfg.model) is SMALL_ARCHS[arch] and cfg.training.epochs == 1
    added_since = {"multisample_dropout"}  # keys newer than that format: absent, so their defaults apply
    assert set(upgraded["model"]) == set(SMALL_ARCHS[arch].model_fields) - added_since
    if arch == "textcnn":
        assert cfg.model.num_filters == 64  # the arch's own values are kept


def test_upgrade_leaves_other_configs_alone() -> None:
    encoder = {**BASE, "model": {"family": "encoder", "pooling": "mean"}}
    assert upgrade_run_config(encoder) == encoder
    assert upgrade_run_config(BASE) == BASE
    new = {**BASE, "model": {"family": "small", "arch": "textcnn", "num_filters": 8}}
    assert upgrade_run_config(new) == new
    # A key no small arch has is kept, so a damaged file still fails with its path; an unknown arch too.
    typo = upgrade_run_config({**BASE, "model": {"family": "small", "arch": "textcnn", "num_filterz": 8, "buckets": 9}})
    assert typo["model"] == {"family": "small", "arch": "textcnn", "num_filterz": 8}
    with pytest.raises(UserError, match=r"`model\.num_filterz`"):
        build_config(typo)
    bad_arch = {**BASE, "model": {"family": "small", "arch": "cnn", "buckets": 9}}
    assert upgrade_run_config(bad_arch) == bad_arch
    # Without `arch` the section is fastText's, as in build_config.
    assert upgrade_run_config({**BASE, "model": {"family": "small", "dropout": 0.3, "buckets": 9}})["model"] == {
        "family": "small", "buckets": 9}
