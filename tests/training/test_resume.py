"""`train --resume`: exact continuation from any checkpoint, half-written checkpoints, changed configs, Ctrl-C."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import tiny_config
from textclass import Classifier, train
from textclass.errors import Interrupted, UserError

PROBE = ["goal team chip", "bread soup coach", "the new code", "stadium oven data win"]


def _losses(run_dir: Path) -> dict[int, float]:
    log = json.loads((run_dir / "training_log.json").read_text())
    return {h["step"]: h["loss"] for h in log if "loss" in h}


def _copy_until(src: Path, dst: Path, step: int) -> None:
    """A run directory as a kill right after checkpoint `step` leaves it: later checkpoints and results gone."""
    shutil.copytree(src / "checkpoints", dst / "checkpoints")
    for ckpt in (dst / "checkpoints").glob("checkpoint-*"):
        if int(ckpt.name.split("-")[1]) > step:
            shutil.rmtree(ckpt)


@pytest.fixture(scope="module", params=[True, False], ids=["length-grouped", "random-batches"])
def uninterrupted(request: pytest.FixtureRequest, tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory):
    """3 epochs of 8 steps, a checkpoint every 5 steps (mid-epoch), all kept."""
    from conftest import make_texts

    root = tmp_path_factory.mktemp("resume")
    files = {}
    for split, (n, seed) in {"train": (120, 10), "valid": (30, 11), "test": (30, 12)}.items():
        files[split] = root / f"{split}.csv"
        make_texts(n, seed).to_csv(files[split], index=False)
    cfg = tiny_config(
        tiny_bert, files, root / "full", epochs=3, eval_steps=5, logging_steps=1, keep_checkpoints=True,
        save_total_limit=10, group_by_length=request.param, learning_rate=1e-3,
    )
    return train(cfg), cfg, root


@pytest.mark.parametrize("step", [5, 10, 20])  # epoch 1, and mid-epoch in epochs 2 and 3
def test_resume_from_any_checkpoint_reproduces_the_run(uninterrupted, step: int) -> None:
    full, cfg, root = uninterrupted
    out = root / f"resumed-{step}"
    _copy_until(full.run_dir, out, step)
    resumed = train({**cfg, "training": {**cfg["training"], "output_dir": str(out)}}, resume=True)
    want, got = _losses(full.run_dir), _losses(out)
    assert max(want) == max(got) == 24
    assert {s: got[s] for s in got if s > step} == {s: want[s] for s in want if s > step}  # the same batches, exactly
    np.testing.assert_array_equal(Classifier.load(full.run_dir).predict_proba(PROBE), Classifier.load(out).predict_proba(PROBE))
    assert resumed.metrics["test"] == full.metrics["test"]


def test_half_written_checkpoint_is_skipped(uninterrupted, caplog: pytest.LogCaptureFixture) -> None:
    """A kill while saving checkpoint 20: no trainer_state.json, a truncated optimizer file. Resume from 15."""
    full, cfg, root = uninterrupted
    out = root / "half-written"
    _copy_until(full.run_dir, out, 20)
    broken = out / "checkpoints" / "checkpoint-20"
    (broken / "trainer_state.json").unlink()
    optimizer = broken / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    with caplog.at_level("WARNING", logger="textclass"):
        train({**cfg, "training": {**cfg["training"], "output_dir": str(out)}}, resume=True)
    assert any("checkpoint-20: incomplete" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(Classifier.load(full.run_dir).predict_proba(PROBE), Classifier.load(out).predict_proba(PROBE))


def test_no_complete_checkpoint_is_one_line(uninterrupted) -> None:
    full, cfg, root = uninterrupted
    out = root / "none-complete"
    _copy_until(full.run_dir, out, 5)
    (out / "checkpoints" / "checkpoint-5" / "trainer_state.json").unlink()
    with pytest.raises(UserError, match="no complete checkpoint"):
        train({**cfg, "training": {**cfg["training"], "output_dir": str(out)}}, resume=True)


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("training.learning_rate", 5e-3, "training.learning_rate (0.001 -> 0.005) cannot change on --resume"),
        ("training.batch_size", 8, "training.batch_size (16 -> 8) cannot change"),
        ("model.max_length", 16, "model.max_length (32 -> 16) cannot change"),
        ("data.train", "OTHER", "data.train"),
        ("training.epochs", 2, "training.epochs (3.0 -> 2.0) can only grow"),
    ],
)
def test_resume_refuses_a_config_the_checkpoints_cannot_continue(uninterrupted, key: str, value, words: str) -> None:
    full, cfg, root = uninterrupted
    out = root / f"changed-{key}"
    _copy_until(full.run_dir, out, 10)
    section, name = key.split(".")
    if value == "OTHER":
        value = str(root / "valid.csv")
    changed = {**cfg, "training": {**cfg["training"], "output_dir": str(out)}}
    changed[section] = {**changed[section], name: value}
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)")):
        train(changed, resume=True)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before  # nothing touched


def test_resume_with_more_epochs_is_allowed_and_recorded(uninterrupted) -> None:
    full, cfg, root = uninterrupted
    out = root / "more-epochs"
    _copy_until(full.run_dir, out, 20)
    result = train({**cfg, "training": {**cfg["training"], "output_dir": str(out), "epochs": 4}}, resume=True)
    assert result.metrics["train"]["global_step"] == 32
    assert result.metrics["train"]["resumed_with_changes"]["training.epochs"] == [3.0, 4.0]
    assert yaml.safe_load((out / "config.yaml").read_text())["training"]["epochs"] == 4.0


def test_resume_of_a_finished_run_says_so(uninterrupted) -> None:
    full, cfg, root = uninterrupted
    out = root / "finished"
    shutil.copytree(full.run_dir, out, ignore=shutil.ignore_patterns("checkpoints"))
    with pytest.raises(UserError, match="this run finished; nothing to resume"):
        train({**cfg, "training": {**cfg["training"], "output_dir": str(out)}}, resume=True)


# ---- Ctrl-C -------------------------------------------------------------------------------------------


def _interrupt_at(monkeypatch: pytest.MonkeyPatch, event: str) -> None:
    """Make the next training raise KeyboardInterrupt at a Trainer event (`on_save`, `on_step_begin`)."""
    from transformers import TrainerCallback

    import textclass.training.run as run_mod

    original = run_mod.build_trainer

    class Stop(TrainerCallback):
        pass

    setattr(Stop, event, lambda self, *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))

    def build(*args, **kwargs):
        trainer = original(*args, **kwargs)
        trainer.add_callback(Stop())
        return trainer

    monkeypatch.setattr(run_mod, "build_trainer", build)


def test_ctrl_c_after_a_checkpoint_keeps_it_and_says_how_to_resume(
    tiny_bert: Path, toy_files: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_cli import run

    _interrupt_at(monkeypatch, "on_save")
    out = tmp_path / "run"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tiny_bert, toy_files, out, epochs=2)))
    proc = run("train", "--config", cfg)
    assert proc.returncode == 130, proc.stderr[-2000:]
    lines = [l for l in proc.stderr.splitlines() if l.startswith("interrupted:")]
    assert len(lines) == 1 and "--resume" in lines[0] and str(out) in lines[0]
    assert "Traceback" not in proc.stderr
    monkeypatch.undo()
    assert run("train", "--output", out, "--resume").returncode == 0
    assert (out / "config.yaml").is_file()


def test_ctrl_c_before_any_checkpoint_removes_the_new_run_dir(
    tiny_bert: Path, toy_files: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _interrupt_at(monkeypatch, "on_step_begin")
    out = tmp_path / "run"
    with pytest.raises(Interrupted, match="nothing was kept"):
        train(tiny_config(tiny_bert, toy_files, out, epochs=2))
    assert not out.exists()


def test_ctrl_c_in_predict_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, uninterrupted) -> None:
    from test_cli import run

    import textclass.inference.predictor as pred

    full, _, root = uninterrupted

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pred.BasePredictor, "predict", stop)
    out = tmp_path / "out.csv"
    proc = run("predict", "--model", full.run_dir, "--input", root / "test.csv", "--output", out)
    assert proc.returncode == 130
    assert "interrupted: no output was written" in proc.stderr and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_sigint_to_a_real_training_process(tiny_bert: Path, toy_files: dict, tmp_path: Path) -> None:
    """A real Ctrl-C (SIGINT) once a checkpoint exists: exit 130, one line, and --resume finishes the run."""
    out = tmp_path / "run"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tiny_bert, toy_files, out, epochs=400, eval_steps=2)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "textclass.cli", "train", "--config", str(cfg)], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, env=env)
    deadline = time.monotonic() + 120
    while not list((out / "checkpoints").glob("checkpoint-*/trainer_state.json")) and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    said = [l for l in err.splitlines() if l.startswith("interrupted:")]
    assert len(said) == 1 and "--resume" in said[0], err[-2000:]
    assert "Traceback" not in err
