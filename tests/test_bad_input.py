"""Every user mistake, command by command: exit code 2, one `error:` line naming the file/key and the fix,
no traceback, and nothing written or changed on disk."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import pandas as pd
import pytest
import yaml

from conftest import make_texts, tiny_config
from test_cli import run


def _snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file under `roots` with its size and modification time."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")) if root.exists() else []:
            if p.is_file():
                st = p.stat()
                out[str(p)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def world(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A finished tiny run, a copy with damaged weights, and data files (good and bad) in one folder."""
    from textclass import train

    root = tmp_path_factory.mktemp("bad-input")
    files = {}
    for split, (n, seed) in {"train": (60, 1), "test": (15, 2)}.items():
        files[split] = root / f"{split}.csv"
        make_texts(n, seed).to_csv(files[split], index=False)
    run_dir = train(tiny_config(tiny_bert, files, root / "run", epochs=1)).run_dir
    damaged = root / "damaged"
    shutil.copytree(run_dir, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    model_copy = root / "model-damaged"
    shutil.copytree(tiny_bert, model_copy)
    (model_copy / "model.safetensors").write_bytes(b"")
    unknown = make_texts(8, 3)
    unknown.loc[0, "label"] = "weather"
    unknown.to_csv(root / "unknown_label.csv", index=False)
    (root / "broken.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": \n', encoding="utf-8")
    (root / "latin1.csv").write_bytes("text,label\ncaf\xe9 ole,food\n".encode("latin-1"))
    (root / "empty.csv").write_bytes(b"")
    make_texts(20).to_csv(root / "semicolon.csv", index=False, sep=";")
    pd.DataFrame({"text": ["a b c"] * 10, "label": ["x"] * 10}).to_csv(root / "one_class.csv", index=False)
    (root / "bad.yaml").write_text("data:\n  train: [unclosed\n", encoding="utf-8")
    (root / "unrelated").mkdir()
    (root / "unrelated" / "notes.txt").write_text("mine", encoding="utf-8")
    (root / "a_file.txt").write_text("mine", encoding="utf-8")
    (root / "link.csv").symlink_to(files["test"])
    (root / "sub").mkdir()
    (root / "dir.csv").mkdir()
    (root / "space.yaml").write_text("training.learning_rate: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n")
    (root / "space_bad_key.yaml").write_text("training.lr: {type: float, low: 1.0e-4, high: 1.0e-2}\n")
    return {"root": root, "run": run_dir, "damaged": damaged, "model": tiny_bert, "model_damaged": model_copy, **files}


def _train(w: dict[str, Path], *extra: str) -> list[str]:
    return ["train", "--set", f"data.train={w['train']}", "--set", f"model.name={w['model']}", "--set", "model.max_length=16", *extra]


def _tune(w: dict[str, Path], *extra: str, space: str = "space.yaml", output: str = "tuned") -> list:
    model = ["--set", f"model.name={w['model']}", "--set", "model.max_length=16"]
    return ["tune", "--set", f"data.train={w['train']}", *model, "--space", w["root"] / space, "-o", w["root"] / output, *extra]


# (case id, arguments built from the world, words the one error line must contain)
Case = tuple[str, Callable[[dict[str, Path]], list], tuple[str, ...]]
CASES: list[Case] = [
    # -- usage errors (typer) ------------------------------------------------------------------------
    ("unknown option", lambda w: ["train", "--epochs", "3"], ("No such option: --epochs", "textclass train --help")),
    ("misspelt command", lambda w: ["trian"], ("No such command 'trian'",)),
    ("missing --model", lambda w: ["predict", "-i"], ("--model",)),
    ("port out of range", lambda w: ["serve", "--model", w["run"], "--port", "99999"], ("--port", "65535")),
    ("threads 0", lambda w: ["info", "--model", w["run"], "--threads", "0"], ("--threads",)),
    ("top-k not a number", lambda w: ["predict", "--model", w["run"], "-i", "--top-k", "abc"], ("--top-k", "integer")),
    ("top-k 0", lambda w: ["predict", "--model", w["run"], "--input", w["test"], "--output", w["root"] / "o.csv", "--top-k", "0"], ("--top-k",)),
    ("batch size 0", lambda w: ["evaluate", "--model", w["run"], "--data", w["test"], "--batch-size", "0"], ("--batch-size",)),
    ("batch size -1", lambda w: ["predict", "--model", w["run"], "--input", w["test"], "--output", w["root"] / "o.csv", "--batch-size", "-1"], ("--batch-size",)),
    ("threshold above 1", lambda w: ["evaluate", "--model", w["run"], "--data", w["test"], "--threshold", "1.5"], ("--threshold",)),
    ("export samples 0", lambda w: ["export", "--model", w["run"], "--samples", "0"], ("--samples",)),
    ("serve max texts 0", lambda w: ["serve", "--model", w["run"], "--max-texts", "0"], ("--max-texts",)),
    ("data export without dir", lambda w: ["data", "export", "bbc-news"], ("Missing argument 'directory'",)),
    # -- train: data -----------------------------------------------------------------------------------
    ("missing train file", lambda w: _train({**w, "train": w["root"] / "nope.csv"}), ("nope.csv", "file not found")),
    ("wrong text column", lambda w: _train(w, "--set", "data.text_column=body"), ("no column 'body'", "columns present")),
    ("unknown label in valid", lambda w: _train(w, "--set", f"data.valid={w['root'] / 'unknown_label.csv'}"), ("'weather'", "not in the training data")),
    ("broken JSON line", lambda w: _train({**w, "train": w["root"] / "broken.jsonl"}), ("broken.jsonl line 2", "broken JSON")),
    ("wrong encoding", lambda w: _train({**w, "train": w["root"] / "latin1.csv"}), ("latin1.csv line 2", "data.encoding")),
    ("empty file", lambda w: _train({**w, "train": w["root"] / "empty.csv"}), ("empty.csv", "empty")),
    ("semicolon CSV", lambda w: _train({**w, "train": w["root"] / "semicolon.csv"}), ("semicolon.csv: no column", "';'-separated")),
    ("one class", lambda w: _train({**w, "train": w["root"] / "one_class.csv"}), ("one_class.csv", "at least two")),
    # -- train: config -----------------------------------------------------------------------------------
    ("epochs inf", lambda w: _train(w, "--set", "training.epochs=inf"), ("training.epochs", "finite")),
    ("batch size 0 in config", lambda w: _train(w, "--set", "training.batch_size=0"), ("training.batch_size",)),
    ("unknown config key", lambda w: _train(w, "--set", "training.epoch=2"), ("training.epoch", "allowed here")),
    ("unknown family", lambda w: _train(w, "--set", "model.family=gpt"), ("model.family", "'gpt'", "'encoder'")),
    ("--set without =", lambda w: _train(w, "--set", "training.epochs"), ("key=value",)),
    ("config not found", lambda w: ["train", "--config", w["root"] / "nope.yaml"], ("nope.yaml", "not found")),
    ("config not YAML", lambda w: ["train", "--config", w["root"] / "bad.yaml"], ("bad.yaml line", "YAML")),
    ("metric of another task", lambda w: _train(w, "--set", "training.best_metric=hamming_loss"), ("training.best_metric", "single-label")),
    ("unknown adversarial method", lambda w: _train(w, "--set", "training.adversarial=fgsm"), ("training.adversarial", "'fgm'")),
    ("swa starts after training", lambda w: _train(w, "--set", "training.epochs=2", "--set", "training.swa={start: 3}"), ("training.swa.start", "lower it")),
    ("ema decay 1", lambda w: _train(w, "--set", "training.ema_decay=1"), ("training.ema_decay",)),
    ("zlpr single-label", lambda w: _train(w, "--set", "training.loss=zlpr"), ("zlpr", "multi-label")),
    ("multisample without dropout", lambda w: _train(w, "--set", "model.dropout=0", "--set", "model.multisample_dropout=4"), ("model.multisample_dropout", "dropout")),
    ("one fold", lambda w: _train(w, "--set", "training.kfold=1"), ("training.kfold", "at least 2")),
    ("more folds than the rarest class", lambda w: _train(w, "--set", "training.kfold=25"), ("training.kfold", "label 'food' has 20", "lower training.kfold")),
    # -- train: model and output -------------------------------------------------------------------------
    ("model folder is not a model", lambda w: _train({**w, "model": w["root"] / "sub"}), ("model.name", "sub")),
    ("model weights 0 bytes", lambda w: _train({**w, "model": w["model_damaged"]}), ("model.name", "model-damaged")),
    ("output is a file", lambda w: _train(w, "--output", w["root"] / "a_file.txt"), ("a_file.txt", "is a file")),
    ("output holds other files", lambda w: _train(w, "--output", w["root"] / "unrelated"), ("unrelated", "not a textclass run")),
    ("output holds a finished run", lambda w: _train(w, "--output", w["run"]), ("already holds a finished run", "--overwrite")),
    ("resume without checkpoints", lambda w: ["train", "--output", w["root"] / "unrelated", "--resume"], ("no unfinished run",)),
    # -- evaluate / predict / info / serve on run directories ------------------------------------------------
    ("evaluate missing data", lambda w: ["evaluate", "--model", w["run"], "--data", w["root"] / "nope.csv"], ("nope.csv", "not found")),
    ("evaluate unknown label", lambda w: ["evaluate", "--model", w["run"], "--data", w["root"] / "unknown_label.csv"], ("'weather'",)),
    ("evaluate not a run dir", lambda w: ["evaluate", "--model", w["root"] / "unrelated", "--data", w["test"]], ("not a textclass run directory",)),
    ("evaluate damaged weights", lambda w: ["evaluate", "--model", w["damaged"], "--data", w["test"]], ("damaged", "missing or damaged")),
    ("evaluate unknown backend", lambda w: ["evaluate", "--model", w["run"], "--data", w["test"], "--backend", "tpu"], ("backend", "tpu")),
    ("predict output is input", lambda w: ["predict", "--model", w["run"], "--input", w["test"], "--output", w["test"]], ("is the input file",)),
    ("predict output via symlink", lambda w: ["predict", "--model", w["run"], "--input", w["root"] / "link.csv", "--output", w["test"]], ("is the input file",)),
    ("predict output via ..", lambda w: ["predict", "--model", w["run"], "--input", w["test"], "--output", w["root"] / "sub" / ".." / "test.csv"], ("is the input file",)),
    ("predict output a folder", lambda w: ["predict", "--model", w["run"], "--input", w["test"], "--output", w["root"] / "dir.csv"], ("dir.csv: is a folder",)),
    ("predict unknown format", lambda w: ["predict", "--model", w["run"], "--input", w["test"], "--output", w["root"] / "o.xlsx"], (".csv or .jsonl",)),
    ("predict missing output", lambda w: ["predict", "--model", w["run"], "--input", w["test"]], ("--output",)),
    ("predict -i and --input", lambda w: ["predict", "--model", w["run"], "--input", w["test"], "-i"], ("either --input",)),
    ("predict damaged weights", lambda w: ["predict", "--model", w["damaged"], "--input", w["test"], "--output", w["root"] / "o.csv"], ("missing or damaged",)),
    ("info damaged weights", lambda w: ["info", "--model", w["damaged"]], ("missing or damaged",)),
    ("info on a file", lambda w: ["info", "--model", w["test"]], ("is a file",)),
    ("serve damaged weights", lambda w: ["serve", "--model", w["damaged"], "--port", "0"], ("missing or damaged",)),
    ("serve not a run dir", lambda w: ["serve", "--model", w["root"] / "nope", "--port", "0"], ("no such run directory",)),
    ("serve unknown backend", lambda w: ["serve", "--model", w["run"], "--backend", "tpu", "--port", "0"], ("--backend tpu",)),
    # -- export ------------------------------------------------------------------------------------------
    ("export over a data file", lambda w: ["export", "--model", w["run"], "--output", w["test"]], ("test.csv",)),
    ("export over the run dir", lambda w: ["export", "--model", w["run"], "--output", w["run"]], ("run",)),
    ("export into other files", lambda w: ["export", "--model", w["run"], "--output", w["root"] / "unrelated"], ("unrelated",)),
    ("export damaged weights", lambda w: ["export", "--model", w["damaged"], "--output", w["root"] / "onnx-out"], ("missing or damaged",)),
    # -- distill ----------------------------------------------------------------------------------------------
    ("distill without --teacher", lambda w: ["distill", "--output", w["root"] / "s"], ("--teacher",)),
    ("distill teacher not a run", lambda w: ["distill", "-t", w["root"] / "unrelated", "-o", w["root"] / "s"], ("not a textclass run",)),
    ("distill into the teacher", lambda w: ["distill", "-t", w["run"], "-o", w["run"], "--overwrite"], ("teacher run", "another --output")),
    ("distill other labels", lambda w: ["distill", "-t", w["run"], "-o", w["root"] / "s", "--set", f"data.train={w['root'] / 'unknown_label.csv'}"], ("other labels",)),
    ("distill unlabeled missing", lambda w: ["distill", "-t", w["run"], "-o", w["root"] / "s", "--set", f"data.unlabeled={w['root'] / 'nope.csv'}"], ("data.unlabeled", "nope.csv")),
    ("distill layers past the teacher", lambda w: ["distill", "-t", w["run"], "-o", w["root"] / "s", "--set", "distill.student={from_teacher: true, layers: [0, 5]}"], ("distill.student.layers",)),
    ("distill from_teacher and a model", lambda w: ["distill", "-t", w["run"], "-o", w["root"] / "s", "--set", "distill.student={from_teacher: true, layers: 1}", "--set", "model.dropout=0.2"], ("model", "from_teacher")),
    ("distill alpha above 1", lambda w: ["distill", "-t", w["run"], "-o", w["root"] / "s", "--set", "distill.alpha=1.5"], ("distill.alpha",)),
    ("unlabeled texts in train", lambda w: _train(w, "--set", "data.unlabeled=x.csv"), ("data.unlabeled", "textclass distill")),
    # -- tune ----------------------------------------------------------------------------------------------
    ("tune space not found", lambda w: _tune(w, space="nope.yaml"), ("nope.yaml", "search space file not found")),
    ("tune unknown space key", lambda w: _tune(w, space="space_bad_key.yaml"), ("space_bad_key.yaml", "training.lr", "unknown")),
    ("tune trials 0", lambda w: _tune(w, "--trials", "0"), ("--trials 0",)),
    ("tune with kfold", lambda w: _tune(w, "--set", "training.kfold=3"), ("training.kfold", "one model per trial")),
    ("tune bad pruner", lambda w: _tune(w, "--pruner", "asha"), ("--pruner asha",)),
    ("tune missing train file", lambda w: _tune({**w, "train": w["root"] / "nope.csv"}), ("nope.csv", "file not found")),
    ("tune output holds other files", lambda w: _tune(w, output="unrelated"), ("unrelated", "not a textclass tune folder")),
    ("tune resume without a study", lambda w: _tune(w, "--resume", output="unrelated"), ("--resume but no study.db",)),
    ("tune nproc 0", lambda w: _tune(w, "--nproc", "0"), ("--nproc 0",)),
    # -- data -----------------------------------------------------------------------------------------------
    ("data export unknown set", lambda w: ["data", "export", "no-such-set", w["root"] / "out"], ("no-such-set",)),
]


@pytest.mark.parametrize(("args", "words"), [(c[1], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_mistake_is_one_line_exit_2_and_writes_nothing(world: dict[str, Path], args, words: tuple[str, ...]) -> None:
    before = _snapshot(world["root"])
    proc = run(*args(world))
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for w in words:
        assert w in errors[0], errors[0]
    assert _snapshot(world["root"]) == before  # nothing written, changed or deleted


def test_at_least_forty_cases_cover_every_command() -> None:
    assert len(CASES) >= 40
    commands = {c[1]({k: Path("/x") for k in ("root", "run", "damaged", "model", "model_damaged", "train", "test")})[0] for c in CASES}
    assert {"train", "tune", "evaluate", "predict", "export", "serve", "info", "data"} <= commands
