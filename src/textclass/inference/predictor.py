"""Prediction from a run directory or an in-memory model.

Inputs are tokenized in batches with the family's tokenizer (the fast Rust tokenizers for encoders),
sorted by length into batches so little padding is computed, and the results are returned in the caller's
order. Training-time test evaluation, `textclass evaluate`, `textclass predict` and `Classifier.predict`
all go through `Predictor.predict_proba`, so they cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from textclass.config import Config
from textclass.data.labels import LabelSet
from textclass.models.registry import Collator, Family


def probabilities(logits: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """Class probabilities: independent sigmoids (multi-label) or a softmax (single-label)."""
    logits = logits.float()
    return torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=-1)


def make_collator(family: Family, tokenizer: Any, cfg: Config, multi_label: bool) -> Collator:
    """The family's padding plus the shared handling of `labels` and `length`."""
    inner = family.collator(tokenizer, cfg.model)

    def collate(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        labels = [f.pop("labels") for f in features] if "labels" in features[0] else None
        for f in features:
            f.pop("length", None)
        batch = inner(features)
        if labels is not None:
            batch["labels"] = torch.tensor(labels, dtype=torch.float32 if multi_label else torch.long)
        return batch

    return collate


@dataclass
class Predictor:
    """A loaded model with everything needed to turn texts into class probabilities."""

    model: nn.Module
    tokenizer: Any
    family: Family
    cfg: Config
    labels: LabelSet
    batch_size: int = 32

    def __post_init__(self) -> None:
        self.model.eval()
        self._collate = make_collator(self.family, self.tokenizer, self.cfg, self.labels.multi_label)
        self.device = next(self.model.parameters()).device

    @property
    def threshold(self) -> float:
        return self.cfg.evaluation.threshold

    def _encode(self, texts: list[str], pairs: list[str] | None) -> list[dict[str, Any]]:
        enc = self.family.encode(self.tokenizer, self.cfg.model, texts, pairs)
        keys = list(enc)
        return [{k: enc[k][i] for k in keys} for i in range(len(texts))]

    def _batches(self, features: list[dict[str, Any]]) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor]]]:
        order = np.argsort([-len(f["input_ids"]) for f in features], kind="stable")
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            batch = self._collate([dict(features[i]) for i in idx])
            yield idx, {k: v.to(self.device) for k, v in batch.items()}

    @torch.inference_mode()
    def predict_proba(self, texts: list[str], pairs: list[str] | None = None, progress: bool = False) -> np.ndarray:
        """Probabilities, shape (len(texts), num_labels), in input order."""
        out = np.zeros((len(texts), self.labels.num_labels), dtype=np.float32)
        if not texts:
            return out
        features = self._encode([str(t) for t in texts], [str(p) for p in pairs] if pairs is not None else None)
        total = (len(features) + self.batch_size - 1) // self.batch_size
        for idx, batch in tqdm(self._batches(features), total=total, disable=not progress, desc="Predicting", unit="batch"):
            out[idx] = probabilities(self.model(**batch), self.labels.multi_label).cpu().numpy()
        return out

    def decode(self, probs: np.ndarray, top_k: int | None = None, threshold: float | None = None) -> list[dict[str, Any]]:
        """Per text: the label(s), score and ranked class scores."""
        names = self.labels.names
        thr = self.threshold if threshold is None else threshold
        results = []
        for row in probs:
            ranked = np.argsort(-row, kind="stable")[: top_k or len(names)]
            scores = {names[i]: round(float(row[i]), 6) for i in ranked}
            if self.labels.multi_label:
                chosen = [names[i] for i in np.argsort(-row, kind="stable") if row[i] >= thr]
                results.append({"labels": chosen, "scores": scores})
            else:
                best = int(ranked[0])
                results.append({"label": names[best], "score": round(float(row[best]), 6), "scores": scores})
        return results

    def predict(
        self, texts: list[str], pairs: list[str] | None = None, top_k: int | None = None, threshold: float | None = None
    ) -> list[dict[str, Any]]:
        """Labels and scores for each text, in input order."""
        return self.decode(self.predict_proba(texts, pairs), top_k=top_k, threshold=threshold)


def load_predictor(run_dir: str | Path, batch_size: int = 32, threads: int | None = None) -> Predictor:
    """The one way to load a run directory for prediction."""
    from textclass.rundir import load_run

    if threads:
        torch.set_num_threads(threads)
    run = load_run(run_dir)
    return Predictor(run.model, run.tokenizer, run.family, run.cfg, run.labels, batch_size=batch_size)
