"""Pieces shared by the small models: one padding helper, one masked pooling, one token embedding.

Every sequence model pools with `MaskedPool`, so "padding never changes a score" is enforced in one
place: padded positions are -inf before a max, weight 0 in a mean, and -inf before the attention softmax.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import nn

from textclass.models.heads import multisample
from textclass.text.vocab import PAD_ID

PoolMethod = Literal["max", "mean", "attention"]


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists into (input_ids, attention_mask), both (batch, longest) int64 tensors.

    Width is at least 1, so even a batch of empty lists gives tensors the models can read.
    """
    width = max([len(s) for s in seqs] + [1])
    # Filled in numpy: rows may be read-only numpy views of the training data (trainer.PackedRows).
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


class MaskedPool(nn.Module):
    """Sequence (batch, time, dim) + mask (batch, time) -> vector (batch, dim), ignoring padding.

    `attention` is additive attention (a learned query scoring tanh(W h)), as in Yang et al. 2016.
    """

    def __init__(self, method: PoolMethod, dim: int) -> None:
        super().__init__()
        self.method = method
        if method == "attention":
            self.proj = nn.Linear(dim, dim)
            self.query = nn.Linear(dim, 1, bias=False)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        valid = mask.bool().unsqueeze(-1)  # (batch, time, 1)
        if self.method == "max":
            pooled = hidden.masked_fill(~valid, float("-inf")).max(dim=1).values
            return torch.where(valid.any(dim=1), pooled, torch.zeros_like(pooled))  # all-padding rows -> 0
        if self.method == "mean":
            weights = valid.to(hidden.dtype)
            return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        scores = self.query(torch.tanh(self.proj(hidden))).masked_fill(~valid, float("-inf"))
        weights = torch.softmax(scores, dim=1).nan_to_num(0.0)  # all-padding rows -> weights 0
        return (hidden * weights).sum(1)


class TokenEmbedding(nn.Embedding):
    """Token embedding whose padding row is zero and stays zero (padding_idx), so pads add nothing.

    Every small model names this `self.embedding`, which is where pretrained vectors are written.
    """

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__(vocab_size, dim, padding_idx=PAD_ID)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        out = super().forward(input_ids)
        if attention_mask is not None:  # explicit zero at padding, even if row 0 was overwritten
            out = out * attention_mask.unsqueeze(-1).to(out.dtype)
        return out


def sequence_lengths(attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-row lengths on the CPU (what `pack_padded_sequence` wants), at least 1."""
    return attention_mask.sum(dim=1).clamp(min=1).to("cpu", torch.long)


class DropoutHead:
    """The small archs' head, dropout then `fc`, with multi-sample dropout (models/heads.py): `samples`
    is set by the family from `model.multisample_dropout`."""

    samples = 1
    training: bool
    dropout: nn.Module
    fc: nn.Module

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return multisample(lambda x: self.fc(self.dropout(x)), features, self.samples, self.training)
