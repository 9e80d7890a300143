"""The model object's network -> ONNX graph, with dynamic batch and sequence axes.

The graph takes int64 inputs named as the family's batches (`input_ids`, `attention_mask`[, `token_type_ids`]
for encoders and the small sequence models; fastText's flat `input_ids` + `offsets`) and returns `logits` and
`probabilities` (softmax, or independent sigmoids for multi-label runs: the probability op is in the graph,
so a plain `onnxruntime.InferenceSession` gives the same scores as `textclass predict`).

Exporter choice: the TorchScript exporter (`dynamo=False`) for everything except the small Transformer. It
traces packed RNNs (`pack_padded_sequence` -> ONNX LSTM/GRU with `sequence_lens`) and fastText's EmbeddingBag
with dynamic axes, exports in about a second, and its BERT graph is the pattern onnxruntime's transformer
optimizer fuses (Attention, SkipLayerNormalization, BiasGelu, EmbedLayerNormalization). The dynamo exporter
fails on the data-dependent packing; the TorchScript trace of `nn.MultiheadAttention` bakes the example's
batch x heads into a Reshape, so the small Transformer goes through `dynamo=True` (torch.export with
symbolic batch/sequence dimensions; needs onnxscript): the model object says so (`OnnxSpec.dynamo`).

A model may provide its own export form (`onnx_module(int8)`): fastText exports only the rows of its hashed
table in use (the dense table was a 990 MB file for bbc-news) and gives its int8 graph itself.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from textclass.models.base import OnnxSpec, TextModel

log = logging.getLogger("textclass")

OPSET = 17  # TorchScript exporter; the dynamo exporter needs >= 18
# LabelEncoder with int64 keys (fastText's row lookup) needs ai.onnx.ml 2; graphs without ml ops don't import it.
CUSTOM_OPSETS = {"ai.onnx.ml": 2}
OUTPUTS = ["logits", "probabilities"]


@dataclass
class GraphSpec:
    """What the exported graph looks like from outside (recorded in export.json)."""

    model: OnnxSpec  # what the model object said: input names, layout, padding
    exporter: str  # "torchscript" or "dynamo"
    opset: int
    quantization: dict[str, Any] | None = None  # how the model quantised itself (`int8=True`)


class _Head(nn.Module):
    """Wrap a model so the graph returns logits and probabilities, inputs in a fixed order.

    The two-argument signature (not **kwargs) is what both exporters need to name inputs.
    """

    def __init__(self, model: nn.Module, names: list[str], multi_label: bool) -> None:
        super().__init__()
        self.model = model
        self.names = names
        self.multi_label = multi_label

    def _out(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = logits.float()
        return logits, torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=-1)

    def forward(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        batch = dict(zip(self.names, (a, b, c), strict=False))  # two or three names: `c` is unused with two
        return self._out(self.model(**batch))


def export_graph(model: TextModel, sample_batch: dict[str, torch.Tensor], path: Path, int8: bool = False) -> GraphSpec:
    """Write the model object's network to `path` as ONNX with dynamic batch/sequence axes.

    The model says what it looks like from outside (`onnx_spec`), which module to trace (`onnx_module`, its
    int8 form with `int8` when it `quantizes_itself`) and under which settings (`onnx_trace_context`).
    """
    spec = model.onnx_spec(sample_batch)
    names = spec.inputs
    module = model.onnx_module(int8=int8)
    quantization = getattr(module, "quantization", None) if int8 else None
    head = _Head(module.eval(), names, model.multi_label).eval()
    args = tuple(sample_batch[n] for n in names)
    export = functools.partial(torch.onnx.export, head, args, str(path), input_names=names, output_names=OUTPUTS)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad(), _quiet():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes: covered by parity
        if spec.dynamo:
            batch_dim = torch.export.Dim("batch")
            seq_dim = torch.export.Dim("sequence", max=int(model.cfg.model.max_length))
            export(
                dynamic_shapes=({0: batch_dim, 1: seq_dim}, {0: batch_dim, 1: seq_dim}),
                opset_version=18,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
            return GraphSpec(spec, "dynamo", 18, quantization)
        if spec.layout == "bags":
            axes = {"input_ids": {0: "features"}, "offsets": {0: "batch"}}
        else:
            axes = {n: {0: "batch", 1: "sequence"} for n in names}
        axes.update({o: {0: "batch"} for o in OUTPUTS})
        with model.onnx_trace_context():
            export(
                dynamic_axes=axes,
                opset_version=OPSET,
                do_constant_folding=True,
                custom_opsets=CUSTOM_OPSETS,
                dynamo=False,
            )
    return GraphSpec(spec, "torchscript", OPSET, quantization)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters print diagnostics to stdout and log optional-op notes ("torchvision is not
    installed"); keep the CLI output to our own lines."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    # The TorchScript exporter's C++ shape-inference notes ("prim::PackPadded ... missing") go straight to
    # file descriptor 2; the parity check is what tells whether the graph is right, so they are dropped.
    # Errors still arrive as Python exceptions with their message.
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
        registration.setLevel(level)


def check_model(path: Path) -> None:
    """onnx's checker on the written file (by path, so models over 2 GB work)."""
    import onnx

    onnx.checker.check_model(str(path))


def describe(path: Path) -> dict[str, Any]:
    """Input/output names and symbolic shapes, as plain onnxruntime users see them."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    # Only the signature is read: no graph rewriting, so none of its warnings (fastText's Loop had one).
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return {
        "inputs": {i.name: {"shape": list(i.shape), "type": i.type} for i in sess.get_inputs()},
        "outputs": {o.name: {"shape": list(o.shape), "type": o.type} for o in sess.get_outputs()},
    }
