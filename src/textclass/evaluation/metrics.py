"""Classification metrics, all computed by scikit-learn.

One function serves training-time evaluation (the Trainer's `compute_metrics`), `textclass evaluate` and
the run reports, so the numbers logged during training and the numbers in `metrics.json` always agree.
scikit-learn (about a second to import) is imported on first use, keeping `import textclass.evaluation` cheap.
"""

from __future__ import annotations

import numpy as np

# Global multi-label thresholds tried by `tune_threshold`: 0.05, 0.10, ..., 0.95.
DEFAULT_THRESHOLD_GRID = np.round(np.arange(0.05, 0.951, 0.05), 2)


def compute_metrics(y_true: np.ndarray, y_pred: np.ndarray, *, multi_label: bool, num_labels: int) -> dict[str, float]:
    """Headline metrics; `accuracy` exists in both modes so one best-model metric name works everywhere.

    Single-label: int class ids, shape (n,). Multi-label: 0/1 indicators, shape (n, num_labels); there
    `accuracy` is the subset (exact-match) accuracy. All labels are passed explicitly with
    `zero_division=0`, so a batch missing some classes neither crashes nor warns.
    """
    from sklearn.metrics import accuracy_score, f1_score, hamming_loss, precision_recall_fscore_support

    y_true, y_pred = _check(y_true, y_pred, multi_label, num_labels)
    labels = list(range(num_labels))

    def f1(average: str) -> float:
        return float(f1_score(y_true, y_pred, labels=labels, average=average, zero_division=0))

    if multi_label:
        subset = float(accuracy_score(y_true, y_pred))
        return {
            "micro_f1": f1("micro"),
            "macro_f1": f1("macro"),
            "weighted_f1": f1("weighted"),
            "subset_accuracy": subset,
            "hamming_loss": float(hamming_loss(y_true, y_pred)),
            "accuracy": subset,
        }
    precision, recall, _, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average="macro", zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": f1("macro"),
        "micro_f1": f1("micro"),
        "weighted_f1": f1("weighted"),
        "macro_precision": float(precision),
        "macro_recall": float(recall),
    }


def per_class_report(y_true: np.ndarray, y_pred: np.ndarray, *, multi_label: bool, label_names: list[str]) -> list[dict]:
    """Precision/recall/F1/support for every class (in label order), including classes never seen."""
    from sklearn.metrics import precision_recall_fscore_support

    y_true, y_pred = _check(y_true, y_pred, multi_label, len(label_names))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=list(range(len(label_names))), average=None, zero_division=0
    )
    return [
        {"label": name, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for name, p, r, f, s in zip(label_names, precision, recall, f1, support, strict=True)
    ]


def tune_threshold(y_true: np.ndarray, probs: np.ndarray, grid: np.ndarray | None = None) -> tuple[float, float]:
    """The single global multi-label threshold maximising micro-F1 on (validation) data.

    Returns `(threshold, micro_f1)`. Ties go to the threshold closest to 0.5, the untuned default, so a
    flat score curve (e.g. no positives at all) does not drift to an extreme.
    """
    from sklearn.metrics import f1_score

    y_true = np.asarray(y_true).astype(int)
    probs = np.asarray(probs, dtype=float)
    if y_true.shape != probs.shape or y_true.ndim != 2:
        raise ValueError(f"tune_threshold needs (n, num_labels) arrays of one shape, got {y_true.shape} and {probs.shape}")
    candidates = DEFAULT_THRESHOLD_GRID if grid is None else np.asarray(grid, dtype=float)
    if candidates.size == 0:
        raise ValueError("tune_threshold needs a non-empty grid")
    scored = [(float(f1_score(y_true, (probs >= t).astype(int), average="micro", zero_division=0)), float(t)) for t in candidates]
    best_f1, best_t = max(scored, key=lambda s: (s[0], -abs(s[1] - 0.5)))
    return best_t, best_f1


def _check(y_true: np.ndarray, y_pred: np.ndarray, multi_label: bool, num_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """Int arrays of the shape the mode expects; a mismatch is a programming error, so fail loudly."""
    y_true, y_pred = np.asarray(y_true).astype(int), np.asarray(y_pred).astype(int)
    expected_ndim = 2 if multi_label else 1
    if y_true.shape != y_pred.shape or y_true.ndim != expected_ndim:
        raise ValueError(
            f"{'multi' if multi_label else 'single'}-label metrics need y_true and y_pred of one shape with "
            f"{expected_ndim} dimension(s), got {y_true.shape} and {y_pred.shape}"
        )
    if multi_label and y_true.shape[1] != num_labels:
        raise ValueError(f"expected {num_labels} label columns, got {y_true.shape[1]}")
    return y_true, y_pred
