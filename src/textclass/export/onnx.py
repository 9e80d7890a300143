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
import json
import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from textclass.errors import UserError
from textclass.export.graph import OUTPUTS, GraphSpec, check_model, describe, export_graph, quantizes_itself
from textclass.export.optimize import optimize_generic, optimize_transformer, quantize_int8
from textclass.fileio import remove_stale_temps, temp_path, write_json
from textclass.inference.onnx_backend import (
    EXPORT_FILE,
    ONNX_DIR,
    OnnxPredictor,
    load_tokenizer,
    make_session,
    require_onnx,
)
from textclass.inference.predictor import Predictor, make_collator
from textclass.rundir import Run, check_run_dir, load_run

log = logging.getLogger("textclass")

FP32_TOLERANCE = 1e-4
INT8_MIN_AGREEMENT = 0.99
PARITY_FILE = "parity.json"
FP32_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"


def parity_sample(run: Run, data: str | Path | None, n: int, seed: int = 0) -> tuple[list[str], list[str] | None, Any, str]:
    """Up to `n` texts (pairs, label ids if known) from `data` or the run's validation split."""
    from textclass.data.prepare import prepare_data, read_eval_data

    try:
        if data is not None:
            df, _ = read_eval_data(str(data), run.cfg.data, run.labels, require_labels=False)
            source = str(data)
        else:
            df, source = prepare_data(run.cfg.data).valid, "validation split of the run's data"
    except UserError as err:
        raise UserError(f"{err} (reading texts for the parity check; pass --data FILE with texts in the run's columns)") from None
    if len(df) == 0:
        raise UserError(f"{source}: no texts for the parity check; pass --data FILE")
    rows = np.random.default_rng(seed).permutation(len(df))[:n]
    df = df.iloc[np.sort(rows)].reset_index(drop=True)
    pairs = df["text_pair"].astype(str).tolist() if "text_pair" in df.columns else None
    labels = None
    if "labels" in df.columns and not run.labels.unknown(df["labels"]):
        labels = np.asarray([run.labels.encode(ls) for ls in df["labels"]]).astype(int)
    return df["text"].astype(str).tolist(), pairs, labels, source


def _decisions(probs: np.ndarray, multi_label: bool, threshold: float) -> np.ndarray:
    return probs >= threshold if multi_label else probs.argmax(1)


def _accuracy(probs: np.ndarray, y: np.ndarray | None, multi_label: bool, threshold: float) -> float | None:
    """Accuracy (single-label, `y` class ids) or exact-match ratio (multi-label, `y` multi-hot)."""
    if y is None:
        return None
    if multi_label:
        return float(((probs >= threshold) == y.astype(bool)).all(1).mean())
    return float((probs.argmax(1) == y).mean())


def _agreement(a: np.ndarray, b: np.ndarray, multi_label: bool, threshold: float) -> float:
    """Share of texts with the same decision (top-1 label, or the same label set for multi-label)."""
    da, db = _decisions(a, multi_label, threshold), _decisions(b, multi_label, threshold)
    same = (da == db).all(1) if multi_label else da == db
    return float(same.mean())


def _is_ours(folder: Path, marker: str, key: str) -> bool:
    """Whether `folder` holds `marker`, a JSON object with `key`, as written by an export of ours."""
    try:
        content = json.loads((folder / marker).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(content, dict) and key in content


def check_destination(out_dir: Path, run_dir: Path) -> Path:
    """The real location of the export folder, after refusing one whose replacement would delete data.

    Refused, with a one-line UserError and before any slow work: the run directory itself, a folder that
    contains it or lies inside it (other than its `onnx/`), a file, a non-empty folder that is not a previous
    export, a read-only folder and a mount point. Paths are resolved first, so `RUN/..`, `./` and symlinks
    are seen for what they are.
    """
    try:
        run, out = run_dir.resolve(), out_dir.resolve()
    except (OSError, RuntimeError) as err:  # a symlink loop
        raise UserError(f"{out_dir}: cannot resolve the path ({err}); choose another --output") from None
    fix = f"leave out --output (the export goes to {run_dir / ONNX_DIR}) or choose a folder outside the run directory"
    if out == run:
        raise UserError(f"{out_dir}: is the run directory itself; {fix}")
    if run.is_relative_to(out):
        raise UserError(f"{out_dir}: contains the run directory {run_dir}; {fix}")
    if out.is_relative_to(run) and out != run / ONNX_DIR:
        raise UserError(f"{out_dir}: is inside the run directory {run_dir}; {fix}")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out_dir}: is a file; --output names a folder: choose a new or empty one, or a previous export")
    if out.is_dir():
        if os.path.ismount(out):
            raise UserError(f"{out_dir}: is a mount point, which cannot be replaced; choose a folder inside it")
        if not os.access(out, os.W_OK):
            raise UserError(f"{out_dir}: the folder is read-only; make it writable (chmod u+w) or choose another --output")
        if any(out.iterdir()) and not _is_ours(out, EXPORT_FILE, "files"):  # only what an export made itself
            raise UserError(
                f"{out_dir}: folder is not empty and not a previous export (no {EXPORT_FILE}); choose a new or empty "
                "folder for --output, or empty this one yourself"
            )
    return out


