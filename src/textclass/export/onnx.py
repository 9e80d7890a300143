"""`textclass export`: run directory -> ONNX model(s) + parity check, written into `RUN_DIR/onnx/`.

Steps: load the run (weights, tokenizer, labels) -> export the graph with dynamic axes (`graph.py`) ->
optionally fuse it (`--optimize`) and quantise it (`--int8`: onnxruntime's dynamic quantisation in
`optimize.py`, or the model's own int8 form where it has one, as fastText does) -> parity check on a sample of
validation texts through the same `predict_proba` path `textclass predict` uses (torch backend vs onnx
backend): fp32 max |delta probability| must be <= 1e-4 or the export fails; for int8 the top-1
agreement and the accuracy change are reported, with a warning below 99% agreement.

Everything is written into a temporary folder next to the destination and moved into place only after the
parity check passed, `export.json` last: a failed or interrupted export never leaves a half-written
`onnx/` that the `auto` backend would pick up. The destination is replaced only if it is empty or a previous
export (`check_destination`, before any slow work). A killed export's temp folders carry its pid and are
removed by the next export to the same place.
"""

from __future__ import annotations

import functools
import logging
import secrets
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from textclass.data.frames import text_columns
from textclass.data.labels import LabelSet
from textclass.errors import UserError
from textclass.export.destination import check_destination, is_ours, move_into_place, prepare_tmp
from textclass.export.graph import OUTPUTS, GraphSpec, check_model, describe, export_graph
from textclass.export.optimize import optimize_generic, optimize_transformer, quantize_int8
from textclass.fileio import write_json
from textclass.inference.onnx_backend import OnnxPredictor, make_session, onnx_encoder, require_onnx
from textclass.models.base import TextModel
from textclass.rundir import (
    EXPORT_FILE,
    ONNX_DIR,
    ONNX_FP32_FILE,
    ONNX_INT8_FILE,
    ONNX_PARITY_FILE,
    PARITY_SAMPLE_FILE,
    check_run_dir,
    load_model,
    read_parity_sample,
)

log = logging.getLogger("textclass")

FP32_TOLERANCE = 1e-4
INT8_MIN_AGREEMENT = 0.99


def parity_sample(model: TextModel, run_dir: Path, data: str | Path | None, n: int, seed: int = 0) -> tuple[pd.DataFrame, str]:
    """Up to `n` rows (text, [text_pair], [labels]) from `data`, else from the sample training saved in the run
    directory, else (runs saved before it) from the run's validation split."""
    from textclass.data.prepare import prepare_data, read_eval_data

    try:
        if data is not None:
            df, source = read_eval_data(str(data), model.cfg.data, model.labels, require_labels=False)[0], str(data)
        elif (saved := read_parity_sample(run_dir)) is not None:
            df, source = saved, f"the run's saved validation sample ({PARITY_SAMPLE_FILE})"
        else:
            df, source = prepare_data(model.cfg.data).valid, "validation split of the run's data"
    except UserError as err:
        raise UserError(f"{err} (reading texts for the parity check; pass --data FILE with texts in the run's columns)") from None
    if len(df) == 0:
        raise UserError(f"{source}: no texts for the parity check; pass --data FILE")
    rows = np.random.default_rng(seed).permutation(len(df))[:n]
    return df.iloc[np.sort(rows)].reset_index(drop=True), source


def _known_labels(model: TextModel, df: pd.DataFrame) -> np.ndarray | None:
    """Gold labels of the sample when every one is in the model's label set (for the accuracy change)."""
    if "labels" not in df.columns or model.labels.unknown(df["labels"]):
        return None
    return model.labels.encode_all(df["labels"])


def _accuracy(labels: LabelSet, probs: np.ndarray, y: np.ndarray | None, threshold: float) -> float | None:
    """Accuracy (single-label) or exact-match ratio (multi-label) of the decisions against `y`."""
    if y is None:
        return None
    same = labels.decide(probs, threshold) == y
    return float((same.all(1) if labels.multi_label else same).mean())


def _agreement(labels: LabelSet, a: np.ndarray, b: np.ndarray, threshold: float) -> float:
    """Share of texts with the same decision (top-1 label, or the same label set for multi-label)."""
    same = labels.decide(a, threshold) == labels.decide(b, threshold)
    return float((same.all(1) if labels.multi_label else same).mean())


def _write_graph(
    model: TextModel, example: dict[str, torch.Tensor], dst: Path, optimize: bool, int8: bool = False
) -> tuple[GraphSpec, dict[str, int]]:
    """Export the model (its int8 form with `int8`) to `dst`, graph-optimised with `optimize`; returns the
    graph's spec and the fused-operator counts."""
    raw = dst.with_name(f"{dst.stem}.unoptimized.onnx") if optimize else dst
    spec = export_graph(model, example, raw, int8)
    check_model(raw)
    fused: dict[str, int] = {}
    if optimize:
        log.info("optimising the graph")
        fusion = model.onnx_fusion()
        fused = optimize_transformer(raw, dst, **fusion) if fusion else optimize_generic(raw, dst)
        raw.unlink()
    return spec, fused


def _size_mb(path: Path) -> float:
    return round(path.stat().st_size / 2**20, 2)


