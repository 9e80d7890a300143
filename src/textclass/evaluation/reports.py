"""Evaluation reports: the files a user reads after training or `textclass evaluate`.

`write_report` turns gold labels and predicted probabilities into metrics, a per-class table, a confusion
matrix (CSV and PNG) and the list of mistakes, confident ones first, because those are the ones worth
reading (label noise, missing classes, shortcuts). `format_report` renders the same numbers for a terminal.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from textclass.data.frames import text_columns
from textclass.data.labels import LabelSet
from textclass.evaluation.metrics import compute_metrics, per_class_report
from textclass.evaluation.plots import plot_confusion_matrix, plot_multilabel_confusion
from textclass.fileio import atomic_write, write_json


def write_split_report(
    out_dir: str | Path, df: pd.DataFrame, probs: np.ndarray, labels: LabelSet, threshold: float, badcases: bool = True
) -> dict:
    """`write_report` for a prepared split (columns text, [text_pair], labels): what training's valid/test
    reports and `textclass evaluate` both write."""
    texts, pairs = text_columns(df)
    return write_report(
        out_dir,
        texts=texts,
        text_pairs=pairs,
        y_true=labels.encode_all(df["labels"]),
        probs=probs,
        label_names=labels.names,
        multi_label=labels.multi_label,
        threshold=threshold,
        badcases=badcases,
    )


def write_report(
    out_dir: str | Path,
    *,
    texts: list[str],
    y_true: np.ndarray,
    probs: np.ndarray,
    label_names: list[str],
    multi_label: bool,
    threshold: float = 0.5,
    text_pairs: list[str] | None = None,
    badcases: bool = True,
) -> dict:
    """Write metrics.json, per_class.json/.csv, confusion_matrix.csv/.png and badcases.csv into `out_dir`.

    Predictions are the argmax of `probs` (single-label) or `probs >= threshold` (multi-label). Every file
    is written atomically. Returns `{"metrics", "per_class", "num_errors", "files": {name: path}}`.
    """
    from sklearn.metrics import confusion_matrix, multilabel_confusion_matrix

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    probs = np.asarray(probs, dtype=float)
    y_true = np.asarray(y_true).astype(int)
    _check_inputs(texts, text_pairs, y_true, probs, label_names)
    y_pred = LabelSet(list(label_names), multi_label).decide(probs, threshold)

    metrics: dict[str, Any] = compute_metrics(y_true, y_pred, multi_label=multi_label, num_labels=len(label_names))
    metrics["num_examples"] = len(texts)
    if multi_label:
        metrics["threshold"] = float(threshold)
    per_class = per_class_report(y_true, y_pred, multi_label=multi_label, label_names=label_names)
    wrong = (y_true != y_pred).any(axis=1) if multi_label else y_true != y_pred

    files: dict[str, Path] = {}

    def save(name: str, write: Callable[[Path], Any]) -> None:
        files[name] = atomic_write(out / name, write)

    files["metrics.json"] = write_json(out / "metrics.json", metrics)
    files["per_class.json"] = write_json(out / "per_class.json", per_class)
    save("per_class.csv", lambda tmp: pd.DataFrame(per_class).to_csv(tmp, index=False))
    labels = list(range(len(label_names)))
    title = f"{out.name} (n={len(texts)})"
    png = out / "confusion_matrix.png"  # the plot functions write atomically themselves
    if multi_label:
        mcm = multilabel_confusion_matrix(y_true, y_pred, labels=labels)
        save("confusion_matrix.csv", lambda tmp: _multilabel_confusion_frame(mcm, label_names).to_csv(tmp, index=False))
        plot_multilabel_confusion(mcm, label_names, png, title=title)
    else:
        cm = confusion_matrix(y_true, y_pred, labels=labels)
        cm_frame = pd.DataFrame(cm, index=pd.Index(label_names, name="gold"), columns=pd.Index(label_names, name="predicted"))
        save("confusion_matrix.csv", lambda tmp: cm_frame.to_csv(tmp))
        plot_confusion_matrix(cm, label_names, png, title=title)
    files[png.name] = png
    if badcases:
        bad = _badcases_frame(texts, text_pairs, y_true, y_pred, probs, label_names, multi_label, wrong)
        save("badcases.csv", lambda tmp: bad.to_csv(tmp, index=False))

    return {
        "metrics": metrics,
        "per_class": per_class,
        "num_errors": int(wrong.sum()),
        "files": {name: str(path) for name, path in files.items()},
    }


def format_report(report: dict, title: str = "") -> str:
    """Plain-text tables (headline metrics, then per class) for the CLI; numbers to 4 decimals."""
    from rich.table import Table

    headline = Table(title=title or None, show_header=True)
    headline.add_column("metric")
    headline.add_column("value", justify="right")
    for name, value in report.get("metrics", {}).items():
        headline.add_row(name, _fmt(value))
    if "num_errors" in report:
        headline.add_row("num_errors", _fmt(report["num_errors"]))

    per_class = Table(title="per class", show_header=True)
    columns = ("label", "precision", "recall", "f1", "support")
    for column in columns:
        per_class.add_column(column, justify="left" if column == "label" else "right")
    for row in report.get("per_class", []):
        per_class.add_row(*(_fmt(row.get(c, "")) for c in columns))

    return _render(headline, *([per_class] if report.get("per_class") else []))


def format_table(frame: pd.DataFrame, title: str = "", fixed: tuple[str, ...] = ()) -> str:
    """A data frame as a plain-text table for the CLI: text left, numbers right, floats to 4 significant
    digits, or to 4 decimals in the `fixed` columns (metrics, which read best aligned)."""
    from rich.table import Table

    table = Table(title=title or None, show_header=True)
    for column in frame.columns:
        numeric = pd.api.types.is_numeric_dtype(frame[column]) and not pd.api.types.is_bool_dtype(frame[column])
        table.add_column(str(column), justify="right" if numeric else "left")

    def cell(column: str, v: Any) -> str:
        if pd.isna(v):
            return ""
        return _fmt(v) if column in fixed else f"{v:.4g}" if isinstance(v, float) else str(v)

    for row in frame.itertuples(index=False):
        table.add_row(*(cell(c, v) for c, v in zip(frame.columns, row, strict=True)))
    return _render(table, width=160)


def _render(*tables: Any, width: int = 100) -> str:
    """rich tables as plain text (no colour, no terminal codes), one after the other."""
    from rich.console import Console

    console = Console(file=io.StringIO(), width=width, color_system=None, force_terminal=False, highlight=False)
    for table in tables:
        console.print(table)
    return console.file.getvalue()  # type: ignore[attr-defined]


def _fmt(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return f"{value:.4f}"
    return str(value)


def _check_inputs(
    texts: list[str], text_pairs: list[str] | None, y_true: np.ndarray, probs: np.ndarray, label_names: list[str]
) -> None:
    """Catch mismatched inputs here, with sizes, rather than as an index error deep in pandas."""
    n = len(texts)
    if probs.ndim != 2 or probs.shape != (n, len(label_names)):
        raise ValueError(f"probs must have shape ({n}, {len(label_names)}) (texts x labels), got {probs.shape}")
    if len(y_true) != n:
        raise ValueError(f"y_true has {len(y_true)} rows but there are {n} texts")
    if text_pairs is not None and len(text_pairs) != n:
        raise ValueError(f"text_pairs has {len(text_pairs)} entries but there are {n} texts")


def _multilabel_confusion_frame(mcm: np.ndarray, label_names: list[str]) -> pd.DataFrame:
    """sklearn's k x 2 x 2 ([[tn, fp], [fn, tp]] per label) as one long table, one row per label."""
    return pd.DataFrame(
        {
            "label": label_names,
            "tn": mcm[:, 0, 0],
            "fp": mcm[:, 0, 1],
            "fn": mcm[:, 1, 0],
            "tp": mcm[:, 1, 1],
        }
    )


