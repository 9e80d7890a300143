"""Prediction from a run directory or an in-memory model.

Inputs are tokenized in batches with the family's tokenizer (the fast Rust tokenizers for encoders),
sorted by length into batches so little padding is computed, and the results are returned in the caller's
order. Training-time test evaluation, `textclass evaluate`, `textclass predict` and `Classifier.predict`
all go through `predict_proba`, so they cannot disagree.

Two backends share everything but the forward pass: `torch` (`Predictor`, the model object's network) and
`onnx` (`OnnxPredictor` in `onnx_backend.py`, ONNX Runtime on the file `textclass export` wrote).
`load.load_predictor` opens a run directory with either; `auto` picks onnx when the run has an export.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from textclass.batching import BatchEncoder, batched_probabilities
from textclass.config import Config
from textclass.data.labels import LabelSet
from textclass.errors import UserError

if TYPE_CHECKING:  # torch is imported where it is used: the onnx backend of an encoder runs without it
    from textclass.models.base import TextModel


class BasePredictor:
    """What both backends share: batched encoding, length-sorted batches, decoding of probabilities.

    Subclasses set `encoder`, `cfg`, `labels`, `batch_size` and implement `_forward` (one padded batch ->
    probabilities as a numpy array), or `predict_proba` itself where the model object already does it.
    """

    backend: str
    encoder: BatchEncoder
    cfg: Config
    labels: LabelSet
    batch_size: int

    @property
    def threshold(self) -> float:
        return self.cfg.evaluation.threshold

    def _forward(self, batch: Any) -> np.ndarray:
        raise NotImplementedError

    def parameter_counts(self) -> tuple[int, int]:
        """(all, trainable) parameters of what this backend runs."""
        raise NotImplementedError

    def predict_proba(self, texts: list[str], pairs: list[str] | None = None, progress: bool = False) -> np.ndarray:
        """Probabilities, shape (len(texts), num_labels), in input order."""
        return batched_probabilities(self.encoder, self._forward, texts, pairs, self.batch_size, self.labels.num_labels, progress)

    def decode(self, probs: np.ndarray, top_k: int | None = None, threshold: float | None = None) -> list[dict[str, Any]]:
        """Per text: the label(s), score and ranked class scores."""
        if top_k is not None and top_k < 1:
            raise UserError(f"top_k: {top_k} must be at least 1 (the number of best class scores to keep)")
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise UserError(f"threshold: {threshold} must be between 0 and 1")
        names = self.labels.names
        decisions = self.labels.decide(probs, self.threshold if threshold is None else threshold)
        results: list[dict[str, Any]] = []
        for row, decided in zip(probs, decisions, strict=True):
            ranked = np.argsort(-row, kind="stable")
            scores = {names[i]: round(float(row[i]), 6) for i in ranked[: top_k or len(names)]}
            if self.labels.multi_label:
                results.append({"labels": [names[i] for i in ranked if decided[i]], "scores": scores})
            else:
                results.append({"label": names[int(decided)], "score": round(float(row[decided]), 6), "scores": scores})
        return results

    def predict(
        self, texts: list[str], pairs: list[str] | None = None, top_k: int | None = None, threshold: float | None = None
    ) -> list[dict[str, Any]]:
        """Labels and scores for each text, in input order."""
        return self.decode(self.predict_proba(texts, pairs), top_k=top_k, threshold=threshold)


class Predictor(BasePredictor):
    """The torch backend: the model object's network, in eval mode, without gradients."""

    backend = "torch"

    def __init__(self, model: TextModel, batch_size: int = 32) -> None:
        if batch_size < 1:
            raise UserError(f"batch_size: {batch_size} must be at least 1 text per batch")
        self.model = model
        self.encoder = model
        self.cfg = model.cfg
        self.labels = model.labels
        self.batch_size = batch_size
        model.network.eval()

    def predict_proba(self, texts: list[str], pairs: list[str] | None = None, progress: bool = False) -> np.ndarray:
        """The model object's own batched forward pass (training's reports run the same code)."""
        return self.model.predict_proba(texts, pairs, self.batch_size, progress)

    def parameter_counts(self) -> tuple[int, int]:
        return self.model.parameter_counts()
