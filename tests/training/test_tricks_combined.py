"""The tricks compose: FGM + R-Drop + EMA + focal loss (and, where the family has them, multi-sample dropout,
NoisyTune and layer-wise LR decay) train a tiny model of every family end to end, and the saved run loads
and predicts what the run reported."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import logged_losses, tiny_config, tiny_llm_config

from textclass import Classifier, train

COMBINED = {"adversarial": "fgm", "adversarial_epsilon": 0.1, "rdrop_alpha": 1.0, "ema_decay": 0.9, "loss": "focal"}


def _config(family: str, tiny_bert: Path, tiny_llama: Path, files: dict[str, Path], out: Path) -> dict:
    if family == "encoder":
        cfg = tiny_config(tiny_bert, files, out, epochs=3, layer_lr_decay=0.9, **COMBINED)
        cfg["model"].update(multisample_dropout=3, noisytune=0.1)
    elif family == "llm":
        cfg = tiny_llm_config(
            tiny_llama, files, out, model={"finetune": "lora", "dropout": 0.1, "multisample_dropout": 3}, epochs=3
        )
        cfg["training"].update(layer_lr_decay=0.9, **COMBINED)
    else:
        model = {"family": "small", "arch": family} | ({"multisample_dropout": 3} if family != "fasttext" else {})
        cfg = {
            "data": {k: str(v) for k, v in files.items()},
            "model": model,
            "training": {"output_dir": str(out), "epochs": 4, **COMBINED},
        }
    return cfg


@pytest.mark.parametrize("family", ["encoder", "llm", "fasttext", "textcnn"])
def test_fgm_rdrop_ema_focal_train_every_family(
    family: str, tiny_bert: Path, tiny_llama: Path, toy_files: dict[str, Path], tmp_path: Path
) -> None:
    run = train(_config(family, tiny_bert, tiny_llama, toy_files, tmp_path / family))
    losses = logged_losses(run.run_dir)
    assert losses and np.isfinite(losses).all()
    assert run.metrics["valid"]["accuracy"] > 0.5  # three separable topics: chance is 1/3
    test = pd.read_csv(toy_files["test"])
    predicted = Classifier.load(run.run_dir).predict(test["text"].tolist())
    accuracy = np.mean([p["label"] == y for p, y in zip(predicted, test["label"], strict=True)])
    assert accuracy == pytest.approx(run.metrics["test"]["accuracy"])
