"""The run directory: the contract between training and everything after it.

A run directory holds the weights (safetensors), the tokenizer, `labels.json`, the resolved
`config.yaml`, metrics and reports. `predict`, `evaluate`, `serve` and `Classifier.load` need that folder
and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from textclass.config import Config, build_config
from textclass.data.labels import LabelSet
from textclass.errors import UserError

if TYPE_CHECKING:  # torch is imported by `load_run` only: the ONNX backend checks run dirs without it
    from torch import nn

    from textclass.models.registry import Family

CONFIG_FILE = "config.yaml"
LABELS_FILE = "labels.json"
METRICS_FILE = "metrics.json"
CHECKPOINTS_DIR = "checkpoints"
PENDING_CONFIG = "textclass_config.yaml"  # inside checkpoints/: the config an unfinished run started with


@dataclass
class Run:
    """A loaded run directory."""

    path: Path
    cfg: Config
    labels: LabelSet
    family: Family
    model: nn.Module
    tokenizer: Any


def check_run_dir(path: str | Path) -> Path:
    """The path, if it is a finished run directory; else a one-line error saying what is missing."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{p}: is a file; pass the run directory `textclass train` wrote (e.g. runs/NAME)")
    if not p.is_dir():
        raise UserError(f"{p}: no such run directory; pass the folder `textclass train` wrote (e.g. runs/NAME)")
    missing = [f for f in (CONFIG_FILE, LABELS_FILE) if not (p / f).is_file()]
    if missing:
        unfinished = (p / CHECKPOINTS_DIR / PENDING_CONFIG).is_file()
        hint = f" (training did not finish; continue it with `textclass train --output {p} --resume`)" if unfinished else ""
        raise UserError(f"{p}: not a textclass run directory, missing {', '.join(missing)}{hint}")
    return p


def read_run_config(path: Path) -> Config:
    try:
        raw = yaml.safe_load((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        raise UserError(f"{path / CONFIG_FILE}: unreadable; the run directory is damaged") from None
    return build_config(raw, source=str(path / CONFIG_FILE))


def load_run(path: str | Path) -> Run:
    """Load config, labels, tokenizer and model from a run directory."""
    p = check_run_dir(path)
    cfg = read_run_config(p)
    labels = LabelSet.load(p / LABELS_FILE)
    from textclass.models.registry import MODEL_FILE_ERRORS, get_family

    family = get_family(cfg.model.family)
    try:
        model, tokenizer = family.load(cfg.model, p, labels.num_labels, labels.id2label)
    except MODEL_FILE_ERRORS as err:
        raise UserError(
            f"{p}: the model files are missing or damaged ({type(err).__name__}: {' '.join(str(err).split())[:160]})"
        ) from None
    return Run(p, cfg, labels, family, model, tokenizer)
