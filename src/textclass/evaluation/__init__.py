"""Evaluation: scikit-learn metrics, report files (JSON/CSV/PNG) and training-curve plots."""

from __future__ import annotations

from textclass.evaluation.metrics import compute_metrics, per_class_report, tune_threshold
from textclass.evaluation.plots import plot_confusion_matrix, plot_multilabel_confusion, plot_training_curves, plot_trials
from textclass.evaluation.reports import format_report, format_table, write_report, write_split_report

__all__ = [
    "compute_metrics",
    "format_report",
    "format_table",
    "per_class_report",
    "plot_confusion_matrix",
    "plot_multilabel_confusion",
    "plot_training_curves",
    "plot_trials",
    "tune_threshold",
    "write_report",
    "write_split_report",
]
