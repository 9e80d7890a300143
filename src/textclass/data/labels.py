"""The label set: names, their ids, single- or multi-label.

Built from training data only and saved in the run directory, so prediction maps ids back to the same
names and a label that training never saw is caught instead of silently mis-mapped.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from textclass.errors import UserError


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(np.isscalar(value) and value != value)  # NaN
    except TypeError:
        return False


def split_label(value: Any, delimiter: str | None) -> list[str]:
    """A raw cell as a list of label strings (list column, delimited string, or scalar)."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return [str(v).strip() for v in value if str(v).strip()]
    if _is_missing(value):
        return []
    text = str(value).strip()
    if delimiter is not None:
        return [t.strip() for t in text.split(delimiter) if t.strip()]
    if text.startswith("[") and text.endswith("]"):  # a JSON list written into a CSV cell
        try:
            parsed = json.loads(text)
            if isinstance(parsed, list):
                return [str(v).strip() for v in parsed if str(v).strip()]
        except json.JSONDecodeError:
            pass
    return [text] if text else []


def label_to_str(value: Any) -> str:
    """Canonical string form of a scalar label (1 and 1.0 and '1' are one class)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


@dataclass
class LabelSet:
    """Ordered label names and whether examples carry several labels."""

    names: list[str]
    multi_label: bool

    @property
    def num_labels(self) -> int:
        return len(self.names)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))

    @property
    def label2id(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.names)}

    @classmethod
    def from_labels(cls, labels: Iterable[list[str]], multi_label: bool) -> LabelSet:
        """Sorted names seen in `labels` (each a list of names per example)."""
        names: set[str] = set()
        for ls in labels:
            names.update(ls)
        return cls(names=sorted(names, key=_natural_key), multi_label=multi_label)

    def encode(self, labels: list[str]) -> int | list[float]:
        """Class id (single-label) or multi-hot vector (multi-label). Unknown names raise KeyError."""
        index = self.label2id
        if self.multi_label:
            vec = [0.0] * self.num_labels
            for name in labels:
                vec[index[name]] = 1.0
            return vec
        return index[labels[0]]

    def encode_all(self, labels: Iterable[list[str]]) -> np.ndarray:
        """`encode` for every example: class ids (n,) as int64, or multi-hot rows (n, num_labels) as int64."""
        rows = [self.encode(ls) for ls in labels]
        if self.multi_label:
            return np.asarray(rows, dtype=np.int64).reshape(len(rows), self.num_labels)
        return np.asarray(rows, dtype=np.int64)

    def decide(self, probs: np.ndarray, threshold: float) -> np.ndarray:
        """The one place probabilities become decisions: the argmax class id per row (single-label), or a 0/1
        row of the labels at or above `threshold` (multi-label)."""
        return (probs >= threshold).astype(np.int64) if self.multi_label else probs.argmax(axis=1)

    def unknown(self, labels: Iterable[list[str]]) -> list[str]:
        """Names in `labels` that this set does not know."""
        known = set(self.names)
        return sorted({n for ls in labels for n in ls if n not in known})

    def save(self, path: Path) -> None:
        path.write_text(
            json.dumps({"labels": self.names, "multi_label": self.multi_label}, ensure_ascii=False, indent=2),
            encoding="utf-8",
        )

    @classmethod
    def load(cls, path: Path) -> LabelSet:
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
            return cls(names=[str(n) for n in obj["labels"]], multi_label=bool(obj["multi_label"]))
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"{path}: missing or corrupt label file; the run directory is incomplete") from None


def _natural_key(name: str) -> tuple:
    """Numbers sort numerically ('2' < '10'), other names alphabetically."""
    try:
        return (0, float(name), "")
    except ValueError:
        return (1, 0.0, name)
