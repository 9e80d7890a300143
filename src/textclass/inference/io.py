"""Prediction to files, the interactive prompt, and `info` measurements."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import pandas as pd
from tqdm.auto import tqdm

from textclass.data.frames import text_columns
from textclass.errors import UserError
from textclass.fileio import atomic_write
from textclass.inference.predictor import BasePredictor
from textclass.rundir import CHECKPOINTS_DIR, EVAL_DIR, ONNX_DIR, OOF_SPLIT, PRUNE_FILE, TENSORBOARD_DIR, read_metrics

log = logging.getLogger("textclass")

OUTPUT_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


def _output_format(path: Path, input_path: Path) -> str:
    """The output's format, after refusing outputs that cannot be right: the input file itself (also through
    a symlink, `..` or a hard link), a folder, a missing folder, an unknown extension."""
    fmt = OUTPUT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"{path}: unknown output format {path.suffix!r}; use a .csv or .jsonl file name")
    if not path.parent.exists():
        raise UserError(f"{path}: folder {path.parent} does not exist; create it or choose another --output")
    if path.is_dir():
        raise UserError(f"{path}: is a folder; give a file name such as {path / 'predictions.csv'}")
    if _same_file(path, input_path):
        raise UserError(f"{path}: is the input file; writing there would destroy it, choose another --output")
    return fmt


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def predictions_frame(predictor: BasePredictor, df: pd.DataFrame, results: list[dict[str, Any]]) -> pd.DataFrame:
    """CSV layout: the input text(s), the decision, and one `score_<label>` column per class."""
    out = pd.DataFrame({"text": df["text"]})
    if "text_pair" in df.columns:
        out["text_pair"] = df["text_pair"]
    if predictor.labels.multi_label:
        out["labels"] = ["|".join(r["labels"]) for r in results]
    else:
        out["label"] = [r["label"] for r in results]
        out["score"] = [r["score"] for r in results]
    for name in predictor.labels.names:
        out[f"score_{name}"] = [r["scores"].get(name) for r in results]
    return out


def predict_file(
    predictor: BasePredictor,
    input_path: Path,
    output_path: Path,
    top_k: int | None = None,
    threshold: float | None = None,
    chunk_rows: int = 10_000,
) -> tuple[int, list[str]]:
    """Predict every row of a file and write CSV or JSONL atomically; returns (rows, unknown labels).

    The input is streamed `chunk_rows` rows at a time and each chunk's predictions are appended to the
    output as soon as they are made, so memory stays bounded for inputs of any size. The output appears
    under its name only when the whole file is done: an error half-way (a broken line, a full disk) leaves
    no partial file behind.
    """
    from textclass.data.prepare import eval_frame
    from textclass.data.readers import stream_table

    fmt = _output_format(output_path, input_path)
    stream = stream_table(input_path, "auto", predictor.cfg.data.encoding, chunk_rows=chunk_rows)
    rows = 0
    unknown: dict[str, None] = {}  # ordered set: first seen first

    def write(tmp: Path) -> None:
        nonlocal rows
        with (
            tmp.open("w", encoding="utf-8", newline="") as f,
            tqdm(desc="Predicting", unit=stream.unit, unit_scale=stream.unit == "B", disable=None) as bar,
        ):
            for number, chunk in enumerate(stream):
                df, new_unknown = eval_frame(chunk, str(input_path), predictor.cfg.data, predictor.labels, False, number)
                unknown.update(dict.fromkeys(new_unknown))
                if len(df):  # a chunk of only empty texts writes nothing, not even a header
                    results = predictor.predict(*text_columns(df), top_k=top_k, threshold=threshold)
                    if fmt == "csv":
                        predictions_frame(predictor, df, results).to_csv(f, index=False, header=rows == 0)
                    else:
                        for text, r in zip(df["text"], results, strict=True):
                            f.write(json.dumps({"text": text, **r}, ensure_ascii=False) + "\n")
                    rows += len(df)
                bar.total = stream.total
                bar.update(stream.progress - bar.n)
                bar.set_postfix(texts=rows, refresh=False)
            if rows == 0:
                _no_texts(predictor, input_path, output_path, f if fmt == "csv" else None)

    try:
        atomic_write(output_path, write)
    except OSError as err:
        raise UserError(f"{output_path}: cannot write ({err.strerror}); choose a writable --output") from None
    return rows, list(unknown)


def _no_texts(predictor: BasePredictor, input_path: Path, output_path: Path, csv: TextIO | None) -> None:
    """No text to predict: a CSV still gets its header, so whatever reads it next sees the usual columns;
    the warning says why it is empty (every text blank: often data.text_column names the wrong column)."""
    if csv is not None:
        columns = ["text", "text_pair"] if predictor.cfg.data.text_pair_column else ["text"]
        predictions_frame(predictor, pd.DataFrame(columns=columns), []).to_csv(csv, index=False)
    log.warning(
        "%s: no non-empty text in column %r, nothing to predict; wrote %s to %s (is data.text_column the text?)",
        input_path,
        predictor.cfg.data.text_column,
        "only the header" if csv is not None else "no lines",
        output_path,
    )


def render_scores(result: dict[str, Any], width: int = 30) -> str:
    """Ranked labels with bars, for the terminal."""
    lines = []
    chosen = set(result.get("labels", [result.get("label")]))
    for name, p in result["scores"].items():
        bar = "█" * int(round(p * width))
        mark = "*" if name in chosen else " "
        lines.append(f" {mark} {name:<20} {p:6.3f} {bar}")
    return "\n".join(lines)


def interactive_loop(predictor: BasePredictor, top_k: int = 5) -> None:
    """Read sentences from the terminal until EOF or an empty line; print ranked labels."""
    print(f"labels: {', '.join(predictor.labels.names)}\ntype a sentence (empty line or Ctrl-D to quit)")
    while True:
        try:
            text = input("> ").strip()
        except EOFError:
            break
        if not text:
            break
        print(render_scores(predictor.predict([text], top_k=top_k)[0]))


def dir_size(path: Path, onnx: bool = True) -> int:
    """Bytes of what a run directory needs to predict (`onnx=False`: without its ONNX export, to compare a
    model with one not exported yet)."""
    skip = {CHECKPOINTS_DIR, EVAL_DIR, TENSORBOARD_DIR}  # training leftovers, reports, logs: not needed to predict
    skip |= set() if onnx else {ONNX_DIR}
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not (set(f.relative_to(path).parts) & skip))


def _kfold_info(run_dir: Path, k: int | None, metric: str) -> dict[str, str]:
    """For a k-fold run: what it is, and each fold's and the out-of-fold score in the run's `best_metric`."""
    if not k:
        return {}
    metrics = read_metrics(run_dir)
    metric = metric if metric != "loss" else "accuracy"  # the reports hold scores, not the training loss
    scores = [f"{f[metric]:.4f}" for f in metrics.get("folds", []) if metric in f]
    oof = metrics.get(OOF_SPLIT, {}).get(metric)
    line = f"{metric} " + ", ".join(scores) + (f"; out-of-fold {oof:.4f}" if oof is not None else "")
    return {"ensemble": f"{k}-fold ensemble (the mean of {k} models' probabilities)", "fold valid": line}


def model_info(run_dir: str | Path, repeats: int = 5, backend: str = "auto", threads: int | None = None) -> dict[str, Any]:
    """Parameters, size on disk, labels and measured latency at batch 1 and 32 (median of `repeats`)."""
    from textclass.inference.load import load_predictor
    from textclass.inference.onnx_backend import OnnxPredictor  # imported by load_predictor anyway

    predictor = load_predictor(run_dir, batch_size=32, threads=threads, backend=backend)
    counts = predictor.parameter_counts()
    ms1, ms32 = latency_ms(predictor.predict_proba, repeats)
    return {
        "family": predictor.cfg.model.family,
        "model": getattr(predictor.cfg.model, "name", getattr(predictor.cfg.model, "arch", "")),
        **_kfold_info(Path(run_dir), predictor.cfg.training.kfold, predictor.cfg.training.best_metric),
        "task": "multi-label" if predictor.labels.multi_label else "single-label",
        "labels": f"{predictor.labels.num_labels}: {', '.join(predictor.labels.names)}",
        "backend": predictor.backend + (f" ({predictor.variant})" if isinstance(predictor, OnnxPredictor) else ""),
        "parameters": f"{counts[0]:,}",
        "trainable parameters": f"{counts[1]:,}",
        "size on disk": f"{dir_size(Path(run_dir)) / 1e6:.1f} MB",
        "latency batch 1": f"{ms1:.1f} ms",
        "latency batch 32": f"{ms32:.1f} ms ({32000 / ms32:.0f} texts/s)",
        **_prune_info(Path(run_dir)),
    }


def latency_ms(predict_proba: Callable[[list[str]], Any], repeats: int = 5) -> tuple[float, float]:
    """Median milliseconds of one call on 1 and on 32 texts of ~50 words (after a warm-up call each)."""
    sentence = "The committee said on Tuesday that the new rules would take effect next year after a review. "
    texts = [sentence * 3] * 32

    def median_ms(batch: list[str]) -> float:
        predict_proba(batch)  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            predict_proba(batch)
            times.append((time.perf_counter() - t0) * 1000)
        return sorted(times)[len(times) // 2]

    return median_ms(texts[:1]), median_ms(texts)


def _prune_info(run_dir: Path) -> dict[str, str]:
    """For a pruned run (its prune.json): what was removed and the numbers before -> after, as measured at prune time."""
    path = run_dir / PRUNE_FILE
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        b, a = record["before"], record["after"]
        return {
            "pruned from": str(record["source"]),
            "pruned": ", ".join(f"{k} {v}" for k, v in record["removed"].items()) or "nothing",
            "params before->after": f"{b['parameters']:,} -> {a['parameters']:,}",
            "size before->after": f"{b['size_mb']:.1f} MB -> {a['size_mb']:.1f} MB",
            "batch 1 before->after": f"{b['latency_ms_batch_1']:.1f} ms -> {a['latency_ms_batch_1']:.1f} ms",
            "batch 32 before->after": f"{b['latency_ms_batch_32']:.1f} ms -> {a['latency_ms_batch_32']:.1f} ms",
        }
    except (OSError, ValueError, KeyError, TypeError):
        return {"pruned": f"{path} unreadable"}
