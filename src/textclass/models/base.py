"""The one model object: network, tokenizer, label set and resolved config, travelling together.

A family builds it (`Family.create`) or reads it from a run directory (`Family.load`). The Trainer,
both predictors, export, serve (and later distillation and pruning) take this object and never its parts,
so none of them needs to know which family it holds: what differs between families is a method here,
overridden by the family's subclass.

Contract: `model.network(**batch)` (a batch from `collate`, without `labels`) returns logits of shape
(batch, num_labels); losses are computed outside by the one loss factory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from textclass.batching import batched_probabilities
from textclass.config import Config
from textclass.data.labels import LabelSet
from textclass.errors import UserError

if TYPE_CHECKING:
    from textclass.models.registry import Family


def probabilities(logits: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """Class probabilities: independent sigmoids (multi-label) or a softmax (single-label), in fp32."""
    logits = logits.float()
    return torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=-1)


@dataclass
class OnnxSpec:
    """How the network looks from outside as an ONNX graph, recorded in export.json.

    `inputs`: graph input names in order; `layout`: `padded` (input_ids + attention_mask [+ token_type_ids])
    or `bags` (fastText's flat ids + offsets); `dynamo`: export through torch.export (modules the
    TorchScript tracer cannot follow); `pad_id`/`padding_side`: how the torch-free backend pads batches.
    """

    inputs: list[str]
    layout: str = "padded"
    dynamo: bool = False
    pad_id: int = 0
    padding_side: str = "right"


@dataclass(eq=False)
class TextModel:
    """A classifier with everything needed to turn texts into logits, and to save itself.

    Subclasses (one per family) implement `encode`, `_pad`, `save_weights` and may override the ONNX hooks.
    """

    family: Family
    network: nn.Module
    tokenizer: Any
    labels: LabelSet
    cfg: Config

    # -- texts to batches ---------------------------------------------------------------------------
    def encode(self, texts: list[str], pairs: list[str] | None) -> dict[str, list]:
        """Unpadded model inputs for a list of texts (and second texts); must include `input_ids`."""
        raise NotImplementedError

    def _pad(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Pad the model inputs of encoded examples into a batch of tensors."""
        raise NotImplementedError

    def features(self, texts: list[str], pairs: list[str] | None = None) -> list[dict[str, Any]]:
        """One dict of model inputs per text (one `encode` call: fast tokenizers batch it)."""
        enc = self.encode([str(t) for t in texts], [str(p) for p in pairs] if pairs is not None else None)
        keys = list(enc)
        return [{k: enc[k][i] for k in keys} for i in range(len(texts))]

    def collate(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """A batch for `network(**batch)`; `labels` (when present) become the loss's targets, `length` is dropped."""
        labels = [f["labels"] for f in features] if "labels" in features[0] else None
        batch = self._pad([{k: v for k, v in f.items() if k not in ("labels", "length")} for f in features])
        if labels is not None:
            batch["labels"] = torch.tensor(np.asarray(labels), dtype=torch.float32 if self.multi_label else torch.long)
        return batch

    # -- forward --------------------------------------------------------------------------------------
    @property
    def multi_label(self) -> bool:
        return self.labels.multi_label

    @property
    def threshold(self) -> float:
        return self.cfg.evaluation.threshold

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    def probabilities(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Probabilities of one collated batch, without gradients, on the network's device."""
        with torch.inference_mode():
            batch = {k: v.to(self.device) for k, v in batch.items() if k != "labels"}
            return probabilities(self.network(**batch), self.multi_label)

    def predict_proba(
        self, texts: list[str], pairs: list[str] | None = None, batch_size: int = 32, progress: bool = False
    ) -> np.ndarray:
        """Probabilities (len(texts), num_labels) in input order, in length-sorted batches, network in eval mode."""
        self.network.eval()
        return batched_probabilities(
            self,
            lambda batch: self.probabilities(batch).cpu().numpy(),
            texts,
            pairs,
            batch_size,
            self.labels.num_labels,
            progress,
        )

    def predict_logits(
        self, texts: list[str], pairs: list[str] | None = None, batch_size: int = 32, progress: bool = False
    ) -> np.ndarray:
        """The network's fp32 logits (len(texts), num_labels) in input order, without gradients, in eval mode
        (what distillation learns from: `probabilities` of them are `predict_proba`)."""
        self.network.eval()

        def forward(batch: dict[str, torch.Tensor]) -> np.ndarray:
            with torch.inference_mode():
                batch = {k: v.to(self.device) for k, v in batch.items() if k != "labels"}
                return self.network(**batch).float().cpu().numpy()

        return batched_probabilities(self, forward, texts, pairs, batch_size, self.labels.num_labels, progress)

    # -- persistence ------------------------------------------------------------------------------------
    def save_weights(self, run_dir: Path) -> None:
        """Write the network and tokenizer into `run_dir` (safetensors, no pickles); config and labels are
        the run directory's (`rundir.write_run`)."""
        raise NotImplementedError

    def parameter_counts(self) -> tuple[int, int]:
        """(all, trainable) parameters."""
        params = list(self.network.parameters())
        return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)

    def replace_tokenizer(self, tokenizer: Any) -> None:
        """Encode with another tokenizer from now on (vocabulary pruning); families that cache what they
        built on the tokenizer drop it here."""
        self.tokenizer = tokenizer

    def prepare_surgery(self) -> None:
        """Make the network plain layers whose every weight the run directory saves, before surgery
        (`models.surgery`) changes them; families that save only part of the network (adapters, a head)
        override this. Nothing to do by default."""

    def enable_gradient_checkpointing(self) -> None:
        """`training.gradient_checkpointing`: recompute the transformer's activations in the backward pass.

        Non-reentrant checkpointing, which also works when the embeddings are frozen (LoRA, head-only)
        without forcing their outputs to require gradients. Families without a Hugging Face transformer refuse it.
        """
        hf: list[Any] = [
            m for m in self.network.modules() if hasattr(m, "gradient_checkpointing_enable") and hasattr(m, "config")
        ][:1]
        if not hf:
            raise UserError(
                f"training.gradient_checkpointing: the {self.family.name} family's networks have no transformer blocks "
                "to checkpoint; set it to false"
            )
        kwargs = {"use_reentrant": False}
        if hasattr(hf[0], "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns
            hf[0].activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            hf[0].gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def merge_adapter(self) -> None:
        """Fold trained adapters into the weights, making the model a full fine-tune (`export --merge`)."""
        raise UserError(f"the {self.family.name} family trains no adapters: there is no adapter to merge")

    # -- ONNX -------------------------------------------------------------------------------------------
    def onnx_spec(self, sample_batch: dict[str, torch.Tensor]) -> OnnxSpec:
        """The graph's inputs, from one collated batch; families with other layouts override this."""
        order = ["input_ids", "attention_mask", "token_type_ids"]
        return OnnxSpec([k for k in order if k in sample_batch])

    def onnx_module(self, int8: bool = False) -> nn.Module:
        """The module the exporter traces (the network itself unless the family has a leaner export form)."""
        if int8:
            raise ValueError("int8 graphs of this model come from onnxruntime's quantisation of the fp32 graph")
        return self.network

    @property
    def quantizes_itself(self) -> bool:
        """True when `onnx_module(int8=True)` gives the int8 graph (else onnxruntime quantises the fp32 one)."""
        return False

    @contextlib.contextmanager
    def onnx_trace_context(self) -> Iterator[None]:
        """Settings the network is traced under, restored afterwards (so the parity check compares against the
        model as users run it): eager attention in any Hugging Face model, the pattern the TorchScript tracer
        follows and onnxruntime's transformer fusion matches. A no-op for networks without one."""
        # duck-typed: any module with both (a PreTrainedModel in practice)
        hf: list[Any] = [m for m in self.network.modules() if hasattr(m, "set_attn_implementation") and hasattr(m, "config")][:1]
        before = [getattr(m.config, "_attn_implementation", None) for m in hf]
        try:
            for m in hf:  # the outermost pretrained model sets it for its submodules
                with contextlib.suppress(ValueError, AttributeError, TypeError):  # no switch: export as is
                    m.set_attn_implementation("eager")
            yield
        finally:
            for m, impl in zip(hf, before, strict=True):
                if impl is not None:
                    with contextlib.suppress(ValueError, AttributeError, TypeError):
                        m.set_attn_implementation(impl)

    def onnx_fusion(self) -> dict[str, Any] | None:
        """Arguments for onnxruntime's transformer optimizer (`model_type`, `num_heads`, `hidden_size`) when the
        graph is one it fuses; None: the generic graph optimisation."""
        return None

    def onnx_text_encoding(self) -> str:
        """How the ONNX backend encodes texts: `tokenizers` (the run's tokenizer.json through the Rust
        `tokenizers` library, no torch) or `family` (this family's own tokenizer and padding)."""
        return "family"