def _badcases_frame(
    texts: list[str],
    text_pairs: list[str] | None,
    y_true: np.ndarray,
    y_pred: np.ndarray,
    probs: np.ndarray,
    label_names: list[str],
    multi_label: bool,
    wrong: np.ndarray,
) -> pd.DataFrame:
    """One row per mistake, most confident first (a confident mistake is often a label error)."""
    rows = np.flatnonzero(wrong)
    names = np.asarray(label_names, dtype=object)
    if multi_label:

        def joined(indicators: np.ndarray) -> str:
            return "|".join(names[indicators.astype(bool)])

        gold = [joined(y_true[i]) for i in rows]
        predicted = [joined(y_pred[i]) for i in rows]
        confidence = [float(probs[i][y_pred[i].astype(bool)].mean()) if y_pred[i].any() else float(probs[i].max()) for i in rows]
    else:
        gold = list(names[y_true[rows]])
        predicted = list(names[y_pred[rows]])
        confidence = [float(probs[i, y_pred[i]]) for i in rows]
    columns: dict[str, list] = {"text": [texts[i] for i in rows]}
    if text_pairs is not None:
        columns["text_pair"] = [text_pairs[i] for i in rows]
    columns.update(gold=gold, predicted=predicted, confidence=confidence)
    frame = pd.DataFrame(columns)
    # stable sort: equally confident mistakes keep their input order
    return frame.sort_values("confidence", ascending=False, kind="mergesort").reset_index(drop=True)
