"""A small Transformer encoder classifier.

Embedding (projected to `hidden_size` when `embedding_dim` differs) + positional encoding (sinusoidal,
Vaswani et al. 2017, or learned) -> `nn.TransformerEncoder` (batch_first, pre-norm, GELU) with
`src_key_padding_mask` so no token attends to padding -> masked mean pooling -> dropout -> linear.
Pre-norm trains more stably from scratch without a warmup-sensitive post-norm stack.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from textclass.models.small.common import DropoutHead, MaskedPool, TokenEmbedding


def sinusoidal_table(length: int, dim: int) -> torch.Tensor:
    """The (length, dim) sine/cosine table of Vaswani et al."""
    pos = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return table


class TransformerClassifier(DropoutHead, nn.Module):
    """Transformer encoder + masked mean pooling."""

    def __init__(
        self,
        vocab_size: int,
        num_labels: int,
        dim: int,
        hidden_size: int,
        num_layers: int,
        num_heads: int,
        max_length: int,
        positional: str,
        dropout: float,
    ) -> None:
        super().__init__()
        self.embedding = TokenEmbedding(vocab_size, dim)
        self.proj = nn.Linear(dim, hidden_size) if dim != hidden_size else nn.Identity()
        if positional == "learned":
            self.position = nn.Parameter(torch.randn(max_length, hidden_size) * 0.02)
        else:  # saved with the weights (small), so loading can build the module on the meta device
            self.register_buffer("position", sinusoidal_table(max_length, hidden_size))
        layer = nn.TransformerEncoderLayer(
            hidden_size,
            num_heads,
            dim_feedforward=4 * hidden_size,
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers, norm=nn.LayerNorm(hidden_size), enable_nested_tensor=False)
        self.pool = MaskedPool("mean", hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.embedding(input_ids, attention_mask))
        x = self.dropout(x + self.position[: x.size(1)])
        x = self.encoder(x, src_key_padding_mask=~attention_mask.bool())
        return self.head(self.pool(x, attention_mask))
