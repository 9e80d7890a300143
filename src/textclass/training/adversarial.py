"""Adversarial training on the input embeddings (FGM, Miyato et al. 2017), for every family.

The perturbation is added to the embedding layer's *output* through a forward hook, never written into the
embedding weights: nothing has to be restored (so nothing can be restored wrongly), it works when the
embeddings are frozen (LoRA) or sparse (fastText's bags), and only the tokens of the batch are perturbed.

A step is the mean of the clean and the adversarial loss, each backpropagated, so the clean gradient is
kept and with epsilon 0 the update equals plain training exactly. No second optimizer step is taken: the
Trainer steps once after `training_step`, as usual (gradient accumulation, clipping and mixed precision
are the Trainer's).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from textclass.errors import UserError


def input_embedding(network: nn.Module) -> nn.Module:
    """The module whose output is the token embeddings: a Hugging Face model's `get_input_embeddings()`, else
    the network's first embedding layer (small models)."""
    for m in network.modules():
        getter = getattr(m, "get_input_embeddings", None)
        if callable(getter) and isinstance(emb := getter(), nn.Module):
            return emb
    for m in network.modules():
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
            return m
    raise UserError("training.adversarial: this model has no embedding layer to perturb; leave adversarial unset")


class FGM:
    """Fast gradient method: perturb the embedding outputs by epsilon * g / ||g|| (g: the clean loss's
    gradient at those outputs), one adversarial pass per step."""

    def __init__(self, embedding: nn.Module, epsilon: float) -> None:
        self.embedding, self.epsilon = embedding, epsilon
        self.output: torch.Tensor | None = None
        self.delta: torch.Tensor | None = None

    def _hook(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        if self.delta is not None:
            return output + self.delta
        if not output.requires_grad:  # frozen embeddings (LoRA): the gradient at the output is still needed
            output = output.detach().requires_grad_(True)
        output.retain_grad()
        self.output = output
        return output

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """The clean pass: keep the embedding output to read its gradient after backward."""
        with self._hooked():
            yield

    def attack(self) -> bool:
        """Set the perturbation from the clean gradient; False when there is none (zero gradient)."""
        grad = self.output.grad if self.output is not None else None
        self.output = None
        if grad is None:
            return False
        norm = grad.float().norm()
        self.delta = (self.epsilon * grad / norm).detach() if norm > 0 and torch.isfinite(norm) else torch.zeros_like(grad)
        return True

    @contextlib.contextmanager
    def perturbed(self) -> Iterator[None]:
        """The adversarial pass: the embedding outputs shifted by the perturbation (set by `attack`)."""
        try:
            with self._hooked():
                yield
        finally:
            self.delta = None

    @contextlib.contextmanager
    def _hooked(self) -> Iterator[None]:
        """`_hook` on the embedding layer for one pass: it captures (no perturbation set) or perturbs."""
        handle = self.embedding.register_forward_hook(self._hook)
        try:
            yield
        finally:
            handle.remove()
