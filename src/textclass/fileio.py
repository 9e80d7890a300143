"""Atomic file writes: a crash or a full disk mid-write leaves the old file (or none), never half a file.

Temp files and folders are hidden names beside their destination that carry the writer's process id
(`temp_path`). A writer killed mid-write (kill -9, out of memory) leaves its temp behind; the next write to
the same destination removes those whose process is gone (`remove_stale_temps`) and never touches the temp
of a process that is still running.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("textclass")

# After ".NAME.": ours ("tmp-PID-HEX", "old-PID-HEX"), or atomic_write's earlier "PID.HEX.tmp".
_TEMP_SUFFIX = re.compile(r"(?:tmp|old)-(?P<pid>\d+)-[0-9a-f]+|(?P<legacy>\d+)\.[0-9a-f]+\.tmp")


def cache_dir() -> Path:
    """textclass's cache (tokenized splits, dequantised GGUF models): $TEXTCLASS_CACHE or ~/.cache/textclass."""
    return Path(os.environ.get("TEXTCLASS_CACHE", Path.home() / ".cache" / "textclass"))


def temp_path(path: Path, tag: str = "tmp") -> Path:
    """A unique hidden name beside `path` for something being written (`tag` "tmp") or replaced ("old").

    Unique, so concurrent writers don't collide; with the pid, so a later writer can tell a killed
    process's leftover from a live one's.
    """
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}")


def pid_alive(pid: int) -> bool:
    """Whether process `pid` may exist. Anything uncertain counts as alive, so its files are kept."""
    if pid <= 0 or os.name == "nt":  # 0 and -1 address process groups; Windows' os.kill terminates
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # PermissionError: another user's live process
        return True
    return True


def _temp_owner(name: str, target: str) -> int | None:
    """The writer pid in a temp name of `target`, or None for any other name."""
    prefix = f".{target}."
    match = _TEMP_SUFFIX.fullmatch(name[len(prefix) :]) if name.startswith(prefix) else None
    return None if match is None else int(match["pid"] or match["legacy"])


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove the temp files and folders of `path` left by processes that no longer exist.

    Best effort: a leftover that cannot be removed is no reason to fail the write that follows.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        pid = _temp_owner(entry.name, path.name)
        if pid is None or pid_alive(pid):
            continue
        stale = Path(entry.path)
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(stale)
            else:
                stale.unlink()
        except OSError:
            continue
        removed.append(stale)
    if removed:
        log.debug("removed %d temp file(s) of %s left by killed processes", len(removed), path)
    return removed


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call `write(tmp)` on a temp file beside `path`, then rename it into place.

    A crash or a full disk mid-write then leaves the old file (or none), never half a file.
    """
    path = Path(path)
    remove_stale_temps(path)
    # Created by `write` itself, so the file gets the usual umask permissions; mkstemp would make reports
    # readable by their owner only.
    tmp = temp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    """JSON, UTF-8, indented, written atomically."""
    return atomic_write(
        path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=float), encoding="utf-8")
    )
