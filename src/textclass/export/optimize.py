"""Graph optimisation and dynamic int8 quantisation, both done by onnxruntime's own tools.

- Encoders: `onnxruntime.transformers.optimizer.optimize_model` (model_type "bert", which also covers
  RoBERTa/DistilBERT-style graphs): fused Attention, SkipLayerNormalization, (Bias)Gelu,
  EmbedLayerNormalization. The fused-op counts are returned so the export can report what happened.
- Small models: onnxruntime's offline graph optimisation (ORT_ENABLE_EXTENDED: constant folding,
  redundant-node elimination, MatMul+Add and similar fusions), saved to a file.
- int8: `onnxruntime.quantization.quantize_dynamic` (int8 weights, activations quantised per batch at run
  time; no calibration data needed), applied after the graph optimisation so the fused Attention and LSTM
  nodes get their quantised kernels.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("textclass")


@contextlib.contextmanager
def _quiet_root() -> Iterator[None]:
    """onnxruntime's tools log fusion notes at INFO and pre-processing advice at WARNING through their own
    loggers; only errors reach the user (our warnings are emitted after the context)."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def optimize_transformer(src: Path, dst: Path, model_type: str, num_heads: int, hidden_size: int) -> dict[str, int]:
    """Fuse a BERT-like graph; returns the counts of fused operators (all zero means nothing matched)."""
    from onnxruntime.transformers.optimizer import optimize_model

    with _quiet_root():  # the optimizer logs every fusion at INFO through the root logger
        opt = optimize_model(str(src), model_type=model_type, num_heads=num_heads, hidden_size=hidden_size, opt_level=1)
        opt.save_model_to_file(str(dst))
        stats = {k: int(v) for k, v in opt.get_fused_operator_statistics().items() if v}
    if not stats.get("Attention") and not stats.get("MultiHeadAttention"):
        log.warning("graph optimisation: no attention fusion matched this encoder; the graph runs unfused")
    return stats


def optimize_generic(src: Path, dst: Path) -> dict[str, int]:
    """onnxruntime's offline graph optimisation (extended level) for non-transformer graphs."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.log_severity_level = 3
    opts.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
    return {}


def quantize_int8(src: Path, dst: Path) -> dict[str, Any]:
    """Dynamic int8 quantisation of weights (MatMul, Gather, Attention, LSTM/GRU, ...)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Weights QInt8 with activations uint8 is the fast path on VNNI/AVX-512 CPUs and the library default.
    # per_channel: one scale per output column instead of per tensor; on the fine-tuned MiniLM demo it
    # raised top-1 agreement with fp32 from 98.6% to 99.5% (212 validation texts) at the same speed.
    # DefaultTensorType: onnx's shape inference cannot type the outputs of the fused com.microsoft ops
    # (Attention, SkipLayerNormalization); they are float32 in our graphs.
    # The root logger's "consider pre-processing" advice concerns static (calibrated) quantisation; muted.
    with _quiet_root():
        quantize_dynamic(
            str(src),
            str(dst),
            weight_type=QuantType.QInt8,
            per_channel=True,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    return {"weight_type": "int8", "per_channel": True, "method": "onnxruntime.quantization.quantize_dynamic"}
