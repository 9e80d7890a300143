"""Texts to probabilities in length-sorted batches: the one loop every forward pass goes through.

Training's reports (through the model object), `evaluate`, `predict`, `serve` and export's parity check use
it with either backend, so they cannot disagree. Longest texts first: each batch holds texts of similar
length and little padding is computed; results come back in the caller's order. Torch-free, so the ONNX
backend can use it without importing torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
from tqdm.auto import tqdm


class BatchEncoder(Protocol):
    """Texts -> per-text model inputs -> padded batches (the model object is one, the ONNX backend's
    `RustEncoder` another)."""

    def features(self, texts: list[str], pairs: list[str] | None = None) -> list[dict[str, Any]]: ...

    def collate(self, features: list[dict[str, Any]]) -> Any: ...


def batched_probabilities(
    encoder: BatchEncoder,
    forward: Callable[[Any], np.ndarray],
    texts: list[str],
    pairs: list[str] | None,
    batch_size: int,
    num_labels: int,
    progress: bool = False,
) -> np.ndarray:
    """Probabilities, shape (len(texts), num_labels), in input order; `forward` maps one batch to them."""
    out = np.zeros((len(texts), num_labels), dtype=np.float32)
    if not len(texts):
        return out
    features = encoder.features([str(t) for t in texts], [str(p) for p in pairs] if pairs is not None else None)
    order = np.argsort([-len(f["input_ids"]) for f in features], kind="stable")
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, disable=not progress, desc="Predicting", unit="batch"):
        idx = order[start : start + batch_size]
        out[idx] = forward(encoder.collate([dict(features[i]) for i in idx]))
    return out
