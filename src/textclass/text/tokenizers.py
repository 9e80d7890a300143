"""Tokenizers of the small family: text -> tokens -> vocabulary ids, saved as one JSON file.

Kinds:
- `word`: the regex `\\w+|[^\\w\\s]` (runs of letters/digits, each other symbol alone, so emoji and
  punctuation are tokens of their own),
- `char`: one token per character, whitespace dropped; the right default for Chinese and Japanese, which
  write no spaces between words,
- `jieba`: Chinese word segmentation (optional dependency: `pip install jieba`),
- `auto`: `char` when most non-space characters of the training texts are CJK, else `word`. The decision
  is taken once, at fit time, and saved, so prediction never re-decides on a different text.

Text pairs are joined as `text <sep> pair`; when the pair does not fit in `max_length`, the longer side
is cut first, so neither text is dropped entirely.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from textclass.errors import UserError
from textclass.text.vocab import SEP, SPECIALS, UNK_ID, Vocab

log = logging.getLogger("textclass")

FORMAT_VERSION = 1
KINDS = ("word", "char", "jieba")

_WORD_RE = re.compile(r"\w+|[^\w\s]")
# Han (incl. extensions and compatibility), kana, Hangul, CJK punctuation and full-width forms.
_CJK_RE = re.compile(
    "[\u2e80-\u2fdf\u3000-\u303f\u3040-\u30ff\u3100-\u312f\u3190-\u31ff\u3400-\u4dbf\u4e00-\u9fff"
    "\uac00-\ud7af\uf900-\ufaff\ufe30-\ufe4f\uff00-\uffef\U00020000-\U0002ffff]"
)


def split_word(text: str) -> list[str]:
    return _WORD_RE.findall(text)


def split_char(text: str) -> list[str]:
    return [c for c in text if not c.isspace()]


def split_jieba(text: str) -> list[str]:
    return [t for t in (w.strip() for w in _jieba().lcut(text)) if t]


_SPLITTERS: dict[str, Callable[[str], list[str]]] = {"word": split_word, "char": split_char, "jieba": split_jieba}


def _jieba() -> Any:
    """Import jieba on first use; it is an optional extra."""
    try:
        import jieba
    except ImportError:
        raise UserError(
            "model.tokenizer=jieba needs the jieba package: pip install jieba (or pip install 'textclass[zh]'), "
            "or use model.tokenizer=char"
        ) from None
    jieba.setLogLevel(logging.WARNING)  # silence its "Building prefix dict" chatter
    return jieba


def cjk_share(texts: Iterable[str | None]) -> float:
    """Share of non-space characters that are CJK, over all texts."""
    cjk = total = 0
    for text in texts:
        text = "" if text is None else str(text)
        total += sum(1 for c in text if not c.isspace())
        cjk += len(_CJK_RE.findall(text))
    return cjk / total if total else 0.0


def resolve_kind(requested: str, texts: list[str]) -> str:
    """The concrete tokenizer kind for `requested` (`auto` looks at the training texts once)."""
    if requested in KINDS:
        return requested
    if requested != "auto":
        raise UserError(f"model.tokenizer: unknown tokenizer {requested!r}; use auto, word, char or jieba")
    share = cjk_share(texts)
    kind = "char" if share > 0.5 else "word"
    log.info("tokenizer auto: %.0f%% of characters are CJK -> %s tokenizer", 100 * share, kind)
    return kind


class TextTokenizer:
    """A splitter plus its vocabulary; what the small family keeps in the run directory."""

    def __init__(self, kind: str, vocab: Vocab, lowercase: bool = True, requested: str | None = None) -> None:
        if kind not in KINDS:
            raise UserError(f"tokenizer kind {kind!r} unknown; use one of {', '.join(KINDS)}")
        if kind == "jieba":
            _jieba()  # fail now, with the install hint, not at the first text
        self.kind = kind
        self.vocab = vocab
        self.lowercase = lowercase
        self.requested = requested or kind
        self._split = _SPLITTERS[kind]

    @classmethod
    def fit(
        cls,
        texts: list[str],
        kind: str = "auto",
        lowercase: bool = True,
        min_freq: int = 1,
        max_vocab: int | None = None,
        *,
        pairs: list[str] | None = None,
    ) -> TextTokenizer:
        """Decide the kind (for `auto`) and build the vocabulary from the training texts.

        A text-pair task passes its second texts as `pairs` (or appended to `texts`): fitted on the first
        column alone, every word found only in the second would be `<unk>`, and the language guess would
        ignore half the data.
        """
        texts = [*texts, *pairs] if pairs else texts
        resolved = resolve_kind(kind, texts)
        tok = cls(resolved, Vocab(list(SPECIALS)), lowercase, kind)
        tok.vocab = Vocab.build((tok.tokenize(t) for t in texts), min_freq=min_freq, max_vocab=max_vocab)
        log.info("vocabulary: %d tokens (%s tokenizer)", len(tok.vocab), resolved)
        return tok

    def tokenize(self, text: str) -> list[str]:
        text = "" if text is None else str(text)
        return self._split(text.lower() if self.lowercase else text)

    def tokens(self, text: str, pair: str | None = None, max_length: int | None = None) -> list[str]:
        """Tokens of one example (a text, or `text <sep> pair`), truncated to `max_length`."""
        a = self.tokenize(text)
        if pair is None:
            return a[:max_length] if max_length else a
        b = self.tokenize(pair)
        if max_length:
            la, lb = _fit_pair(len(a), len(b), max_length - 1)
            a, b = a[:la], b[:lb]
        joined = [*a, SEP, *b]
        return joined[:max_length] if max_length else joined

    def encode(self, text: str, pair: str | None = None, max_length: int | None = None) -> list[int]:
        """Vocabulary ids of one example; never empty (an empty text is a single `<unk>`)."""
        return self.vocab.ids(self.tokens(text, pair, max_length)) or [UNK_ID]

    # -- persistence: JSON only --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "textclass-small-tokenizer",
            "version": FORMAT_VERSION,
            "kind": self.kind,
            "requested": self.requested,
            "lowercase": self.lowercase,
            "vocab": self.vocab.tokens,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "tokenizer") -> TextTokenizer:
        try:
            return cls(data["kind"], Vocab(list(data["vocab"])), bool(data["lowercase"]), data.get("requested"))
        except (KeyError, TypeError):
            raise UserError(f"{source}: not a textclass small-model tokenizer (missing kind/vocab/lowercase)") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> TextTokenizer:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"{p}: tokenizer file missing; the run directory is incomplete, train again")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{p}: not valid JSON; the run directory is damaged") from None
        return cls.from_dict(data, str(p))

    @property
    def name_or_path(self) -> str:
        """A fingerprint of the tokenizer's state; the trainer's tokenization cache keys on this name."""
        blob = json.dumps(self.to_dict(), ensure_ascii=False, sort_keys=True).encode()
        return f"textclass-small-{hashlib.sha256(blob).hexdigest()[:16]}"


def _fit_pair(la: int, lb: int, budget: int) -> tuple[int, int]:
    """Lengths of both sides after cutting the longer one first until they fit in `budget`."""
    budget = max(budget, 0)
    if la + lb <= budget:
        return la, lb
    a = min(la, max(budget // 2, budget - lb))
    return a, min(lb, budget - a)
