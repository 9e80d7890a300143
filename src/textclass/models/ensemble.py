"""K models as one: the model object of a k-fold run (`training.kfold`).

A k-fold run trains K models of one family on K folds of the data, all with the same config, so they
share one tokenizer and one way of encoding and padding texts (training checks that the tokenizers are
identical). `EnsembleModel` therefore encodes with its first member and runs one batch through an
`EnsembleNetwork` holding the K networks. Its "logits" are chosen so that the usual `probabilities()`
turns them into the mean of the members' probabilities:

- single-label: log(mean of the softmaxes); the softmax of that is the mean itself (it sums to 1),
- multi-label: logit(mean of the sigmoids), the mean clipped to [EPS, 1 - EPS] so the logit is finite.

So the predictor, `evaluate`, `serve` and the ONNX exporter (one graph holding the K networks) take it like
any other model object and none of them needs to know it is an ensemble. It is read, never trained or
saved: the folds are ordinary run directories (`rundir.load_model_parts` reads them and calls `of`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from textclass.config import Config
from textclass.data.labels import LabelSet
from textclass.errors import UserError
from textclass.models.base import OnnxSpec, TextModel, probabilities

# Multi-label means are clipped to [EPS, 1 - EPS] before the logit: sigmoid(logit(p)) then gives p back to
# within EPS (fp32 resolves 1 - 1e-6 well enough), instead of an infinite logit for a mean of exactly 0 or 1.
EPS = 1e-6


class EnsembleNetwork(nn.Module):
    """The K networks on one batch; returns logits whose probabilities are the mean of theirs."""

    def __init__(self, members: list[nn.Module], multi_label: bool) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.multi_label = multi_label
        # An int8 export form that quantised itself (fastText) says how; the ensemble's is its members'.
        quantization = [getattr(m, "quantization", None) for m in members]
        if any(q is not None for q in quantization):
            self.quantization = {"members": quantization}

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        return mean_logits([m(**batch) for m in self.members], self.multi_label)


def mean_logits(logits: list[torch.Tensor], multi_label: bool) -> torch.Tensor:
    """Logits whose probabilities are the mean of the given logits' probabilities (see the module docstring)."""
    mean = torch.stack([probabilities(x, multi_label) for x in logits]).mean(0)
    if multi_label:
        mean = mean.clamp(EPS, 1.0 - EPS)
        return torch.log(mean) - torch.log(1.0 - mean)
    return torch.log(mean.clamp_min(torch.finfo(mean.dtype).tiny))  # a class every member rules out: finite


@dataclass(eq=False)
class EnsembleModel(TextModel):
    """A k-fold run's K fold models as one model object (see the module docstring)."""

    members: list[TextModel] = field(default_factory=list)

    @classmethod
    def of(cls, members: list[TextModel], cfg: Config, labels: LabelSet) -> EnsembleModel:
        """The ensemble of loaded fold models; members read without their network give one without a network
        (all that the ONNX backend needs to encode texts)."""
        first = members[0]
        has_network = any(True for _ in first.network.parameters())
        network = EnsembleNetwork([m.network for m in members], labels.multi_label) if has_network else nn.Module()
        return cls(first.family, network.eval(), first.tokenizer, labels, cfg, members)

    @property
    def first(self) -> TextModel:
        return self.members[0]

    # -- texts to batches: the members share one tokenizer ---------------------------------------------------
    def encode(self, texts: list[str], pairs: list[str] | None) -> dict[str, list]:
        return self.first.encode(texts, pairs)

    def _pad(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return self.first._pad(features)

    # -- persistence --------------------------------------------------------------------------------------
    def save_weights(self, run_dir: Path) -> None:
        raise UserError("a k-fold ensemble is written fold by fold by `textclass train`; it cannot be saved as one model")

    def parameter_counts(self) -> tuple[int, int]:
        counts = [m.parameter_counts() for m in self.members]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)

    def prepare_surgery(self) -> None:
        raise UserError(
            "a k-fold run is K models: prune (or build a student from) one fold's run directory (folds/fold-N), "
            "or distil the ensemble into a student of its own"
        )

    def enable_gradient_checkpointing(self) -> None:
        raise UserError("a k-fold ensemble is not trained as one model; its folds are trained one by one")

    def merge_adapter(self) -> None:
        raise UserError(
            "export --merge: a k-fold run holds one adapter per fold and is not merged into one run directory; "
            "`textclass export` writes its ONNX graph with every fold's adapters merged"
        )

    # -- ONNX: one graph holding every member's export form -----------------------------------------------------
    def onnx_spec(self, sample_batch: dict[str, torch.Tensor]) -> OnnxSpec:
        return self.first.onnx_spec(sample_batch)

    def onnx_module(self, int8: bool = False) -> nn.Module:
        return EnsembleNetwork([m.onnx_module(int8) for m in self.members], self.multi_label).eval()

    @property
    def quantizes_itself(self) -> bool:
        return self.first.quantizes_itself

    @contextlib.contextmanager
    def onnx_trace_context(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for m in self.members:
                stack.enter_context(m.onnx_trace_context())
            yield

    def onnx_fusion(self) -> dict[str, Any] | None:
        """None: the generic graph optimisation. onnxruntime's transformer optimizer assumes one transformer per
        graph (with two BERTs its EmbedLayerNormalization fusion fails on a node name it reuses: a KeyError)."""
        return None if len(self.members) > 1 else self.first.onnx_fusion()

    def onnx_text_encoding(self) -> str:
        return self.first.onnx_text_encoding()