def export_onnx(
    run_dir: str | Path,
    output: str | Path | None = None,
    int8: bool = False,
    optimize: bool = False,
    data: str | Path | None = None,
    samples: int = 256,
    batch_size: int = 32,
    progress: bool = True,
) -> dict[str, Any]:
    """Export a run directory to ONNX, check parity, and return the export record (also in export.json)."""
    require_onnx("textclass export")
    path = check_run_dir(run_dir)
    out_dir = Path(output) if output is not None else path / ONNX_DIR
    if samples < 1:
        raise UserError(f"samples: {samples} must be at least 1")
    # First: a destination that must not be replaced, or cannot be written, fails before any slow work.
    # The work happens at the real location (a symlinked destination keeps its link).
    dest = check_destination(out_dir, path)
    tmp = prepare_tmp(dest)
    try:
        model = load_model(path)
        sample, source = parity_sample(model, path, data, samples)
        record = _export_into(model, path, tmp, dest, sample, source, int8, optimize, batch_size, progress)
        move_into_place(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    record["directory"] = str(out_dir)
    return record


def _export_into(
    model: TextModel,
    run_dir: Path,
    tmp: Path,
    out_dir: Path,
    sample: pd.DataFrame,
    source: str,
    int8: bool,
    optimize: bool,
    batch_size: int,
    progress: bool,
) -> dict[str, Any]:
    labels, threshold = model.labels, model.threshold
    texts, pairs = text_columns(sample)
    y = _known_labels(model, sample)

    # Example batch for the exporter: two real texts of different lengths, so padding is in the trace.
    by_len = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    pick = [by_len[0], by_len[-1]] if len(texts) > 1 else [0, 0]
    example = model.collate(model.features([texts[i] for i in pick], [pairs[i] for i in pick] if pairs else None))
    # The reference first, from the model as users run it (exporting may change its form, e.g. merge adapters).
    log.info("parity check on %d texts (%s)", len(texts), source)
    ref = model.predict_proba(texts, pairs, batch_size, progress)
    fp32 = tmp / ONNX_FP32_FILE
    log.info("exporting the %s graph (dynamic batch and sequence axes)", model.family.name)
    write = functools.partial(_write_graph, model, example, optimize=optimize)
    spec, fused = write(fp32)
    record: dict[str, Any] = {
        "format_version": 1,
        "files": {"fp32": ONNX_FP32_FILE},
        "default": "fp32",
        "inputs": spec.model.inputs,
        "outputs": OUTPUTS,
        "layout": spec.model.layout,
        # How the onnx backend encodes texts, and pads its own (torch-free) batches.
        "text_encoding": model.onnx_text_encoding(),
        "pad_id": spec.model.pad_id,
        "padding_side": spec.model.padding_side,
        "probabilities": "sigmoid" if labels.multi_label else "softmax",
        "labels": list(labels.names),
        "family": model.family.name,
        "exporter": spec.exporter,
        "opset": spec.opset,
        "optimized": optimize,
        "fused_operators": fused,
    }

    # The onnx side encodes texts exactly as `load_predictor(backend="onnx")` will, so the parity check
    # covers the torch-free encoding path too.
    encoder = onnx_encoder(run_dir, model.cfg, labels, record)

    def onnx_probs(file: str, variant: str) -> np.ndarray:
        pred = OnnxPredictor(make_session(tmp / file), encoder, model.cfg, labels, batch_size, variant)
        return pred.predict_proba(texts, pairs, progress=progress)

    p32 = onnx_probs(ONNX_FP32_FILE, "fp32")
    parity: dict[str, Any] = {
        "samples": len(texts),
        "source": source,
        "fp32_max_abs_diff": float(np.abs(p32 - ref).max()),
        "fp32_tolerance": FP32_TOLERANCE,
        "fp32_agreement": _agreement(labels, ref, p32, threshold),
        "torch_accuracy": _accuracy(labels, ref, y, threshold),
    }
    sizes = {"fp32": _size_mb(fp32)}
    if int8:
        log.info("quantising to int8")
        if model.quantizes_itself:  # fastText: per-row int8 table, exported by the model itself
            record["quantization"] = write(tmp / ONNX_INT8_FILE, int8=True)[0].quantization
        else:
            record["quantization"] = quantize_int8(fp32, tmp / ONNX_INT8_FILE)
        record["files"]["int8"] = ONNX_INT8_FILE
        sizes["int8"] = _size_mb(tmp / ONNX_INT8_FILE)
        p8 = onnx_probs(ONNX_INT8_FILE, "int8")
        acc8 = _accuracy(labels, p8, y, threshold)
        parity.update(
            int8_max_abs_diff=float(np.abs(p8 - ref).max()),
            int8_agreement=_agreement(labels, ref, p8, threshold),
            int8_accuracy=acc8,
            int8_accuracy_change=None if acc8 is None else acc8 - parity["torch_accuracy"],
        )
        record["default"] = "int8"
    record["parity"] = parity
    record["size_mb"] = sizes
    record["graph"] = describe(fp32)
    write_json(tmp / ONNX_PARITY_FILE, parity)
    if parity["fp32_max_abs_diff"] > FP32_TOLERANCE:
        failed = out_dir.with_name(f"{out_dir.name}-failed")
        if failed.exists() and not is_ours(failed, ONNX_PARITY_FILE, "fp32_max_abs_diff"):  # someone else's: kept
            failed = failed.with_name(f"{failed.name}-{secrets.token_hex(4)}")
        move_into_place(tmp, failed)
        raise UserError(
            f"export failed the parity check: fp32 max |delta probability| {parity['fp32_max_abs_diff']:.2e} > "
            f"{FP32_TOLERANCE:.0e} vs PyTorch on {len(texts)} texts; files and {ONNX_PARITY_FILE} left in {failed}, not used"
        )
    if int8 and parity["int8_agreement"] < INT8_MIN_AGREEMENT:
        log.warning(
            "int8 agrees with PyTorch on only %.2f%% of %d texts (< %.0f%%); consider the fp32 model (variant fp32)",
            100 * parity["int8_agreement"],
            len(texts),
            100 * INT8_MIN_AGREEMENT,
        )
    write_json(tmp / EXPORT_FILE, record)  # last: its presence marks a finished export
    return record
