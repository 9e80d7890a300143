"""Multi-sample dropout (Inoue 2019), shared by every network with a dropout before its head.

While training, the head runs on `samples` dropout masks of the same features and the network returns
all of them, shaped (batch, samples, labels); the trainer's loss is the mean of their losses, as in the
paper (averaging the logits instead would, for a linear head, be one pass with a weaker dropout). In eval
mode dropout is off, every sample is the same, and the network returns (batch, labels) as always, so
inference, export and serving never see the extra axis.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def multisample(
    head: Callable[[torch.Tensor], torch.Tensor], features: torch.Tensor, samples: int, training: bool
) -> torch.Tensor:
    """`head(features)`, or while training with samples > 1 the (batch, samples, labels) stack of its passes."""
    if samples <= 1 or not training:
        return head(features)
    return torch.stack([head(features) for _ in range(samples)], dim=1)
