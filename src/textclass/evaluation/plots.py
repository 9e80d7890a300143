"""Report figures: confusion matrices and training curves.

matplotlib is imported only when a figure is drawn, and figures are rendered by the headless Agg canvas,
so importing `textclass.evaluation` stays cheap and plotting works on servers without a display.
Figures are written with `textclass.fileio.atomic_write`, like every other file of a run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from textclass.fileio import atomic_write

DPI = 120
# Keys of a Trainer eval log that are bookkeeping, not quality metrics.
_NOT_METRICS = {"eval_loss", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second"}


def _figure(figsize: tuple[float, float]) -> Any:
    """A figure drawn by the Agg canvas, outside pyplot.

    Not going through pyplot means no global figure registry to leak into (nothing to close), no backend
    switch under a user's notebook, and safe use from server threads.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | Path) -> None:
    """Lay out and save as PNG atomically."""
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))


def plot_confusion_matrix(cm: np.ndarray, label_names: list[str], path: Path, title: str = "") -> None:
    """Heatmap of a single-label confusion matrix: counts in the cells, colour = share of the gold row.

    Row-normalised colour keeps rare classes' mistakes visible next to large classes.
    """
    cm = np.asarray(cm)
    k = len(label_names)
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    side = min(max(5.0, 0.55 * k + 2.5), 30.0)
    fig = _figure((side + 1.0, side))
    ax = fig.subplots()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of gold row")
    ax.set_xticks(range(k), labels=label_names, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(k), labels=label_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    if title:
        ax.set_title(title)
    if k <= 40:  # beyond that the numbers cannot be read anyway; the CSV has them
        fontsize = 10 if k <= 12 else 7
        for i in range(k):
            for j in range(k):
                colour = "white" if share[i, j] > 0.5 else "black"
                ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", color=colour, fontsize=fontsize)
    _save(fig, path)


def plot_multilabel_confusion(mcm: np.ndarray, label_names: list[str], path: Path, title: str = "") -> None:
    """Per-label true positives, false positives and false negatives as horizontal bars.

    `mcm` is sklearn's `multilabel_confusion_matrix` (k x 2 x 2); true negatives are left out because they
    dwarf everything else in typical multi-label data.
    """
    mcm = np.asarray(mcm)
    k = len(label_names)
    counts = {"tp": mcm[:, 1, 1], "fp": mcm[:, 0, 1], "fn": mcm[:, 1, 0]}
    colours = {"tp": "tab:green", "fp": "tab:orange", "fn": "tab:red"}
    fig = _figure((8.0, min(max(3.0, 0.45 * k + 1.5), 40.0)))
    ax = fig.subplots()
    positions = np.arange(k)
    height = 0.27
    for offset, (name, values) in zip((-height, 0.0, height), counts.items(), strict=True):
        bars = ax.barh(positions + offset, values, height=height, label=name, color=colours[name])
        if k <= 40:
            ax.bar_label(bars, fontsize=7, padding=2)
    ax.set_yticks(positions, labels=label_names)
    ax.invert_yaxis()  # first label on top, as in the CSV
    ax.set_xlabel("examples")
    ax.margins(x=0.08)  # room for the count labels
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncols=3, frameon=False)  # below: never covers bars
    ax.set_title(title or "per-label confusion")
    _save(fig, path)


def plot_training_curves(log_history: list[dict], path: Path) -> None:
    """Loss (train and eval) vs step, and every eval metric vs step on a second panel.

    Takes Hugging Face `Trainer.state.log_history` as is. Tolerates runs without evaluation, a single
    logged point, or an empty history (the figure then says so), because it runs at the end of every
    training and must never be the thing that fails it.
    """
    train_loss = _series(log_history, "loss")
    eval_loss = _series(log_history, "eval_loss")
    metric_keys = sorted(
        {k for h in log_history for k, v in h.items() if k.startswith("eval_") and k not in _NOT_METRICS and _is_number(v)}
    )
    fig = _figure((12.0 if metric_keys else 7.0, 4.5))
    axes = fig.subplots(1, 2 if metric_keys else 1, squeeze=False)
    loss_ax = axes[0][0]
    for (steps, values), label in ((train_loss, "train loss"), (eval_loss, "eval loss")):
        if steps:
            loss_ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=4, label=label)
    if train_loss[0] or eval_loss[0]:
        loss_ax.legend()
    else:
        loss_ax.text(0.5, 0.5, "no loss logged", ha="center", va="center", transform=loss_ax.transAxes)
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("loss")
    loss_ax.set_title("loss")
    loss_ax.grid(alpha=0.3)
    if metric_keys:
        metric_ax = axes[0][1]
        for key in metric_keys:
            steps, values = _series(log_history, key)
            metric_ax.plot(steps, values, marker="o", markersize=4, label=key.removeprefix("eval_"))
        metric_ax.set_xlabel("step")
        metric_ax.set_title("validation metrics")
        metric_ax.grid(alpha=0.3)
        metric_ax.legend(fontsize=8)
    _save(fig, path)


def _series(log_history: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the entries that logged `key`; the entry index stands in for a missing step."""
    points = [(h.get("step", i), h[key]) for i, h in enumerate(log_history) if _is_number(h.get(key))]
    return [float(s) for s, _ in points], [float(v) for _, v in points]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and np.isfinite(value)


def plot_trials(trials: list[tuple[int, str, float | None]], metric: str, minimize: bool, path: Path) -> None:
    """A hyper-parameter search: each trial's value (number, state, value) and the best value so far.

    Finished trials are dots, pruned ones a grey cross at their last reported value; failed trials have no
    value and are left out. The best-so-far line follows finished trials only, as the search's best does.
    """
    fig = _figure((8.0, 4.5))
    ax = fig.subplots()
    done = [(n, v) for n, state, v in trials if state == "COMPLETE" and v is not None and _is_number(v)]
    pruned = [(n, v) for n, state, v in trials if state == "PRUNED" and v is not None and _is_number(v)]
    if done:
        numbers, values = zip(*done, strict=True)
        ax.plot(numbers, values, "o", color="tab:blue", label="finished")
        best = np.minimum.accumulate(values) if minimize else np.maximum.accumulate(values)
        ax.step(numbers, best, where="post", color="tab:green", label="best so far")
    if pruned:
        numbers, values = zip(*pruned, strict=True)
        ax.plot(numbers, values, "x", color="tab:gray", label="pruned (last report)")
    if done or pruned:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no trial reported a value", ha="center", va="center", transform=ax.transAxes)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel(f"valid {metric}")
    ax.set_title(f"valid {metric} per trial ({'lower' if minimize else 'higher'} is better)")
    ax.grid(alpha=0.3)
    _save(fig, path)
