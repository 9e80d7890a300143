"""Which attention heads and FFN neurons matter: first-order Taylor scores, and the global choice of what to remove.

Scores follow Michel et al. 2019 ("Are Sixteen Heads Really Better than One?") and TextPruner: a gate of
ones is put on every head (and every FFN neuron), the model's loss on labelled texts is back-propagated,
and a unit's importance is the accumulated |d loss / d gate| over the batches, the first-order estimate of
how much the loss changes when the unit is removed.

The gates sit in forward pre-hooks on the attention output projection (its input is the heads' context
vectors, concatenated; the gate is repeated over each head's `head_size` columns) and on the FFN output
projection (its input is the neurons' activations). Michel et al.'s head mask multiplies head h's
context vector before the output projection, `out = sum_h xi_h W_o^h ctx_h`, so the gradient with respect
to our gate is exactly theirs; transformers' former `head_mask` multiplied the attention probabilities, and
ctx_h is linear in those, so it gives the same gradient too.

Head scores are L2-normalised per layer (Michel et al.), FFN scores are used as they are; both are ranked
across all layers. Grouped-query attention removes query heads in "tiers": the t-th least important head of
every key/value group together, so each group keeps as many query heads as the others.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from textclass.models import surgery
from textclass.models.base import TextModel


@dataclass
class Scores:
    """Per layer: one importance per query head, one per FFN neuron."""

    heads: list[torch.Tensor]
    ffn: list[torch.Tensor]


def _loss(logits: torch.Tensor, labels: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """The model's training loss without weighting: BCE for multi-label, cross-entropy otherwise."""
    if multi_label:
        return nn.functional.binary_cross_entropy_with_logits(logits.float(), labels.float())
    return nn.functional.cross_entropy(logits.float(), labels)


def importance(model: TextModel, batches: Iterable[dict[str, torch.Tensor]]) -> Scores:
    """Accumulated |gradient| of the loss w.r.t. a gate on each head and FFN neuron (see the module docstring).

    The weights are frozen while scoring (only the gates need gradients), dropout is off, and every
    parameter's `requires_grad` is restored afterwards.
    """
    network = model.network
    blocks = surgery.transformer_layers(network)
    gates_h, gates_f, hooks = [], [], []
    for block in blocks:
        layout = surgery.layout_of(block)
        size = surgery.head_size(block.get_submodule(layout.attention))
        g_h = torch.ones(surgery.num_heads(block), requires_grad=True, device=model.device)
        g_f = torch.ones(surgery.ffn_width(block), requires_grad=True, device=model.device)
        hooks.append(block.get_submodule(layout.out).register_forward_pre_hook(_gate(g_h, size)))
        hooks.append(block.get_submodule(layout.ffn_out).register_forward_pre_hook(_gate(g_f, 1)))
        gates_h.append(g_h)
        gates_f.append(g_f)
    acc_h = [torch.zeros_like(g) for g in gates_h]
    acc_f = [torch.zeros_like(g) for g in gates_f]
    trainable = {n: p.requires_grad for n, p in network.named_parameters()}
    was_training = network.training
    network.requires_grad_(False)
    network.eval()
    try:
        for batch in batches:
            labels = batch["labels"].to(model.device)
            inputs = {k: v.to(model.device) for k, v in batch.items() if k != "labels"}
            _loss(network(**inputs), labels, model.multi_label).backward()
            for acc, g in zip(acc_h + acc_f, gates_h + gates_f, strict=True):
                if g.grad is not None:
                    acc += g.grad.abs()
                    g.grad = None
    finally:
        for h in hooks:
            h.remove()
        for n, p in network.named_parameters():
            p.requires_grad_(trainable[n])
        network.train(was_training)
    heads = [a / a.norm().clamp_min(1e-12) for a in acc_h]  # per-layer L2 normalisation (Michel et al.)
    return Scores(heads=[h.cpu() for h in heads], ffn=[a.cpu() for a in acc_f])


def _gate(gate: torch.Tensor, width: int) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], tuple[torch.Tensor, ...]]:
    """A pre-hook multiplying a linear layer's input by `gate`, each entry repeated over `width` columns."""

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return (args[0] * gate.repeat_interleave(width).to(args[0].dtype), *args[1:])

    return hook


def choose(scores: list[torch.Tensor], groups: list[int], remove: int) -> list[list[int]]:
    """Units to KEEP per layer after removing `remove` of the least important, ranked across layers.

    `groups[i]`: layer i's units form this many equal groups that must stay equal (grouped-query attention:
    its key/value heads; 1 otherwise). Units leave in tiers (the t-th least important of every group
    together, scored by their mean); every group keeps at least one unit.
    """
    candidates: list[tuple[float, int, list[int]]] = []
    for layer, (s, g) in enumerate(zip(scores, groups, strict=True)):
        size = len(s) // g
        ranked = [sorted(range(k * size, (k + 1) * size), key=lambda u: float(s[u])) for k in range(g)]
        for tier in range(size - 1):  # the last tier stays: at least one unit per group
            units = [r[tier] for r in ranked]
            candidates.append((float(s[units].mean()), layer, units))
    candidates.sort(key=lambda c: c[0])
    dropped: list[set[int]] = [set() for _ in scores]
    removed = 0
    for _, layer, units in candidates:
        if removed + len(units) <= remove:
            dropped[layer].update(units)
            removed += len(units)
    return [[u for u in range(len(s)) if u not in d] for s, d in zip(scores, dropped, strict=True)]


def head_groups(model: TextModel) -> list[int]:
    """Per layer, how many groups its query heads form (key/value heads with GQA, else 1)."""
    blocks = surgery.transformer_layers(model.network)
    return [surgery.num_heads(b) // surgery.kv_groups(b) if surgery.shares_kv(b) else 1 for b in blocks]
