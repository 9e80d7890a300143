"""Weight averaging. EMA: decay 0 equals plain training; the weights saved (and reloaded) are the EMA of the
weights after each step, the same weights validation judged (last or best checkpoint); --resume continues
the average exactly. SWA: the saved weights are the mean of the collected snapshots, which differ; its
learning rate applies from its start. Bad combinations are refused with the key."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import logged_losses, no_dropout_copy, tiny_config

from textclass import Classifier, train
from textclass.errors import UserError
from textclass.training import averaging

PROBE = ["goal team chip", "bread soup coach", "the new code", "stadium oven data win"]


def _cfg(bert: Path, files: dict[str, Path], out: Path, **training: Any) -> dict:
    cfg = tiny_config(bert, files, out, logging_steps=1, precision="fp32", learning_rate=2e-3, **training)
    cfg["model"]["dropout"] = 0.0
    return cfg


def _recorded(monkeypatch: pytest.MonkeyPatch, cls: type) -> list[dict[str, torch.Tensor]]:
    """Every set of weights the average takes in, recorded as it is taken."""
    seen: list[dict[str, torch.Tensor]] = []
    original = cls.update

    def update(self: Any) -> None:
        seen.append({n: p.detach().clone() for n, p in self.params.items()})
        original(self)

    monkeypatch.setattr(cls, "update", update)
    return seen


def _saved_weights(run_dir: Path, names: set[str]) -> dict[str, torch.Tensor]:
    from textclass.rundir import load_model

    net = load_model(run_dir).network
    return {n: p.detach() for n, p in net.named_parameters() if n in names}


def _valid_loss(run_dir: Path, valid: Path) -> float:
    import pandas as pd

    clf = Classifier.load(run_dir)
    df = pd.read_csv(valid)
    probs = clf.predict_proba(df["text"].tolist())
    index = [clf.labels.index(y) for y in df["label"]]
    return float(-np.log(probs[np.arange(len(df)), index]).mean())


def test_ema_decay_zero_equals_plain_training(tiny_bert: Path, toy_files: dict[str, Path], tmp_path: Path) -> None:
    bert = no_dropout_copy(tiny_bert, tmp_path / "bert")
    plain = train(_cfg(bert, toy_files, tmp_path / "plain", max_steps=6, eval_steps=3))
    ema = train(_cfg(bert, toy_files, tmp_path / "ema", max_steps=6, eval_steps=3, ema_decay=0.0))
    assert logged_losses(plain.run_dir) == logged_losses(ema.run_dir)
    np.testing.assert_array_equal(
        Classifier.load(plain.run_dir).predict_proba(PROBE), Classifier.load(ema.run_dir).predict_proba(PROBE)
    )
    assert plain.metrics["valid"] == ema.metrics["valid"]


def test_ema_weights_are_validated_saved_and_reloaded(
    tiny_bert: Path, toy_files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bert = no_dropout_copy(tiny_bert, tmp_path / "bert")
    seen = _recorded(monkeypatch, averaging.EMA)
    decay = 0.8
    run = train(
        _cfg(
            bert,
            toy_files,
            tmp_path / "ema",
            max_steps=8,
            eval_steps=4,
            ema_decay=decay,
            final_model="last",
            keep_checkpoints=True,
        )
    )
    assert len(seen) == 8  # one update per optimizer step
    want = dict(seen[0])
    for count, weights in enumerate(seen[1:], start=1):
        d = min(decay, (1 + count) / (10 + count))  # the warm-up: 0.18, 0.25, ... then 0.8 from the 26th update
        want = {n: d * want[n] + (1 - d) * weights[n] for n in want}
    saved = _saved_weights(run.run_dir, set(want))
    assert set(saved) == set(want)
    for n in want:
        torch.testing.assert_close(saved[n], want[n], rtol=1e-5, atol=1e-6, msg=n)
    raw = seen[-1]  # the weights training ended with are not what the run keeps
    assert any(not torch.allclose(saved[n], raw[n]) for n in want)
    # Validation at the last step judged these weights: its loss is the reloaded model's loss on valid.
    log = json.loads((run.run_dir / "training_log.json").read_text())
    last_eval = [h for h in log if "eval_loss" in h][-1]
    assert last_eval["step"] == 8
    assert last_eval["eval_loss"] == pytest.approx(_valid_loss(run.run_dir, toy_files["valid"]), rel=1e-4)


def test_ema_with_best_checkpoint_keeps_that_checkpoints_average(
    tiny_bert: Path, toy_files: dict[str, Path], tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    bert = no_dropout_copy(tiny_bert, tmp_path / "bert")
    cfg = _cfg(bert, toy_files, tmp_path / "ema", max_steps=9, eval_steps=3, ema_decay=0.7, final_model="best")
    cfg["training"].update(best_metric="loss", keep_checkpoints=True, save_total_limit=5)
    run = train(cfg)
    best = Path(run.metrics["train"]["best_checkpoint"])
    stored = load_file(str(best / averaging.AVERAGE_FILE))
    saved = _saved_weights(run.run_dir, set(stored))
    for n in stored:
        torch.testing.assert_close(saved[n], stored[n], rtol=0, atol=0, msg=n)
    log = json.loads((run.run_dir / "training_log.json").read_text())
    best_eval = min(h["eval_loss"] for h in log if "eval_loss" in h)
    assert best_eval == pytest.approx(_valid_loss(run.run_dir, toy_files["valid"]), rel=1e-4)


def test_resume_continues_the_average_exactly(tiny_bert: Path, toy_files: dict[str, Path], tmp_path: Path) -> None:
    bert = no_dropout_copy(tiny_bert, tmp_path / "bert")
    for extra in ({"ema_decay": 0.8}, {"swa": {"start": 0.3, "every_steps": 2}}):
        name = next(iter(extra))
        cfg = _cfg(
            bert,
            toy_files,
            tmp_path / f"full-{name}",
            max_steps=8,
            eval_steps=4,
            keep_checkpoints=True,
            final_model="last",
            **extra,
        )
        full = train(cfg)
        out = tmp_path / f"resumed-{name}"
        shutil.copytree(full.run_dir / "checkpoints", out / "checkpoints")
        shutil.rmtree(out / "checkpoints" / "checkpoint-8")
        assert (out / "checkpoints" / "checkpoint-4" / averaging.AVERAGE_FILE).is_file()
        train({**cfg, "training": {**cfg["training"], "output_dir": str(out)}}, resume=True)
        np.testing.assert_array_equal(
            Classifier.load(full.run_dir).predict_proba(PROBE), Classifier.load(out).predict_proba(PROBE)
        )


def test_swa_keeps_the_mean_of_distinct_snapshots(
    tiny_bert: Path, toy_files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bert = no_dropout_copy(tiny_bert, tmp_path / "bert")
    seen = _recorded(monkeypatch, averaging.SWA)
    # 4 epochs of 8 steps; collecting from epoch 2 at each epoch's end: after epochs 2, 3 and 4.
    run = train(_cfg(bert, toy_files, tmp_path / "swa", epochs=4, swa={"start": 2, "lr": 5e-4}))
    assert len(seen) == 3
    names = set(seen[0])
    for a, b in [(0, 1), (1, 2)]:
        assert any(not torch.equal(seen[a][n], seen[b][n]) for n in names)  # the snapshots differ
    saved = _saved_weights(run.run_dir, names)
    for n in names:
        torch.testing.assert_close(saved[n], sum(s[n] for s in seen) / 3, rtol=1e-5, atol=1e-6, msg=n)
    log = json.loads((run.run_dir / "training_log.json").read_text())
    rates = {h["step"]: h["learning_rate"] for h in log if "learning_rate" in h}
    assert all(rate == pytest.approx(5e-4) for step, rate in rates.items() if step > 16)
    assert rates[16] > 1e-3  # the linear schedule until SWA starts
    assert run.metrics["train"]["final_model"] == "last"


def test_swa_every_n_steps_from_a_fraction(
    tiny_bert: Path, toy_files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bert = no_dropout_copy(tiny_bert, tmp_path / "bert")
    steps: list[int] = []
    original = averaging.AveragingCallback._collect

    def collect(self: Any, state: Any) -> None:
        if state.global_step >= self.start_step:
            steps.append(state.global_step)
        original(self, state)

    monkeypatch.setattr(averaging.AveragingCallback, "_collect", collect)
    train(_cfg(bert, toy_files, tmp_path / "swa", max_steps=12, swa={"start": 0.5, "every_steps": 2}))
    assert steps == [6, 8, 10, 12]


def test_averaging_unit_formulas() -> None:
    net = torch.nn.Linear(2, 1)
    ema, swa = averaging.EMA(net, 0.9), averaging.SWA(net)
    values = [torch.full_like(net.weight, float(v)) for v in (1.0, 3.0, 8.0)]
    for v in values:
        with torch.no_grad():
            net.weight.copy_(v)
        ema.update()
        swa.update()
    torch.testing.assert_close(swa.shadow["weight"], torch.full_like(net.weight, 4.0))
    d1, d2 = 2 / 11, 3 / 12  # warm-up: min(0.9, (1 + n) / (10 + n)) at updates 1 and 2
    torch.testing.assert_close(ema.shadow["weight"], torch.full_like(net.weight, d2 * (d1 * 1 + (1 - d1) * 3) + (1 - d2) * 8))
    assert ema.decay_at(1000) == 0.9
    with ema.swapped_in():
        torch.testing.assert_close(net.weight.detach(), ema.shadow["weight"])
    assert torch.equal(net.weight.detach(), values[-1])  # the network's own weights are back


@pytest.mark.parametrize(
    ("training", "key"),
    [
        ({"ema_decay": 0.9, "swa": {"start": 0.5}}, "training.swa"),
        ({"swa": {"start": 0.5}, "early_stopping_patience": 2}, "training.swa"),
        ({"swa": {"start": 0.5}, "final_model": "best"}, "training.final_model"),
        ({"swa": {"start": 3}, "epochs": 3}, "training.swa.start"),
        ({"swa": {"start": 0.5, "every": 3}}, "training.swa.every"),
        ({"ema_decay": 1.0}, "training.ema_decay"),
    ],
)
def test_bad_averaging_settings_are_refused(training: dict, key: str) -> None:
    from textclass.config import build_config

    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        build_config({"data": {"train": "x.csv"}, "training": training})