def _prepare_tmp(out_dir: Path) -> Path:
    """A fresh temp folder beside the destination; an unwritable place is a one-line UserError."""
    remove_stale_temps(out_dir)
    tmp = temp_path(out_dir)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as err:
        raise UserError(f"{out_dir}: cannot write the export there ({err.strerror}); choose a writable --output") from None
    return tmp


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Replace `out_dir` with `tmp`; the old export is removed only once the new one is in place, and is put
    back if the new one cannot be (a one-line UserError)."""
    remove_stale_temps(out_dir)
    old = temp_path(out_dir, "old") if out_dir.exists() else None
    try:
        if old is not None:
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    except OSError as err:
        kept = ""
        if old is not None and old.exists() and not out_dir.exists():
            try:
                os.replace(old, out_dir)
            except OSError:
                kept = f"; the previous export is in {old}"
        raise UserError(f"{out_dir}: cannot replace it ({err.strerror}){kept}; choose a writable --output") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _attention_shape(model: torch.nn.Module) -> tuple[int, int]:
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and getattr(cfg, "num_attention_heads", None):
            return int(cfg.num_attention_heads), int(cfg.hidden_size)
    return 0, 0  # onnxruntime detects them from the graph


def _write_graph(run: Run, example: dict[str, torch.Tensor], dst: Path, optimize: bool, int8: bool = False) -> tuple[GraphSpec, dict[str, int]]:
    """Export the run's model (its int8 form with `int8`) to `dst`, graph-optimised with `optimize`; returns
    the graph's spec and the fused-operator counts."""
    cfg, family = run.cfg, run.family
    raw = dst.with_name(f"{dst.stem}.unoptimized.onnx") if optimize else dst
    arch = getattr(cfg.model, "arch", None)
    spec = export_graph(run.model, family.name, arch, example, run.labels.multi_label, raw, cfg.model.max_length, int8)
    check_model(raw)
    fused: dict[str, int] = {}
    if optimize:
        log.info("optimising the graph")
        if family.name == "encoder":
            heads, hidden = _attention_shape(run.model)
            fused = optimize_transformer(raw, dst, heads, hidden)
        else:
            fused = optimize_generic(raw, dst)
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
    tmp = _prepare_tmp(dest)
    try:
        run = load_run(path)
        texts, pairs, y, source = parity_sample(run, data, samples)
        record = _export_into(run, tmp, dest, texts, pairs, y, source, int8, optimize, batch_size, progress)
        _move_into_place(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    record["directory"] = str(out_dir)
    return record


def _export_into(
    run: Run,
    tmp: Path,
    out_dir: Path,
    texts: list[str],
    pairs: list[str] | None,
    y: np.ndarray | None,
    source: str,
    int8: bool,
    optimize: bool,
    batch_size: int,
    progress: bool,
) -> dict[str, Any]:
    cfg, labels, family = run.cfg, run.labels, run.family
    multi, threshold = labels.multi_label, cfg.evaluation.threshold
    torch_pred = Predictor(run.model, run.tokenizer, family, cfg, labels, batch_size=batch_size)

    # Example batch for the exporter: two real texts of different lengths, so padding is in the trace.
    by_len = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    pick = [by_len[0], by_len[-1]] if len(texts) > 1 else [0, 0]
    example = make_collator(family, run.tokenizer, cfg, multi)(
        torch_pred._encode([texts[i] for i in pick], [pairs[i] for i in pick] if pairs else None)
    )
    fp32 = tmp / FP32_FILE
    log.info("exporting the %s graph (dynamic batch and sequence axes)", cfg.model.family)
    write = functools.partial(_write_graph, run, example, optimize=optimize)
    spec, fused = write(fp32)
    record: dict[str, Any] = {
        "format_version": 1,
        "files": {"fp32": FP32_FILE},
        "default": "fp32",
        "inputs": spec.inputs,
        "outputs": OUTPUTS,
        "layout": spec.layout,
        # Padding of the onnx backend's own (torch-free) batches: the tokenizer's pad id and side.
        "pad_id": int(run.tokenizer.pad_token_id or 0) if family.name == "encoder" else 0,
        "padding_side": getattr(run.tokenizer, "padding_side", "right"),
        "probabilities": "sigmoid" if multi else "softmax",
        "labels": list(labels.names),
        "family": cfg.model.family,
        "exporter": spec.exporter,
        "opset": spec.opset,
        "optimized": optimize,
        "fused_operators": fused,
    }
    log.info("parity check on %d texts (%s)", len(texts), source)
    ref = torch_pred.predict_proba(texts, pairs, progress=progress)

    # The onnx side loads its tokenizer exactly as `load_predictor(backend="onnx")` will, so the parity
    # check covers the torch-free encoding path too.
    onnx_tokenizer, onnx_family = load_tokenizer(cfg, run.path, record)

    def onnx_probs(file: str, variant: str) -> np.ndarray:
        pred = OnnxPredictor(make_session(tmp / file), onnx_tokenizer, onnx_family, cfg, labels, record, batch_size, variant)
        return pred.predict_proba(texts, pairs, progress=progress)

    p32 = onnx_probs(FP32_FILE, "fp32")
    parity: dict[str, Any] = {
        "samples": len(texts),
        "source": source,
        "fp32_max_abs_diff": float(np.abs(p32 - ref).max()),
        "fp32_tolerance": FP32_TOLERANCE,
        "fp32_agreement": _agreement(ref, p32, multi, threshold),
        "torch_accuracy": _accuracy(ref, y, multi, threshold),
    }
    sizes = {"fp32": _size_mb(fp32)}
    if int8:
        log.info("quantising to int8")
        if quantizes_itself(run.model):  # fastText: per-row int8 table, exported by the model itself
            record["quantization"] = write(tmp / INT8_FILE, int8=True)[0].quantization
        else:
            record["quantization"] = quantize_int8(fp32, tmp / INT8_FILE)
        record["files"]["int8"] = INT8_FILE
        sizes["int8"] = _size_mb(tmp / INT8_FILE)
        p8 = onnx_probs(INT8_FILE, "int8")
        acc8 = _accuracy(p8, y, multi, threshold)
        parity.update(
            int8_max_abs_diff=float(np.abs(p8 - ref).max()),
            int8_agreement=_agreement(ref, p8, multi, threshold),
            int8_accuracy=acc8,
            int8_accuracy_change=None if acc8 is None else acc8 - parity["torch_accuracy"],
        )
        record["default"] = "int8"
    record["parity"] = parity
    record["size_mb"] = sizes
    record["graph"] = describe(fp32)
    write_json(tmp / PARITY_FILE, parity)
    if parity["fp32_max_abs_diff"] > FP32_TOLERANCE:
        failed = out_dir.with_name(f"{out_dir.name}-failed")
        if failed.exists() and not _is_ours(failed, PARITY_FILE, "fp32_max_abs_diff"):  # someone else's: kept
            failed = failed.with_name(f"{failed.name}-{secrets.token_hex(4)}")
        _move_into_place(tmp, failed)
        raise UserError(
            f"export failed the parity check: fp32 max |delta probability| {parity['fp32_max_abs_diff']:.2e} > "
            f"{FP32_TOLERANCE:.0e} vs PyTorch on {len(texts)} texts; files and {PARITY_FILE} left in {failed}, not used"
        )
    if int8 and parity["int8_agreement"] < INT8_MIN_AGREEMENT:
        log.warning(
            "int8 agrees with PyTorch on only %.2f%% of %d texts (< %.0f%%); consider the fp32 model (variant fp32)",
            100 * parity["int8_agreement"], len(texts), 100 * INT8_MIN_AGREEMENT,
        )
    write_json(tmp / EXPORT_FILE, record)  # last: its presence marks a finished export
    return record
