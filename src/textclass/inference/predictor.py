"""Prediction from a run directory or an in-memory model.

Inputs are tokenized in batches with the family's tokenizer (the fast Rust tokenizers for encoders),
sorted by length into batches so little padding is computed, and the results are returned in the caller's
order. Training-time test evaluation, `textclass evaluate`, `textclass predict` and `Classifier.predict`
all go through `predict_proba`, so they cannot disagree.

Two backends share everything but the forward pass: `torch` (`Predictor`, the PyTorch module) and `onnx`
(`OnnxPredictor` in `onnx_backend.py`, ONNX Runtime on the file `textclass export` wrote). `auto` picks
onnx when the run directory has an export.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
from tqdm.auto import tqdm

from textclass.config import Config
from textclass.data.labels import LabelSet

if TYPE_CHECKING:  # torch is imported where it is used: the onnx backend of an encoder runs without it
    import torch
    from torch import nn

    from textclass.models.registry import Collator, Family


def probabilities(logits: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """Class probabilities: independent sigmoids (multi-label) or a softmax (single-label)."""
    import torch

    logits = logits.float()
    return torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=-1)


def make_collator(family: Family, tokenizer: Any, cfg: Config, multi_label: bool) -> Collator:
    """The family's padding plus the shared handling of `labels` and `length`."""
    import torch

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


class BasePredictor:
    """What both backends share: batched tokenisation, length-sorted batches, decoding of probabilities.

    Subclasses set `tokenizer`, `family`, `cfg`, `labels`, `batch_size` and implement `_collate_batch`
    and `_forward` (one padded batch -> probabilities as a numpy array).
    """

    backend: str
    tokenizer: Any
    family: Family
    cfg: Config
    labels: LabelSet
    batch_size: int

    @property
    def threshold(self) -> float:
        return self.cfg.evaluation.threshold

    def _encode(self, texts: list[str], pairs: list[str] | None) -> list[dict[str, Any]]:
        # One call for the whole list: the fast (Rust) tokenizers then encode in parallel.
        enc = self.family.encode(self.tokenizer, self.cfg.model, texts, pairs)
        keys = list(enc)
        return [{k: enc[k][i] for k in keys} for i in range(len(texts))]

    def _collate_batch(self, features: list[dict[str, Any]]) -> Any:
        raise NotImplementedError

    def _forward(self, batch: Any) -> np.ndarray:
        raise NotImplementedError

    def _batches(self, features: list[dict[str, Any]]) -> Iterator[tuple[np.ndarray, Any]]:
        """Longest first, so each batch holds texts of similar length and little padding is computed."""
        order = np.argsort([-len(f["input_ids"]) for f in features], kind="stable")
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            yield idx, self._collate_batch([dict(features[i]) for i in idx])

    def predict_proba(self, texts: list[str], pairs: list[str] | None = None, progress: bool = False) -> np.ndarray:
        """Probabilities, shape (len(texts), num_labels), in input order."""
        out = np.zeros((len(texts), self.labels.num_labels), dtype=np.float32)
        if not len(texts):
            return out
        features = self._encode([str(t) for t in texts], [str(p) for p in pairs] if pairs is not None else None)
        total = (len(features) + self.batch_size - 1) // self.batch_size
        for idx, batch in tqdm(self._batches(features), total=total, disable=not progress, desc="Predicting", unit="batch"):
            out[idx] = self._forward(batch)
        return out

    def decode(self, probs: np.ndarray, top_k: int | None = None, threshold: float | None = None) -> list[dict[str, Any]]:
        """Per text: the label(s), score and ranked class scores."""
        from textclass.errors import UserError

        if top_k is not None and top_k < 1:
            raise UserError(f"top_k: {top_k} must be at least 1 (the number of best class scores to keep)")
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise UserError(f"threshold: {threshold} must be between 0 and 1")
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


@dataclass
class Predictor(BasePredictor):
    """The torch backend: a loaded PyTorch model with everything needed to turn texts into probabilities."""

    model: nn.Module
    tokenizer: Any
    family: Family
    cfg: Config
    labels: LabelSet
    batch_size: int = 32

    backend = "torch"

    def __post_init__(self) -> None:
        self.model.eval()
        self._collate = make_collator(self.family, self.tokenizer, self.cfg, self.labels.multi_label)
        self.device = next(self.model.parameters()).device

    def _collate_batch(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in self._collate(features).items()}

    def _forward(self, batch: dict[str, torch.Tensor]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return probabilities(self.model(**batch), self.labels.multi_label).cpu().numpy()


BACKENDS = ("auto", "onnx", "torch")


def load_predictor(
    run_dir: str | Path,
    batch_size: int = 32,
    threads: int | None = None,
    backend: str = "auto",
    variant: str | None = None,
) -> BasePredictor:
    """The one way to load a run directory for prediction.

    `backend`: `torch` (the PyTorch weights), `onnx` (the file `textclass export` wrote; error if there is
    none) or `auto` (onnx when the run directory has an export, else torch). Both give the same
    probabilities (the export's parity check holds them within 1e-4; an int8 export is within its
    reported agreement). `variant` (`fp32` or `int8`) picks one ONNX file when both were exported; by
    default the export's recorded default is used. `threads` caps the intra-op threads of either backend.
    """
    from textclass.errors import UserError
    from textclass.inference.onnx_backend import has_export, load_onnx_predictor, onnx_available
    from textclass.rundir import check_run_dir

    if backend not in BACKENDS:
        raise UserError(f"backend: unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if threads is not None and threads < 1:
        raise UserError(f"threads: {threads} must be a positive number of threads")
    if batch_size < 1:
        raise UserError(f"batch_size: {batch_size} must be at least 1 text per batch")
    path = check_run_dir(run_dir)
    if backend != "torch":

        if backend == "onnx" and not has_export(path):
            raise UserError(f"{path}: no ONNX export in this run directory; run `textclass export --model {path}` first")
        if has_export(path) and (backend == "onnx" or onnx_available()):  # auto without onnxruntime: torch
            return load_onnx_predictor(path, batch_size=batch_size, threads=threads, variant=variant)
    import torch

    from textclass.rundir import load_run

    if threads:
        torch.set_num_threads(threads)
    run = load_run(path)
    return Predictor(run.model, run.tokenizer, run.family, run.cfg, run.labels, batch_size=batch_size)
