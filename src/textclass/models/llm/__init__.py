"""The llm family (importing it registers `model.family: llm`)."""

from textclass.models.llm.family import LLMFamily, LLMModel

__all__ = ["LLMFamily", "LLMModel"]
