"""fastText for classification (Joulin et al. 2016, "Bag of Tricks for Efficient Text Classification").

A text is the *mean* of the embeddings of its features, followed by one linear layer; no hidden layer, no
nonlinearity. Features are:

- each word in the vocabulary: its own row (rows 0 .. V-1, shared layout with the other small models),
- word n-grams for n = 2 .. `word_ngrams`: hashed into `buckets` rows after the vocabulary,
- character n-grams of `<word>` (boundary markers as fastText), lengths `minn` .. `maxn`: the same buckets.

Hashing follows fastText's `dictionary.cc` exactly: FNV-1a 32-bit over UTF-8 bytes with fastText's
sign-extension of bytes >= 0x80, word hashes kept as signed 32-bit ints, n-gram hashes combined as
`h = h * 116049371 + hash(next word)` in 64-bit arithmetic, bucket = h mod `buckets`. Python's built-in
`hash()` is salted per process and would give different ids after a restart, so it is never used.

Where fastText drops out-of-vocabulary words (keeping only their character n-grams), we give them the
shared `<unk>` row, which also gives an empty text one feature. As in fastText, no buckets are allocated
when neither word nor character n-grams are used.

`nn.EmbeddingBag(mode="mean")` reads a flat id tensor plus per-text offsets, so there is no padding at all.
The model returns logits: single-label training applies softmax cross-entropy and multi-label one-vs-all
sigmoid BCE, both in the shared loss factory. Memory: (V + buckets) x dim float32 values, e.g. 2,050,003 x
128 x 4 B = 1.05 GB at the defaults (plus the same again for gradients and twice for Adam's moments).
"""

from __future__ import annotations

from functools import lru_cache
from itertools import chain
from typing import Any

import numpy as np
import torch
from torch import nn

from textclass.text.vocab import SPECIALS

_FNV_OFFSET = 2166136261
_FNV_PRIME = 16777619
_NGRAM_MULT = 116049371
_U32 = 0xFFFFFFFF


@lru_cache(maxsize=1 << 20)
def fnv1a_32(text: str) -> int:
    """fastText's string hash: FNV-1a 32-bit over UTF-8 bytes, bytes >= 0x80 sign-extended as int8."""
    h = _FNV_OFFSET
    for byte in text.encode("utf-8"):
        h = ((h ^ (byte if byte < 0x80 else byte | 0xFFFFFF00)) * _FNV_PRIME) & _U32
    return h


def uses_buckets(word_ngrams: int, maxn: int) -> bool:
    """fastText allocates hash buckets only when some n-gram feature exists."""
    return word_ngrams > 1 or maxn > 0


def word_ngram_buckets(tokens: list[str], n: int, buckets: int) -> list[int]:
    """Bucket ids (0 .. buckets-1) of all word n-grams with 2 <= length <= n, in fastText's order."""
    return batch_word_ngram_buckets([tokens], n, buckets)[0].tolist()


def batch_word_ngram_buckets(token_lists: list[list[str]], n: int, buckets: int) -> list[np.ndarray]:
    """`word_ngram_buckets` for many texts at once, vectorised with numpy over all their tokens.

    Row i of a (tokens, n-1) grid holds the n-grams starting at token i (lengths 2 .. n), so reading the
    valid cells row by row gives fastText's order. numpy's uint64 arithmetic wraps modulo 2**64 exactly
    as fastText's `uint64_t` does. A Python loop over every token was most of fastText's tokenising time.
    """
    lengths = np.fromiter((len(t) for t in token_lists), dtype=np.int64, count=len(token_lists))
    total = int(lengths.sum())
    if n < 2 or total == 0:
        return [np.zeros(0, dtype=np.int64) for _ in token_lists]
    # fastText keeps word hashes as int32 and widens them to uint64 by sign extension.
    words = np.fromiter((fnv1a_32(t) for t in chain.from_iterable(token_lists)), dtype=np.uint32, count=total)
    hashes = words.view(np.int32).astype(np.int64).view(np.uint64)
    starts = np.cumsum(lengths) - lengths
    remaining = np.repeat(starts + lengths, lengths) - np.arange(total)  # tokens from i to its text's end
    grid = np.empty((total, n - 1), dtype=np.uint64)
    current = hashes.copy()
    following = np.zeros_like(hashes)
    for k in range(1, n):
        following[:] = 0
        following[: total - k] = hashes[k:]
        current = current * np.uint64(_NGRAM_MULT) + following
        grid[:, k - 1] = current % np.uint64(buckets)
    valid = remaining[:, None] > np.arange(1, n)[None, :]
    flat = grid[valid].astype(np.int64)
    per_text = sum(np.maximum(lengths - k, 0) for k in range(1, n))  # a text of L tokens has L - k (k+1)-grams
    return np.split(flat, np.cumsum(per_text)[:-1])


