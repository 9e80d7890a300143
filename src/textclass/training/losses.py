"""The one loss factory.

Models return logits; the loss is chosen here from the label set: softmax cross-entropy for single-label,
binary cross-entropy with logits (one-vs-all) for multi-label, each with optional class weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import nn

from textclass.errors import UserError


def balanced_weights(labels: np.ndarray, num_labels: int, multi_label: bool) -> list[float]:
    """Inverse-frequency weights (sklearn's 'balanced' formula); for multi-label, BCE pos_weight = neg/pos."""
    if multi_label:
        pos = labels.sum(0)
        neg = len(labels) - pos
        return (neg / np.clip(pos, 1, None)).astype(float).tolist()
    counts = np.bincount(labels, minlength=num_labels)
    return (len(labels) / (num_labels * np.clip(counts, 1, None))).astype(float).tolist()


def make_loss(
    multi_label: bool,
    num_labels: int,
    class_weights: Literal["none", "balanced"] | Sequence[float],
    train_labels: np.ndarray | None = None,
) -> nn.Module:
    """Build the training loss. Weights are fixed here, once, and never recomputed per batch."""
    weights: list[float] | None = None
    if class_weights == "balanced":
        assert train_labels is not None
        weights = balanced_weights(train_labels, num_labels, multi_label)
    elif not isinstance(class_weights, str):
        weights = [float(w) for w in class_weights]
        if len(weights) != num_labels:
            raise UserError(f"training.class_weights: {len(weights)} weights given for {num_labels} labels; give one per label")
    w = torch.tensor(weights, dtype=torch.float32) if weights is not None else None
    if multi_label:
        return nn.BCEWithLogitsLoss(pos_weight=w)
    return nn.CrossEntropyLoss(weight=w)
