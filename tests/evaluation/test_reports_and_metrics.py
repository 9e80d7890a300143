"""Evaluation: metrics on hand-computed cases, report files, and plots."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from textclass.evaluation import (
    compute_metrics,
    format_report,
    per_class_report,
    plot_training_curves,
    tune_threshold,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: str | Path) -> None:
    data = Path(path).read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_SIGNATURE)


# --- metrics -------------------------------------------------------------------------------------------


def test_perfect_single_label_prediction_scores_one() -> None:
    y = np.array([0, 1, 2, 1, 0])
    m = compute_metrics(y, y, multi_label=False, num_labels=3)
    assert set(m) == {"accuracy", "macro_f1", "micro_f1", "weighted_f1", "macro_precision", "macro_recall"}
    assert all(v == 1.0 for v in m.values())


def test_macro_vs_micro_f1_by_hand() -> None:
    # class 0: tp 4, fp 1, fn 0 -> P .8, R 1, F1 8/9; class 1: tp 1, fp 0, fn 1 -> P 1, R .5, F1 2/3
    y_true = np.array([0, 0, 0, 0, 1, 1])
    y_pred = np.array([0, 0, 0, 0, 0, 1])
    m = compute_metrics(y_true, y_pred, multi_label=False, num_labels=2)
    assert m["accuracy"] == pytest.approx(5 / 6)
    assert m["micro_f1"] == pytest.approx(5 / 6)
    assert m["macro_f1"] == pytest.approx((8 / 9 + 2 / 3) / 2)
    assert m["weighted_f1"] == pytest.approx((4 * 8 / 9 + 2 * 2 / 3) / 6)
    assert m["macro_precision"] == pytest.approx(0.9)
    assert m["macro_recall"] == pytest.approx(0.75)


def test_absent_class_counts_as_zero_without_warning() -> None:
    # a third class that appears in neither gold nor predictions: F1 0, no UndefinedMetricWarning
    y_true = np.array([0, 0, 0, 0, 1, 1])
    y_pred = np.array([0, 0, 0, 0, 0, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = compute_metrics(y_true, y_pred, multi_label=False, num_labels=3)
        rows = per_class_report(y_true, y_pred, multi_label=False, label_names=["a", "b", "c"])
    assert m["macro_f1"] == pytest.approx((8 / 9 + 2 / 3) / 3)
    assert [r["label"] for r in rows] == ["a", "b", "c"]
    assert rows[0] == pytest.approx({"label": "a", "precision": 0.8, "recall": 1.0, "f1": 8 / 9, "support": 4})
    assert rows[2] == {"label": "c", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


def test_multi_label_metrics_by_hand() -> None:
    y_true = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0]])
    y_pred = np.array([[1, 0, 1], [0, 1, 1], [1, 0, 0]])  # row 2: one false positive, row 3: one false negative
    m = compute_metrics(y_true, y_pred, multi_label=True, num_labels=3)
    assert m["subset_accuracy"] == pytest.approx(1 / 3)
    assert m["accuracy"] == m["subset_accuracy"]
    assert m["hamming_loss"] == pytest.approx(2 / 9)
    assert m["micro_f1"] == pytest.approx(0.8)  # tp 4, fp 1, fn 1
    assert m["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert m["weighted_f1"] == pytest.approx((2 * 1 + 2 * 2 / 3 + 1 * 2 / 3) / 5)
    rows = per_class_report(y_true, y_pred, multi_label=True, label_names=["x", "y", "z"])
    assert [r["support"] for r in rows] == [2, 2, 1]
    assert rows[2]["precision"] == pytest.approx(0.5) and rows[2]["recall"] == pytest.approx(1.0)


def test_metrics_reject_mismatched_shapes() -> None:
    with pytest.raises(ValueError):
        compute_metrics(np.array([0, 1]), np.array([0, 1, 1]), multi_label=False, num_labels=2)
    with pytest.raises(ValueError):
        compute_metrics(np.zeros((2, 3)), np.zeros((2, 3)), multi_label=True, num_labels=4)


def test_tune_threshold_separates_a_separable_case() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random((40, 4)) < 0.4).astype(int)
    y[0, 0] = 1  # at least one positive
    # positives score 0.32-0.40, negatives 0.05-0.15: thresholds 0.20, 0.25 and 0.30 are all perfect
    probs = np.where(y == 1, rng.uniform(0.32, 0.40, y.shape), rng.uniform(0.05, 0.15, y.shape))
    threshold, f1 = tune_threshold(y, probs)
    assert f1 == 1.0
    assert threshold == pytest.approx(0.30)  # of the tied ones, the closest to 0.5
    assert np.array_equal((probs >= threshold).astype(int), y)


def test_tune_threshold_ties_go_to_half_and_custom_grid() -> None:
    y = np.zeros((3, 2), dtype=int)  # no positives: micro-F1 is 0 everywhere
    assert tune_threshold(y, np.full((3, 2), 0.7)) == (0.5, 0.0)
    y = np.array([[1, 0], [0, 1]])
    probs = np.array([[0.9, 0.2], [0.1, 0.6]])
    assert tune_threshold(y, probs, grid=np.array([0.1, 0.55, 0.95])) == (0.55, 1.0)
    # 0.1 predicts all four (tp 2, fp 2), 0.7 only one (tp 1, fn 1): both F1 2/3, 0.7 is closer to 0.5
    assert tune_threshold(y, probs, grid=np.array([0.1, 0.7])) == (0.7, pytest.approx(2 / 3))


# --- reports -------------------------------------------------------------------------------------------

LABELS = ["sport", "politics", "tech"]


def single_label_report(tmp_path: Path, **kwargs) -> dict:
    probs = np.array(
        [
            [0.90, 0.05, 0.05],  # sport   -> sport    ok
            [0.20, 0.70, 0.10],  # politics-> politics ok
            [0.60, 0.30, 0.10],  # politics-> sport    wrong, conf .6
            [0.10, 0.10, 0.80],  # tech    -> tech     ok
            [0.30, 0.30, 0.40],  # sport   -> tech     wrong, conf .4
            [0.05, 0.90, 0.05],  # tech    -> politics wrong, conf .9
        ]
    )
    return write_report(
        tmp_path / "test",
        texts=[f"text {i}" for i in range(6)],
        y_true=np.array([0, 1, 1, 2, 0, 2]),
        probs=probs,
        label_names=LABELS,
        multi_label=False,
        **kwargs,
    )


def test_write_report_single_label_files(tmp_path: Path) -> None:
    report = single_label_report(tmp_path, text_pairs=[f"pair {i}" for i in range(6)])
    out = tmp_path / "test"
    expected = {"metrics.json", "per_class.json", "per_class.csv", "confusion_matrix.csv", "confusion_matrix.png", "badcases.csv"}
    assert set(report["files"]) == expected
    assert {p.name for p in out.iterdir()} == expected  # and no temp files left behind
    assert report["num_errors"] == 3

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["accuracy"] == pytest.approx(0.5) and metrics["num_examples"] == 6
    assert "threshold" not in metrics
    assert json.loads((out / "per_class.json").read_text()) == report["per_class"]
    assert list(pd.read_csv(out / "per_class.csv").columns) == ["label", "precision", "recall", "f1", "support"]

    cm = pd.read_csv(out / "confusion_matrix.csv", index_col=0)
    assert cm.index.name == "gold" and list(cm.index) == LABELS and list(cm.columns) == LABELS
    assert cm.to_numpy().sum() == 6
    assert cm.loc["tech", "politics"] == 1 and cm.loc["sport", "sport"] == 1

    bad = pd.read_csv(out / "badcases.csv")
    assert list(bad.columns) == ["text", "text_pair", "gold", "predicted", "confidence"]
    assert len(bad) == report["num_errors"]
    assert list(bad["confidence"]) == pytest.approx([0.9, 0.6, 0.4])  # confident mistakes first
    assert bad.iloc[0].to_dict() == {"text": "text 5", "text_pair": "pair 5", "gold": "tech", "predicted": "politics", "confidence": 0.9}
    assert_png(out / "confusion_matrix.png")


def test_write_report_without_badcases_or_pairs(tmp_path: Path) -> None:
    report = single_label_report(tmp_path, badcases=False)
    assert "badcases.csv" not in report["files"] and not (tmp_path / "test" / "badcases.csv").exists()
    assert report["num_errors"] == 3


def test_write_report_multi_label(tmp_path: Path) -> None:
    names = ["x", "y", "z"]
    probs = np.array([[0.9, 0.1, 0.8], [0.2, 0.7, 0.6], [0.8, 0.3, 0.1], [0.2, 0.3, 0.1]])
    y_true = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]])
    report = write_report(
        tmp_path / "ml", texts=["a", "b", "c", "d"], y_true=y_true, probs=probs, label_names=names, multi_label=True, threshold=0.5
    )
    out = tmp_path / "ml"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["threshold"] == 0.5 and metrics["num_examples"] == 4
    assert metrics["subset_accuracy"] == pytest.approx(0.25) and metrics["hamming_loss"] == pytest.approx(3 / 12)

    cm = pd.read_csv(out / "confusion_matrix.csv")
    assert list(cm.columns) == ["label", "tn", "fp", "fn", "tp"] and list(cm["label"]) == names
    assert (cm[["tn", "fp", "fn", "tp"]].sum(axis=1) == 4).all()
    assert cm.set_index("label").loc["z"].to_dict() == {"tn": 1, "fp": 1, "fn": 1, "tp": 1}

    bad = pd.read_csv(out / "badcases.csv", keep_default_na=False)
    assert report["num_errors"] == len(bad) == 3
    assert list(bad.columns) == ["text", "gold", "predicted", "confidence"]
    assert list(bad["text"]) == ["c", "b", "d"]
    assert list(bad["gold"]) == ["x|y", "y", "z"]
    assert list(bad["predicted"]) == ["x", "y|z", ""]
    # mean prob of the predicted labels; with none predicted, the max prob
    assert list(bad["confidence"]) == pytest.approx([0.8, 0.65, 0.3])
    assert_png(out / "confusion_matrix.png")


def test_write_report_rejects_mismatched_inputs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="probs"):
        write_report(tmp_path, texts=["a"], y_true=np.array([0]), probs=np.ones((2, 3)), label_names=LABELS, multi_label=False)


def test_format_report_renders_tables(tmp_path: Path) -> None:
    text = format_report(single_label_report(tmp_path), title="test set")
    assert "test set" in text and "per class" in text
    assert "accuracy" in text and "0.5000" in text
    assert "politics" in text and "support" in text
    assert "\x1b[" not in text  # plain text, no colour codes


# --- plots ---------------------------------------------------------------------------------------------


def realistic_log_history() -> list[dict]:
    history: list[dict] = []
    for epoch in (1, 2, 3):
        for k in range(1, 3):
            step = (epoch - 1) * 20 + k * 10
            history.append({"loss": 1.2 / (step / 10), "grad_norm": 3.1, "learning_rate": 2e-5, "epoch": step / 20, "step": step})
        history.append(
            {
                "eval_loss": 0.9 / epoch,
                "eval_accuracy": 0.6 + 0.1 * epoch,
                "eval_macro_f1": 0.5 + 0.1 * epoch,
                "eval_runtime": 1.3,
                "eval_samples_per_second": 200.0,
                "eval_steps_per_second": 7.0,
                "epoch": float(epoch),
                "step": epoch * 20,
            }
        )
    history.append({"train_runtime": 30.0, "train_loss": 0.5, "epoch": 3.0, "step": 60})
    return history


@pytest.mark.parametrize(
    "history",
    [
        realistic_log_history(),
        [h for h in realistic_log_history() if not any(k.startswith("eval_") for k in h)],  # no eval entries
        [{"loss": 0.7, "epoch": 0.1, "step": 5}],  # a single point
        [],  # nothing logged at all
    ],
    ids=["realistic", "no-eval", "one-point", "empty"],
)
def test_plot_training_curves(tmp_path: Path, history: list[dict]) -> None:
    path = tmp_path / "training_curves.png"
    plot_training_curves(history, path)
    assert_png(path)
    assert [p.name for p in tmp_path.iterdir()] == ["training_curves.png"]
