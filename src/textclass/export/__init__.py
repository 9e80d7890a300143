"""Export a run directory for fast inference: ONNX (fp32, graph-optimised, int8) with a parity check.

Imports torch and onnx/onnxruntime; only `textclass export` and the API's `export()` load it. Prediction
from an export needs only `textclass.inference.onnx_backend`.
"""

from textclass.export.onnx import FP32_TOLERANCE, INT8_MIN_AGREEMENT, export_onnx

__all__ = ["FP32_TOLERANCE", "INT8_MIN_AGREEMENT", "export_onnx"]
