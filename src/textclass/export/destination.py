"""Where an export may go: refusing destinations whose replacement would delete data, and replacing an
earlier export only once the new one is complete (temp folders beside it carry the writer's pid, so a
killed export's leftovers are removed by the next one)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from textclass.errors import UserError
from textclass.fileio import remove_stale_temps, temp_path
from textclass.rundir import EXPORT_FILE, ONNX_DIR


def is_ours(folder: Path, marker: str, key: str) -> bool:
    """Whether `folder` holds `marker`, a JSON object with `key`, as written by an export of ours."""
    try:
        content = json.loads((folder / marker).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(content, dict) and key in content


def check_destination(out_dir: Path, run_dir: Path) -> Path:
    """The real location of the export folder, after refusing one whose replacement would delete data.

    Refused, with a one-line UserError and before any slow work: the run directory itself, a folder that
    contains it or lies inside it (other than its `onnx/`), a file, a non-empty folder that is not a previous
    export, a read-only folder and a mount point. Paths are resolved first, so `RUN/..`, `./` and symlinks
    are seen for what they are.
    """
    try:
        run, out = run_dir.resolve(), out_dir.resolve()
    except (OSError, RuntimeError) as err:  # a symlink loop
        raise UserError(f"{out_dir}: cannot resolve the path ({err}); choose another --output") from None
    fix = f"leave out --output (the export goes to {run_dir / ONNX_DIR}) or choose a folder outside the run directory"
    if out == run:
        raise UserError(f"{out_dir}: is the run directory itself; {fix}")
    if run.is_relative_to(out):
        raise UserError(f"{out_dir}: contains the run directory {run_dir}; {fix}")
    if out.is_relative_to(run) and out != run / ONNX_DIR:
        raise UserError(f"{out_dir}: is inside the run directory {run_dir}; {fix}")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out_dir}: is a file; --output names a folder: choose a new or empty one, or a previous export")
    if out.is_dir():
        if os.path.ismount(out):
            raise UserError(f"{out_dir}: is a mount point, which cannot be replaced; choose a folder inside it")
        if not os.access(out, os.W_OK):
            raise UserError(f"{out_dir}: the folder is read-only; make it writable (chmod u+w) or choose another --output")
        if any(out.iterdir()) and not is_ours(out, EXPORT_FILE, "files"):  # only what an export made itself
            raise UserError(
                f"{out_dir}: folder is not empty and not a previous export (no {EXPORT_FILE}); choose a new or empty "
                "folder for --output, or empty this one yourself"
            )
    return out


def prepare_tmp(out_dir: Path) -> Path:
    """A fresh temp folder beside the destination; an unwritable place is a one-line UserError."""
    remove_stale_temps(out_dir)
    tmp = temp_path(out_dir)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as err:
        raise UserError(f"{out_dir}: cannot write the export there ({err.strerror}); choose a writable --output") from None
    return tmp


def move_into_place(tmp: Path, out_dir: Path) -> None:
    """Replace `out_dir` with `tmp`; the old export is removed only once the new one is in place, and is put
    back if the new one cannot be (a one-line UserError)."""
    remove_stale_temps(out_dir)
    old = temp_path(out_dir, "old") if out_dir.exists() else None
    try:
        if old is not None:
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    except OSError as err:
        kept = ""
        if old is not None and old.exists() and not out_dir.exists():
            try:
                os.replace(old, out_dir)
            except OSError:
                kept = f"; the previous export is in {old}"
        raise UserError(f"{out_dir}: cannot replace it ({err.strerror}){kept}; choose a writable --output") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
