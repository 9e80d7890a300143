"""Atomic file writes: a crash or a full disk mid-write leaves the old file (or none), never half a file."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any, Callable


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call `write(tmp)` on a temp file beside `path`, then rename it into place.

    A crash or a full disk mid-write then leaves the old file (or none), never half a file.
    """
    path = Path(path)
    # A unique name (concurrent writers don't collide) created by `write` itself, so the file gets the
    # usual umask permissions; mkstemp would make reports readable by their owner only.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    """JSON, UTF-8, indented, written atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=float), encoding="utf-8"))
