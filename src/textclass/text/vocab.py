"""Vocabulary of the small family, and word2vec initialisation of its rows.

The vocabulary is a plain list of tokens whose position is the id, so it round-trips through JSON exactly.
Three special tokens come first, at fixed ids, because the models and collators rely on them:

- `<pad>` = 0: the padding id (the collators pad with 0 and the models mask it out),
- `<unk>` = 1: any token not in the vocabulary; an empty text becomes a single `<unk>`, so every model has
  at least one position to pool over,
- `<sep>` = 2: joins the two texts of a text-pair example.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from textclass.errors import UserError

log = logging.getLogger("textclass")

PAD, UNK, SEP = "<pad>", "<unk>", "<sep>"
SPECIALS: tuple[str, ...] = (PAD, UNK, SEP)
PAD_ID, UNK_ID, SEP_ID = 0, 1, 2


class Vocab:
    """Token <-> id mapping with the special tokens at ids 0..2."""

    def __init__(self, tokens: list[str]) -> None:
        if tuple(tokens[: len(SPECIALS)]) != SPECIALS:
            raise UserError(f"vocabulary must start with {', '.join(SPECIALS)}; the tokenizer.json is damaged")
        self.tokens = list(tokens)
        self._index = {t: i for i, t in enumerate(self.tokens)}
        if len(self._index) != len(self.tokens):
            raise UserError("vocabulary has duplicate tokens; the tokenizer.json is damaged")

    @classmethod
    def build(cls, token_lists: Iterable[list[str]], min_freq: int = 1, max_vocab: int | None = None) -> Vocab:
        """Most frequent first, ties alphabetically, so the same texts always give the same ids.

        `max_vocab` caps the ordinary tokens; the special tokens come on top of it.
        """
        counts: Counter[str] = Counter()
        for tokens in token_lists:
            counts.update(tokens)
        for special in SPECIALS:
            counts.pop(special, None)
        kept = sorted((t for t, c in counts.items() if c >= min_freq), key=lambda t: (-counts[t], t))
        if max_vocab is not None:
            kept = kept[:max_vocab]
        return cls(list(SPECIALS) + kept)

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: str) -> bool:
        return token in self._index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.tokens == other.tokens

    def find(self, token: str) -> int | None:
        """The id of `token`, or None when it is not in the vocabulary."""
        return self._index.get(token)

    def ids(self, tokens: list[str]) -> list[int]:
        """Token ids; unknown tokens map to `<unk>`."""
        index = self._index
        return [index.get(t, UNK_ID) for t in tokens]


def load_word2vec(path: str | Path, vocab: Vocab, dim: int, lowercase: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Read a word2vec text file and return (row ids, vectors) for the vocabulary words it contains.

    The first line may be a `count dim` header. An exact match wins over a lowercased one (so `Apple` and
    `apple` do not fight when the vocabulary is case-sensitive); special tokens are never overwritten,
    which keeps the `<pad>` row zero. Streams the file, so a large vector file costs only the found rows.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"model.pretrained_vectors: {p} not found; give a word2vec text file (word v1 v2 ...)")
    found: dict[int, np.ndarray] = {}
    exact: set[int] = set()
    try:
        with p.open(encoding="utf-8", errors="strict") as fh:
            for lineno, line in enumerate(fh, 1):
                parts = line.rstrip().split(" ")
                if lineno == 1 and len(parts) == 2 and all(x.isdigit() for x in parts):
                    continue  # "count dim" header
                if len(parts) < 2:
                    continue  # blank line
                word, values = parts[0], parts[1:]
                if len(values) != dim:
                    raise UserError(
                        f"{p} line {lineno}: vectors have {len(values)} dimensions but model.embedding_dim is "
                        f"{dim}; set model.embedding_dim: {len(values)}"
                    )
                idx = vocab.find(word)
                is_exact = idx is not None
                if idx is None and lowercase:
                    idx = vocab.find(word.lower())
                if idx is None or idx < len(SPECIALS) or idx in exact:
                    continue
                try:
                    found[idx] = np.asarray(values, dtype=np.float32)
                except ValueError:
                    raise UserError(
                        f"{p} line {lineno}: not a number in the vector of {word!r}; is this a word2vec text file?"
                    ) from None
                if is_exact:
                    exact.add(idx)
    except UnicodeDecodeError:
        raise UserError(f"{p}: not UTF-8 text; model.pretrained_vectors must be a word2vec *text* file") from None
    ids = np.fromiter(sorted(found), dtype=np.int64, count=len(found))
    vectors = np.stack([found[i] for i in ids]) if len(ids) else np.zeros((0, dim), dtype=np.float32)
    ordinary = len(vocab) - len(SPECIALS)
    log.info(
        "%s: found vectors for %d of %d vocabulary words (%.1f%%)",
        p,
        len(ids),
        ordinary,
        100 * len(ids) / max(ordinary, 1),
    )
    return ids, vectors
