"""Tokenizers and vocabularies of the small model family (fastText, TextCNN, RNNs, small Transformer)."""

from textclass.text.tokenizers import TextTokenizer, cjk_share, resolve_kind
from textclass.text.vocab import PAD, PAD_ID, SEP, SEP_ID, SPECIALS, UNK, UNK_ID, Vocab, load_word2vec

__all__ = [
    "PAD",
    "PAD_ID",
    "SEP",
    "SEP_ID",
    "SPECIALS",
    "UNK",
    "UNK_ID",
    "TextTokenizer",
    "Vocab",
    "cjk_share",
    "load_word2vec",
    "resolve_kind",
]
