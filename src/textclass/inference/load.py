"""The one way to open a run directory for prediction, with either backend."""

from __future__ import annotations

from pathlib import Path

from textclass.errors import UserError
from textclass.inference.predictor import BasePredictor

BACKENDS = ("auto", "onnx", "torch")


def load_predictor(
    run_dir: str | Path,
    batch_size: int = 32,
    threads: int | None = None,
    backend: str = "auto",
    variant: str | None = None,
) -> BasePredictor:
    """A predictor for a run directory.

    `backend`: `torch` (the PyTorch weights), `onnx` (the file `textclass export` wrote; error if there is
    none) or `auto` (onnx when the run directory has an export, else torch). Both give the same
    probabilities (the export's parity check holds them within 1e-4; an int8 export is within its
    reported agreement). `variant` (`fp32` or `int8`) picks one ONNX file when both were exported; by
    default the export's recorded default is used. `threads` caps the intra-op threads of either backend.
    """
    from textclass.inference.onnx_backend import has_export, load_onnx_predictor, onnx_available
    from textclass.rundir import check_run_dir

    if backend not in BACKENDS:
        raise UserError(f"backend: unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if threads is not None and threads < 1:
        raise UserError(f"threads: {threads} must be a positive number of threads")
    if batch_size < 1:
        raise UserError(f"batch_size: {batch_size} must be at least 1 text per batch")
    path = check_run_dir(run_dir)
    if backend != "torch":
        if backend == "onnx" and not has_export(path):
            raise UserError(f"{path}: no ONNX export in this run directory; run `textclass export --model {path}` first")
        if has_export(path) and (backend == "onnx" or onnx_available()):  # auto without onnxruntime: torch
            return load_onnx_predictor(path, batch_size=batch_size, threads=threads, variant=variant)
    import torch

    from textclass.inference.predictor import Predictor
    from textclass.rundir import load_model

    if threads:
        torch.set_num_threads(threads)
    return Predictor(load_model(path), batch_size=batch_size)
