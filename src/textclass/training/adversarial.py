"""Adversarial training for every family: FGM, PGD and FreeLB on the input embeddings, AWP on the weights.

FGM, PGD and FreeLB add their perturbation to the embedding layer's *output* through a forward hook, never
into the embedding weights: nothing has to be restored (so nothing can be restored wrongly), it works when
the embeddings are frozen (LoRA) or sparse (fastText's bags), and only the tokens of the batch move. AWP
perturbs the weights themselves and copies the saved values back in a `finally` block, bit for bit.

Every method keeps the clean gradient: a step's gradient is a mean of passes that includes the clean one,
each pass backpropagated by the Trainer's own `training_step` (gradient accumulation, clipping, mixed
precision stay the Trainer's), and the Trainer steps the optimizer once, as usual. With epsilon 0 every
pass is the clean pass, so the update equals plain training. Probing passes (PGD's and AWP's inner ascent
steps) take the gradient of the perturbation only (`torch.autograd.grad`), so they leave `.grad` alone.

We write these by hand: no well-kept library implements them for Hugging Face models (the competition
notebooks copy the same ~40 lines, with the bugs DESIGN.md lists).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from textclass.errors import UserError

# `step(scale)`: the Trainer's forward + backward of the batch with the loss times `scale`; returns the loss.
Step = Callable[[float], torch.Tensor]
# `loss()`: a forward of the batch, with autograd on, no backward: for probing passes.
Loss = Callable[[], torch.Tensor]


def input_embedding(network: nn.Module) -> nn.Module:
    """The module whose output is the token embeddings: the network's own `embedding_output_module()` when it
    computes them without calling its embedding layer (fastText's sparse path), a Hugging Face model's
    `get_input_embeddings()`, else the network's first embedding layer (the other small models)."""
    own = getattr(network, "embedding_output_module", None)
    if callable(own):
        return own()
    for m in network.modules():
        getter = getattr(m, "get_input_embeddings", None)
        if callable(getter) and isinstance(emb := getter(), nn.Module):
            return emb
    for m in network.modules():
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
            return m
    raise UserError("training.adversarial: this model has no embedding layer to perturb; leave adversarial unset")


def _unit(grad: torch.Tensor) -> torch.Tensor | None:
    """grad / ||grad|| (over the whole batch), or None when the norm is zero or not finite."""
    norm = grad.float().norm()
    return (grad / norm).detach() if norm > 0 and torch.isfinite(norm) else None


def _project(delta: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Back onto the L2 ball of radius epsilon."""
    norm = delta.float().norm()
    return delta * (epsilon / norm) if norm > epsilon else delta


class EmbeddingAttack:
    """What FGM, PGD and FreeLB share: a hook on the embedding layer that adds `delta` to its output and keeps
    that output, so the loss's gradient there (= its gradient with respect to delta) can be read."""

    def __init__(self, embedding: nn.Module, epsilon: float, alpha: float = 0.0, steps: int = 1) -> None:
        self.embedding, self.epsilon, self.alpha, self.steps = embedding, epsilon, alpha, steps
        self.delta: torch.Tensor | None = None
        self.outputs: list[torch.Tensor] = []

    def _hook(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        if self.delta is not None:
            output = output + self.delta
        if not output.requires_grad:  # frozen embeddings (LoRA): the gradient at the output is still needed
            output = output.detach().requires_grad_(True)
        if torch.is_grad_enabled():
            output.retain_grad()
            self.outputs.append(output)  # R-Drop runs two passes per loss: both count
        return output

    @contextlib.contextmanager
    def hooked(self, delta: torch.Tensor | None = None) -> Iterator[None]:
        """One or more passes with the embedding outputs shifted by `delta` (None: the clean pass)."""
        self.delta, self.outputs = delta, []
        handle = self.embedding.register_forward_hook(self._hook)
        try:
            yield
        finally:
            handle.remove()
            self.delta = None

    def backward_grad(self) -> torch.Tensor | None:
        """The gradient at the embedding outputs after the Trainer's backward (summed over the passes)."""
        if not self.outputs:  # the hook never ran: the attack would silently be plain training
            raise RuntimeError(
                f"adversarial training: {type(self.embedding).__name__}'s forward hook never ran; the "
                "network computes its embeddings without calling that module (a textclass bug: report it)"
            )
        grads = [o.grad for o in self.outputs if o.grad is not None]
        self.outputs = []
        return torch.stack(grads).sum(0) if grads and len({g.shape for g in grads}) == 1 else None

    def probe_grad(self, loss: Loss, delta: torch.Tensor) -> torch.Tensor | None:
        """The loss's gradient with respect to the perturbation at `delta`, without touching `.grad`."""
        with self.hooked(delta):
            value = loss()
        outputs, self.outputs = self.outputs, []
        if not outputs or not value.requires_grad:
            return None
        grads = [g for g in torch.autograd.grad(value, outputs, allow_unused=True) if g is not None]
        return torch.stack(grads).sum(0) if grads else None

    def train_step(self, step: Step, loss: Loss) -> torch.Tensor:
        raise NotImplementedError


class FGM(EmbeddingAttack):
    """Fast gradient method (Miyato et al. 2017): one adversarial pass at epsilon * g / ||g||, g the clean
    gradient at the embedding outputs; the step is the mean of the clean and the adversarial pass."""

    def train_step(self, step: Step, loss: Loss) -> torch.Tensor:
        with self.hooked():
            clean = step(0.5)
        grad = self.backward_grad()
        direction = _unit(grad) if grad is not None else None
        # No gradient reached the embeddings: a second clean half, or the step would be halved.
        with self.hooked(None if direction is None else self.epsilon * direction):
            step(0.5)
        return clean


class PGD(EmbeddingAttack):
    """Projected gradient descent (Madry et al. 2018), as the competition recipes use it: `steps` ascent steps
    of size alpha, each projected onto the epsilon ball; the first steps-1 only probe, the last trains.
    The step is the mean of the clean pass and the last adversarial pass (K+1 forward/backward passes)."""

    def train_step(self, step: Step, loss: Loss) -> torch.Tensor:
        with self.hooked():
            clean = step(0.5)
        grad = self.backward_grad()
        delta: torch.Tensor | None = None
        for k in range(self.steps):
            direction = _unit(grad) if grad is not None else None
            if direction is None:
                break
            delta = _project(direction * self.alpha + (0 if delta is None else delta), self.epsilon)
            if k < self.steps - 1:
                grad = self.probe_grad(loss, delta)
        with self.hooked(delta):
            step(0.5)
        return clean


class FreeLB(EmbeddingAttack):
    """FreeLB (Zhu et al. 2020): `steps` passes whose gradients are averaged, the perturbation climbing by
    alpha (projected onto the epsilon ball) between passes. It starts from zero, so the first pass is the
    clean one (the paper's random start would break the epsilon-0 invariant)."""

    def train_step(self, step: Step, loss: Loss) -> torch.Tensor:
        delta: torch.Tensor | None = None
        clean = torch.zeros(())
        for k in range(self.steps):
            with self.hooked(delta):
                value = step(1.0 / self.steps)
            clean = value if k == 0 else clean
            grad = self.backward_grad()
            direction = _unit(grad) if grad is not None and k < self.steps - 1 else None
            if direction is not None:
                delta = _project(direction * self.alpha + (0 if delta is None else delta.detach()), self.epsilon)
        return clean


class AWP:
    """Adversarial weight perturbation (Wu et al. 2020), as the Kaggle recipes use it: after the clean pass,
    each weight matrix moves by alpha * ||W|| * g / ||g|| (`steps` times), clamped to |dW| <= epsilon * |W|;
    the adversarial pass's gradient is added to the clean one (the step is their mean); the weights are
    then copied back exactly. Only dense weight matrices move (not biases, norms or sparse tables)."""

    def __init__(self, network: nn.Module, epsilon: float, alpha: float, steps: int = 1) -> None:
        self.network, self.epsilon, self.alpha, self.steps = network, epsilon, alpha, steps

    def _weights(self) -> list[nn.Parameter]:
        return [p for p in self.network.parameters() if p.requires_grad and p.dim() >= 2 and p.is_floating_point()]

    def train_step(self, step: Step, loss: Loss) -> torch.Tensor:
        weights = self._weights()
        # With gradient accumulation .grad holds earlier micro-batches too: the attack follows this batch's.
        before = {p: p.grad.clone() for p in weights if p.grad is not None and not p.grad.is_sparse}
        clean = step(0.5)
        # Only matrices with a dense gradient move: a sparse one (fastText's table) would be copied whole.
        dense = [(p, g) for p in weights if (g := p.grad) is not None and not g.is_sparse]
        weights = [p for p, _ in dense]
        grads: list[torch.Tensor | None] = [g - before[p] if p in before else g for p, g in dense]
        del before
        saved = [p.detach().clone() for p in weights]
        try:
            for k in range(self.steps):
                self._climb(weights, grads, saved)
                if k < self.steps - 1:
                    grads = self._probe(weights, loss)
            step(0.5)
        finally:
            with torch.no_grad():
                for p, w in zip(weights, saved, strict=True):
                    p.copy_(w)
        return clean

    @torch.no_grad()
    def _climb(self, weights: list[nn.Parameter], grads: list[torch.Tensor | None], saved: list[torch.Tensor]) -> None:
        for p, g, w in zip(weights, grads, saved, strict=True):
            direction = _unit(g) if g is not None else None
            if direction is None:
                continue
            p.add_(self.alpha * w.float().norm() * direction)
            bound = self.epsilon * w.abs()
            p.copy_(torch.minimum(torch.maximum(p, w - bound), w + bound))

    def _probe(self, weights: list[nn.Parameter], loss: Loss) -> list[torch.Tensor | None]:
        value = loss()
        if not value.requires_grad:
            return [None] * len(weights)
        return list(torch.autograd.grad(value, weights, allow_unused=True))


METHODS: dict[str, type[EmbeddingAttack]] = {"fgm": FGM, "pgd": PGD, "freelb": FreeLB}


def make_adversary(method: str, network: nn.Module, epsilon: float, alpha: float, steps: int) -> Any:
    """The object of `training.adversarial` for this network: its `train_step(step, loss)` runs one batch."""
    if method == "awp":
        return AWP(network, epsilon, alpha, steps)
    return METHODS[method](input_embedding(network), epsilon, alpha, steps)