@lru_cache(maxsize=1 << 18)
def char_ngram_buckets(word: str, minn: int, maxn: int, buckets: int) -> tuple[int, ...]:
    """Bucket ids of the character n-grams of `<word>` (single boundary characters are skipped)."""
    w = f"<{word}>"
    out = []
    for i in range(len(w)):
        for n in range(max(minn, 1), maxn + 1):
            if i + n > len(w):
                break
            if n == 1 and (i == 0 or i + n == len(w)):
                continue
            out.append(fnv1a_32(w[i : i + n]) % buckets)
    return tuple(out)


def hashed_features(
    tokens: list[str], vocab_size: int, word_ngrams: int, minn: int, maxn: int, buckets: int
) -> list[int]:
    """Embedding rows of the n-gram features of one text: `vocab_size + bucket id`."""
    return batch_hashed_features([tokens], vocab_size, word_ngrams, minn, maxn, buckets)[0]


def batch_hashed_features(
    token_lists: list[list[str]], vocab_size: int, word_ngrams: int, minn: int, maxn: int, buckets: int
) -> list[list[int]]:
    """`hashed_features` of many texts: word n-grams first, then each word's character n-grams."""
    if not uses_buckets(word_ngrams, maxn):
        return [[] for _ in token_lists]
    words = batch_word_ngram_buckets(token_lists, word_ngrams, buckets)
    out = []
    for tokens, ids in zip(token_lists, words):
        row = (ids + vocab_size).tolist()
        if maxn > 0:
            for t in tokens:
                if t not in SPECIALS:
                    row.extend(vocab_size + b for b in char_ngram_buckets(t, minn, maxn, buckets))
        out.append(row)
    return out


def collate_bags(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Flat ids + offsets for EmbeddingBag.

    `offsets` comes first on purpose: Hugging Face's `find_batch_size` takes the first tensor's length
    as the batch size, and the flat `input_ids` is as long as all features together.
    """
    lengths = [len(f["input_ids"]) for f in features]
    # One pass through numpy: `torch.tensor` on a flat Python list was 1/5 of a fastText training step.
    flat = np.fromiter(chain.from_iterable(f["input_ids"] for f in features), dtype=np.int64, count=sum(lengths))
    offsets = np.zeros(len(features), dtype=np.int64)
    np.cumsum(lengths[:-1], out=offsets[1:])
    return {"offsets": torch.from_numpy(offsets), "input_ids": torch.from_numpy(flat)}


class FastText(nn.Module):
    """Mean of feature embeddings -> linear layer -> logits."""

    def __init__(self, vocab_size: int, num_labels: int, dim: int, buckets: int, sparse: bool = False) -> None:
        """`sparse=True` gives sparse embedding gradients (the Trainer gives them row-wise AdaGrad, see training/optim.py):
        with 2M buckets a dense Adam step touches all 256M values, a sparse one only the rows in the batch."""
        super().__init__()
        self.vocab_size = vocab_size
        # fastText's initialisation: inputs uniform in +-1/dim (built directly, not after a default init
        # that would cost a second pass over a ~1 GB matrix), output layer zero.
        weight = torch.empty(vocab_size + buckets, dim).uniform_(-1.0 / dim, 1.0 / dim)
        self.embedding = nn.EmbeddingBag(vocab_size + buckets, dim, mode="mean", sparse=sparse, _weight=weight)
        self.fc = nn.Linear(dim, num_labels)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, input_ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embedding(input_ids, offsets))
