"""TextCNN (Kim 2014, "Convolutional Neural Networks for Sentence Classification").

Embedding -> parallel 1-D convolutions of several widths -> ReLU -> max over time -> dropout -> linear.

Padding invariance: each sequence is right-padded inside the model by `width - 1` zero vectors, so a
window exists for every real start position, even for texts shorter than the widest filter; windows
that start on padding are set to -inf before the max. A text therefore sees exactly the same windows
alone and in a batch with longer texts.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from textclass.models.small.common import DropoutHead, MaskedPool, TokenEmbedding


class TextCNN(DropoutHead, nn.Module):
    """Kim's CNN; `filter_sizes` widths with `num_filters` maps each."""

    def __init__(
        self, vocab_size: int, num_labels: int, dim: int, filter_sizes: list[int], num_filters: int, dropout: float
    ) -> None:
        super().__init__()
        self.embedding = TokenEmbedding(vocab_size, dim)
        self.convs = nn.ModuleList(nn.Conv1d(dim, num_filters, k) for k in filter_sizes)
        self.pool = MaskedPool("max", num_filters * len(filter_sizes))
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(num_filters * len(filter_sizes), num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.embedding(input_ids, attention_mask)).transpose(1, 2)  # (batch, dim, time)
        # Window t covers tokens t .. t+k-1; padding on the right keeps one output per input position.
        maps = [F.relu(conv(F.pad(x, (0, conv.kernel_size[0] - 1)))) for conv in cast("Iterable[nn.Conv1d]", self.convs)]
        features = torch.cat(maps, dim=1).transpose(1, 2)  # (batch, time, filters)
        return self.head(self.pool(features, attention_mask))
