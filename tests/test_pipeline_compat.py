"""With `head: hf` the run directory is a plain transformers model folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from textclass import Classifier, train

from conftest import tiny_config


def test_run_dir_loads_in_transformers_pipeline(tiny_bert: Path, toy_files: dict, tmp_path: Path) -> None:
    from transformers import pipeline

    cfg = tiny_config(tiny_bert, toy_files, tmp_path / "run", epochs=1)
    cfg["model"]["head"] = "hf"
    result = train(cfg)
    pipe = pipeline("text-classification", model=str(result.run_dir), top_k=None)
    texts = ["goal match team", "chip software code"]
    ours = Classifier.load(result.run_dir).predict(texts)
    theirs = pipe(texts)
    for o, t in zip(ours, theirs):
        scores = {d["label"]: d["score"] for d in t}
        assert set(scores) == {"food", "sport", "tech"}  # id2label names, not LABEL_0
        np.testing.assert_allclose([scores[k] for k in o["scores"]], list(o["scores"].values()), atol=1e-5)
