"""NoisyTune (Wu et al., 2022): perturb a pretrained model's weights once before fine-tuning.

Each trained pretrained tensor W gets W + U(-λ/2, λ/2) * std(W). Only weights that train and came with the
checkpoint are perturbed: a new head has nothing to perturb, and noise on frozen weights (a LoRA or
head-only run's base) would stay in the run yet be missing when the run is loaded from its base model, so
such runs refuse it. The noise comes from a generator seeded with the training seed, so a `--resume`
rebuilds the same starting point. No library ships this; it is a few lines.
"""

from __future__ import annotations

import torch
from torch import nn

from textclass.errors import UserError
from textclass.training.trainer import head_parameter_names


def apply_noisytune(network: nn.Module, lam: float, seed: int) -> int:
    """Perturb in place; returns how many tensors were perturbed."""
    # Weights the checkpoint did not bring: `new_parameter_names` (head and adapters) or else the head.
    new_names = getattr(network, "new_parameter_names", None)
    new = set(new_names()) if callable(new_names) else head_parameter_names(network)
    targets = [(n, p) for n, p in network.named_parameters() if p.requires_grad and n not in new and p.numel() > 1]
    if not new or not targets:
        raise UserError(
            "model.noisytune: this run trains no pretrained weights to perturb (a model trained from scratch, a "
            "LoRA or head-only run); use finetune: full or set noisytune to 0"
        )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in targets:
            noise = (torch.rand(p.shape, generator=generator) - 0.5) * lam * p.float().std()
            p.add_(noise.to(p.device, p.dtype))
    return len(targets)
