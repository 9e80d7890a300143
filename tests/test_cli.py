"""The command line: every user mistake is one line on stderr and exit code 2, with nothing half-written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import make_texts, tiny_config

CLI = [sys.executable, "-m", "textclass.cli"]


def run(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    """Run `textclass ARGS` in-process through `cli.main` (the real entry point, minus interpreter start-up)."""
    import contextlib
    import io

    from textclass import cli

    out, err = io.StringIO(), io.StringIO()
    code = 0
    old_argv, old_stdin = sys.argv, sys.stdin
    sys.argv, sys.stdin = ["textclass", *map(str, args)], io.StringIO(input or "")
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv, sys.stdin = old_argv, old_stdin
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def test_entry_point_in_a_real_process(tmp_path: Path) -> None:
    """One real subprocess: the console entry point prints one error line and exits 2."""
    proc = subprocess.run([*CLI, "predict", "--model", str(tmp_path), "-i"], capture_output=True, text=True, timeout=120)
    assert_user_error(proc, "not a textclass run directory")


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def run_dir(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run trained through the CLI with a YAML config and --set overrides."""
    root = tmp_path_factory.mktemp("cli")
    files = {}
    for split, (n, seed) in {"train": (90, 1), "test": (30, 2)}.items():
        files[split] = root / f"{split}.csv"
        make_texts(n, seed).to_csv(files[split], index=False)
    cfg = tiny_config(tiny_bert, files, root / "run")
    (root / "c.yaml").write_text(yaml.safe_dump(cfg))
    proc = run("train", "--config", root / "c.yaml", "--set", "training.epochs=8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test: accuracy=" in proc.stdout
    saved = yaml.safe_load((root / "run" / "config.yaml").read_text())
    assert saved["training"]["epochs"] == 8.0  # the override is in the resolved config
    return root / "run"


def test_predict_csv_and_jsonl(run_dir: Path, tmp_path: Path) -> None:
    inp = tmp_path / "in.csv"
    pd.DataFrame({"text": ["goal match team", "chip software code", "bread soup oven"]}).to_csv(inp, index=False)
    proc = run("predict", "--model", run_dir, "--input", inp, "--output", tmp_path / "out.csv")
    assert proc.returncode == 0, proc.stderr
    out = pd.read_csv(tmp_path / "out.csv")
    assert out["label"].tolist() == ["sport", "tech", "food"]
    assert {"score", "score_food", "score_sport", "score_tech"} <= set(out.columns)
    proc = run("predict", "--model", run_dir, "--input", inp, "--output", tmp_path / "out.jsonl", "--top-k", "2")
    rows = [json.loads(l) for l in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["label"] for r in rows] == ["sport", "tech", "food"] and len(rows[0]["scores"]) == 2


def test_interactive(run_dir: Path) -> None:
    proc = run("predict", "--model", run_dir, "-i", input="goal match team\n\n")
    assert proc.returncode == 0, proc.stderr
    assert "* sport" in proc.stdout


def test_evaluate_and_info(run_dir: Path, tmp_path: Path) -> None:
    test = run_dir.parent / "test.csv"
    proc = run("evaluate", "--model", run_dir, "--data", test, "--output", tmp_path / "rep")
    assert proc.returncode == 0, proc.stderr
    assert "macro" in proc.stdout.lower() and (tmp_path / "rep" / "confusion_matrix.png").is_file()
    proc = run("info", "--model", run_dir)
    assert proc.returncode == 0, proc.stderr
    for key in ("parameters", "trainable parameters", "size on disk", "latency batch 1", "latency batch 32"):
        assert key in proc.stdout


# ---- bad input ------------------------------------------------------------------------------------


def test_unknown_config_key(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("data:\n  train: x.csv\ntraining:\n  epoch: 2\n")
    assert_user_error(run("train", "--config", tmp_path / "c.yaml"), "training.epoch", "allowed here")


def test_bad_override_value(tmp_path: Path) -> None:
    assert_user_error(run("train", "--set", "data.dataset=bbc-news", "--set", "training.batch_size=-1"), "training.batch_size")


def test_missing_train_file_leaves_no_run_dir(tmp_path: Path) -> None:
    proc = run("train", "--set", f"data.train={tmp_path / 'nope.csv'}", "--output", tmp_path / "run")
    assert_user_error(proc, "nope.csv: file not found")
    assert not (tmp_path / "run").exists()


def test_wrong_column_leaves_no_run_dir(tmp_path: Path, tiny_bert: Path) -> None:
    p = tmp_path / "d.csv"
    make_texts(20).rename(columns={"label": "category"}).to_csv(p, index=False)
    proc = run("train", "--set", f"data.train={p}", "--set", f"model.name={tiny_bert}", "--output", tmp_path / "run")
    assert_user_error(proc, "no column 'label'", "columns present: text, category")
    assert not (tmp_path / "run").exists()


def test_model_path_that_is_not_a_model(tmp_path: Path) -> None:
    p = tmp_path / "d.csv"
    make_texts(20).to_csv(p, index=False)
    (tmp_path / "notamodel").mkdir()
    proc = run("train", "--set", f"data.train={p}", "--set", f"model.name={tmp_path / 'notamodel'}", "--output", tmp_path / "run")
    assert_user_error(proc, "model.name", "notamodel")
    assert not (tmp_path / "run").exists()


def test_not_a_run_directory(tmp_path: Path) -> None:
    assert_user_error(run("predict", "--model", tmp_path, "-i"), "not a textclass run directory")
    assert_user_error(run("info", "--model", tmp_path / "missing"), "no such run directory")


def test_predict_bad_output_and_input(run_dir: Path, tmp_path: Path) -> None:
    inp = tmp_path / "in.csv"
    pd.DataFrame({"sentence": ["x"]}).to_csv(inp, index=False)
    assert_user_error(run("predict", "--model", run_dir, "--input", inp, "--output", tmp_path / "o.csv"), "no column 'text'", "sentence")
    assert not (tmp_path / "o.csv").exists()
    assert_user_error(run("predict", "--model", run_dir, "--input", inp, "--output", tmp_path / "o.xlsx"), ".csv or .jsonl")
    broken = tmp_path / "b.jsonl"
    broken.write_text('{"text": "ok"}\n{"text": \n')
    assert_user_error(run("predict", "--model", run_dir, "--input", broken, "--output", tmp_path / "o.csv"), "b.jsonl line 2")


def test_evaluate_unknown_label(run_dir: Path, tmp_path: Path) -> None:
    df = make_texts(6)
    df.loc[0, "label"] = "weather"
    df.to_csv(tmp_path / "e.csv", index=False)
    assert_user_error(run("evaluate", "--model", run_dir, "--data", tmp_path / "e.csv"), "'weather'", "label set")


def test_data_list() -> None:
    proc = run("data", "list")
    assert proc.returncode == 0, proc.stderr
    assert "bbc-news" in proc.stdout and "chinese-reviews" in proc.stdout
    assert_user_error(run("data", "export", "no-such-set", "/tmp/x"), "no-such-set")


def test_resume_from_the_command_line_without_config(tiny_bert: Path, toy_files: dict, tmp_path: Path) -> None:
    """An interrupted run (checkpoints, no config.yaml yet) finishes with `train --output DIR --resume`."""
    from textclass import train

    run_dir = tmp_path / "run"
    train(tiny_config(tiny_bert, toy_files, run_dir, epochs=2, keep_checkpoints=True))
    for name in ("config.yaml", "labels.json"):  # what an interrupted run lacks
        (run_dir / name).unlink()
    assert_user_error(run("predict", "--model", run_dir, "-i"), "not a textclass run directory", "--resume")
    proc = run("train", "--output", run_dir, "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (run_dir / "config.yaml").is_file()
    assert_user_error(run("train", "--output", tmp_path / "empty", "--resume"), "no unfinished run to resume")
