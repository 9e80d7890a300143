"""The `small` model family (fastText, TextCNN, TextRNN, TextRCNN, Transformer); importing registers it."""

from textclass.models.small.family import SmallFamily

__all__ = ["SmallFamily"]
