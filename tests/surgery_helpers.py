"""Helpers shared by the surgery and prune tests: tiny models of other shapes, built on conftest's fixtures."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from textclass.config import build_config
from textclass.data.labels import LabelSet
from textclass.models.registry import get_family

LABELS = LabelSet(["food", "sport", "tech"], multi_label=False)
TEXTS = ["match goal team", "software chip computer phone internet data code robot", "soup", "the recipe of the chef 我爱"]


def widened(folder: Path, out: Path, **config: int) -> Path:
    """A copy of a tiny model folder (its tokenizer) with a freshly initialised network of another shape."""
    from transformers import AutoConfig, AutoModel

    shutil.copytree(folder, out)
    cfg = AutoConfig.from_pretrained(folder)
    for k, v in config.items():
        setattr(cfg, k, v)
    torch.manual_seed(1)
    AutoModel.from_config(cfg).save_pretrained(out)
    return out


def make(folder: Path, family: str = "encoder", **model: object) -> object:
    extra = {"max_length": 48} | ({"finetune": "full", "dropout": 0.0} if family == "llm" else {})
    cfg = build_config({"data": {"train": "x.csv"}, "model": {"family": family, "name": str(folder), **extra, **model}})
    torch.manual_seed(0)
    m = get_family(family).create(cfg, LABELS, [])
    m.network.eval()  # type: ignore[attr-defined]
    return m


def logits(m: object, texts: list[str] = TEXTS) -> torch.Tensor:
    with torch.no_grad():
        batch = m.collate(m.features(texts))  # type: ignore[attr-defined]
        return m.network(**batch)  # type: ignore[attr-defined]
