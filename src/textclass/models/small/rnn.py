"""TextRNN and TextRCNN: bidirectional LSTM/GRU encoders over packed sequences.

Both pack the batch with `pack_padded_sequence`, so the recurrent layers never read a padded position
and the backward direction starts at each text's own last token, not at the end of the batch.

- TextRNN: BiRNN states -> masked max / mean / attention pooling -> dropout -> linear.
- TextRCNN (Lai et al. 2015, "Recurrent Convolutional Neural Networks for Text Classification"): each word
  is represented as [left context; embedding; right context], where the left context of word i is the
  forward state after word i-1 and the right context the backward state after word i+1 (zero at the
  text's edges), then a tanh projection and masked max pooling over time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from textclass.models.small.common import DropoutHead, MaskedPool, PoolMethod, TokenEmbedding, sequence_lengths


class BiRNN(nn.Module):
    """Bidirectional LSTM/GRU over packed sequences; returns (batch, time, 2 * hidden), zeros at padding."""

    def __init__(self, rnn_type: str, input_size: int, hidden_size: int, num_layers: int, dropout: float) -> None:
        super().__init__()
        cls = nn.LSTM if rnn_type == "lstm" else nn.GRU
        self.rnn = cls(
            input_size,
            hidden_size,
            num_layers=num_layers,
            batch_first=True,
            bidirectional=True,
            dropout=dropout if num_layers > 1 else 0.0,
        )

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        packed = pack_padded_sequence(x, sequence_lengths(attention_mask), batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.size(1))
        return out


class TextRNN(DropoutHead, nn.Module):
    """BiLSTM/BiGRU classifier with masked pooling."""

    def __init__(
        self,
        vocab_size: int,
        num_labels: int,
        dim: int,
        hidden_size: int,
        num_layers: int,
        rnn_type: str,
        pooling: PoolMethod,
        dropout: float,
    ) -> None:
        super().__init__()
        self.embedding = TokenEmbedding(vocab_size, dim)
        self.rnn = BiRNN(rnn_type, dim, hidden_size, num_layers, dropout)
        self.pool = MaskedPool(pooling, 2 * hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(2 * hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.rnn(self.dropout(self.embedding(input_ids, attention_mask)), attention_mask)
        return self.head(self.pool(states, attention_mask))


class TextRCNN(DropoutHead, nn.Module):
    """Lai et al.'s recurrent convolutional network."""

    def __init__(
        self,
        vocab_size: int,
        num_labels: int,
        dim: int,
        hidden_size: int,
        num_layers: int,
        rnn_type: str,
        dropout: float,
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.embedding = TokenEmbedding(vocab_size, dim)
        self.rnn = BiRNN(rnn_type, dim, hidden_size, num_layers, dropout)
        self.proj = nn.Linear(2 * hidden_size + dim, hidden_size)
        self.pool = MaskedPool("max", hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        emb = self.dropout(self.embedding(input_ids, attention_mask))
        states = self.rnn(emb, attention_mask)
        fwd, bwd = states[..., : self.hidden_size], states[..., self.hidden_size :]
        # Shift by one word: left context of i = forward state at i-1, right context = backward state at
        # i+1. pad_packed_sequence leaves zeros after each text's end, so the last word's right context is 0.
        left = F.pad(fwd, (0, 0, 1, 0))[:, :-1]
        right = F.pad(bwd, (0, 0, 0, 1))[:, 1:]
        y = torch.tanh(self.proj(torch.cat([left, emb, right], dim=-1)))
        return self.head(self.pool(y, attention_mask))
