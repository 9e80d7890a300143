"""`textclass export --output PATH` never deletes what it did not make: the run directory, a folder around
or inside it, a file, someone's non-empty folder or a read-only folder are refused in one line (exit 2)
before the model is even loaded; a killed export's temp folders are cleaned up by the next one."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from test_cli import run as cli
from test_onnx import _files, _one_line_error, _train
from test_fileio import dead_pid, live_pid  # noqa: F401 - live_pid is a fixture

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("export-dest")
    model = {"family": "small", "arch": "fasttext", "embedding_dim": 8, "buckets": 100, "word_ngrams": 2}
    return _train({"data": {k: str(v) for k, v in _files(folder).items()}, "model": model,
                   "training": {"output_dir": str(folder / "run"), "epochs": 1, "batch_size": 16}})


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones too) with its content."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refusals must come before any slow work: loading the model now fails the test."""
    import textclass.export.onnx as export_mod

    def fail(*args: object) -> None:
        raise AssertionError("the model was loaded before the destination was checked")

    monkeypatch.setattr(export_mod, "load_model", fail)


def test_refused_destinations_are_left_untouched(run_dir: Path, tmp_path: Path, no_loading: None) -> None:
    data = tmp_path / "data.csv"
    data.write_text("text,label\nhello,a\n")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    (tmp_path / "link-to-run").symlink_to(run_dir)
    cases = {
        data: "is a file",
        notes: "not a previous export",
        run_dir: "run directory itself",
        run_dir / ".." / run_dir.name: "run directory itself",
        tmp_path / "link-to-run": "run directory itself",
        run_dir / "..": "contains the run directory",
        run_dir / "eval": "inside the run directory",
        run_dir / "exports": "inside the run directory",  # even a new folder: the run directory is the run's
        run_dir / "onnx" / "x": "inside the run directory",
    }
    before = {p: _snapshot(p) for p in (run_dir.parent, tmp_path)}
    for out, why in cases.items():
        _one_line_error(cli("export", "--model", run_dir, "--output", out), str(out), why, "choose")
        for folder, files in before.items():
            assert _snapshot(folder) == files, out
    assert not (run_dir / "exports").exists()


def test_a_previous_export_or_an_empty_folder_is_replaced(run_dir: Path, tmp_path: Path) -> None:
    from textclass import api

    empty = tmp_path / "empty"
    empty.mkdir()
    api.export(run_dir, output=empty, samples=8)
    first = json.loads((empty / "export.json").read_text())
    api.export(run_dir, output=empty, samples=9)  # a previous export: replaced
    assert json.loads((empty / "export.json").read_text())["parity"]["samples"] == 9 != first["parity"]["samples"]
    api.export(run_dir, samples=8)  # the default RUN_DIR/onnx, twice
    api.export(run_dir, samples=8)
    (tmp_path / "link").symlink_to(empty)
    api.export(run_dir, output=tmp_path / "link", samples=10)  # through a symlink: the target is replaced
    assert (tmp_path / "link").is_symlink()
    assert json.loads((empty / "export.json").read_text())["parity"]["samples"] == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "link"]  # no temp folders left


def test_read_only_folder_is_refused(run_dir: Path, tmp_path: Path, no_loading: None) -> None:
    out = tmp_path / "ro"
    out.mkdir()
    (out / "export.json").write_text('{"files": {}}')
    out.chmod(0o555)
    try:
        if os.access(out, os.W_OK):
            pytest.skip("this user writes into read-only folders (root)")
        _one_line_error(cli("export", "--model", run_dir, "--output", out), str(out), "read-only", "chmod")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ro"] and _snapshot(out) == {"export.json": b'{"files": {}}'}
    finally:
        out.chmod(0o755)


def test_a_failed_swap_keeps_the_previous_export(run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The final rename fails (a read-only file system, a busy mount): one line, the old export back in place."""
    from textclass import api

    out = tmp_path / "out"
    api.export(run_dir, output=out, samples=8)
    previous = _snapshot(out)
    real = os.replace

    def replace(src: object, dst: object) -> None:
        if Path(dst) == out and ".tmp-" in Path(src).name:  # the new export's rename only
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    res = cli("export", "--model", run_dir, "--output", out, "--samples", "9")
    monkeypatch.undo()
    _one_line_error(res, str(out), "cannot replace", "Read-only file system")
    assert _snapshot(out) == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_killed_exports_temp_folders_are_removed(run_dir: Path, tmp_path: Path, live_pid: int) -> None:  # noqa: F811
    from textclass import api

    dead = dead_pid()
    stale = [tmp_path / f".onnx.tmp-{dead}-0badc0de", tmp_path / f".onnx.old-{dead}-0badc0de"]
    live = [tmp_path / f".onnx.tmp-{live_pid}-0badc0de", tmp_path / f".onnx.old-{live_pid}-0badc0de"]
    for folder in stale + live:
        folder.mkdir()
        (folder / "model.onnx").write_bytes(b"partial")
    api.export(run_dir, output=tmp_path / "onnx", samples=8)
    assert not any(p.exists() for p in stale)
    assert all((p / "model.onnx").read_bytes() == b"partial" for p in live)
