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


def test_multilabel_hf_head_uses_sigmoid_in_pipeline(tiny_bert: Path, tmp_path: Path) -> None:
    """config.json records multi-label, so pipeline() applies sigmoid exactly as we do."""
    import json

    from transformers import pipeline

    from conftest import make_texts

    df = make_texts(60, 3)
    df["tags"] = [[l] + (["x"] if i % 2 else []) for i, l in enumerate(df["label"])]
    df.drop(columns="label").to_json(tmp_path / "t.jsonl", orient="records", lines=True)
    cfg = tiny_config(tiny_bert, {"train": tmp_path / "t.jsonl"}, tmp_path / "run", epochs=1)
    cfg["data"]["label_column"] = "tags"
    cfg["model"]["head"] = "hf"
    result = train(cfg)
    assert json.loads((result.run_dir / "config.json").read_text())["problem_type"] == "multi_label_classification"
    pipe = pipeline("text-classification", model=str(result.run_dir), top_k=None)
    ours = Classifier.load(result.run_dir).predict(["goal match team"])[0]["scores"]
    theirs = {d["label"]: d["score"] for d in pipe(["goal match team"])[0]}
    np.testing.assert_allclose([theirs[k] for k in ours], list(ours.values()), atol=1e-5)
    assert abs(sum(theirs.values()) - 1.0) > 1e-3  # independent sigmoids, not a softmax
