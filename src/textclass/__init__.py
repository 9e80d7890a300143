"""textclass: train, evaluate, compress, export and serve text classifiers.

The public API: `train()`, `tune()`, `distill()`, `evaluate()`, `Classifier.load(DIR).predict([...])` (also `load(DIR)`).
Heavy libraries (torch, transformers) are imported when these are first used.
"""

from __future__ import annotations

from typing import Any

from textclass.version import __version__

__all__ = [
    "Classifier",
    "Config",
    "UserError",
    "__version__",
    "distill",
    "evaluate",
    "load",
    "load_config",
    "merge",
    "prune",
    "train",
    "tune",
    "zero_shot",
]


def __getattr__(name: str) -> Any:
    # Lazy: `import textclass` (and `textclass --help`) must not pay for importing torch.
    if name in ("Classifier", "distill", "evaluate", "load", "train", "tune", "zero_shot", "merge", "prune"):
        from textclass import api

        return getattr(api, name)
    if name in ("Config", "load_config"):
        from textclass import config

        return getattr(config, name)
    if name == "UserError":
        from textclass.errors import UserError

        return UserError
    raise AttributeError(name)
