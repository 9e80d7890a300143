"""Multi-sample dropout: while training the head runs on K dropout masks and the loss is the mean of the K
losses; in eval mode the network's output is exactly the plain one (inference unchanged); bad settings refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_texts
from torch import nn

from textclass.config import build_config
from textclass.data.labels import LabelSet
from textclass.errors import UserError
from textclass.models.registry import get_family

LABELS = LabelSet(["food", "sport", "tech"], False)


def _model(model: dict, samples: int, texts: list[str]):
    cfg = build_config({"data": {"train": "x.csv"}, "model": {**model, "multisample_dropout": samples}})
    torch.manual_seed(0)
    return get_family(cfg.model.family).create(cfg, LABELS, texts)


@pytest.mark.parametrize("arch", ["encoder", "llm", "textcnn", "textrnn", "textrcnn", "transformer"])
def test_k_samples_while_training_and_the_plain_output_in_eval(arch: str, tiny_bert: Path, tiny_llama: Path) -> None:
    from textclass.training.trainer import ClassifierTrainer

    model_cfg = {
        "encoder": {"family": "encoder", "name": str(tiny_bert), "dropout": 0.3},
        "llm": {"family": "llm", "name": str(tiny_llama), "dropout": 0.3, "head": "mlp", "mlp_hidden": [16]},
    }.get(arch, {"family": "small", "arch": arch})
    df = make_texts(6, seed=4)
    texts = df["text"].tolist()
    multi, single = _model(model_cfg, 4, texts), _model(model_cfg, 1, texts)
    single.network.load_state_dict(multi.network.state_dict())
    batch = multi.collate(
        [f | {"labels": multi.labels.encode([y])} for f, y in zip(multi.features(texts), df["label"], strict=True)]
    )
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    multi.network.eval(), single.network.eval()
    torch.testing.assert_close(multi.network(**inputs), single.network(**inputs), rtol=0, atol=0)

    net = multi.network.train()
    torch.manual_seed(1)
    stacked = net(**inputs)
    assert stacked.shape == (6, 4, 3)
    assert not torch.allclose(stacked[:, 0], stacked[:, 1])  # other dropout masks
    trainer = ClassifierTrainer.__new__(ClassifierTrainer)  # compute_loss only: no Trainer machinery needed
    trainer.loss_fn, trainer.rdrop_alpha, trainer._loss_scale, trainer.multi_label = nn.CrossEntropyLoss(), 0.0, 1.0, False
    torch.manual_seed(1)
    loss, out = trainer.compute_loss(net, dict(batch), return_outputs=True)
    want = torch.stack([nn.functional.cross_entropy(stacked[:, k], batch["labels"]) for k in range(4)]).mean()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(out["logits"], stacked.mean(1))


@pytest.mark.parametrize(
    ("model", "key"),
    [
        ({"family": "small", "arch": "fasttext", "multisample_dropout": 4}, "model.multisample_dropout"),
        ({"family": "encoder", "head": "hf", "multisample_dropout": 4}, "model.multisample_dropout"),
        ({"family": "llm", "head": "hf", "multisample_dropout": 4}, "model.multisample_dropout"),
        ({"family": "small", "arch": "textcnn", "dropout": 0.0, "multisample_dropout": 4}, "model.multisample_dropout"),
        ({"family": "encoder", "multisample_dropout": 0}, "model.multisample_dropout"),
    ],
)
def test_bad_multisample_settings_are_refused(model: dict, key: str) -> None:
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        build_config({"data": {"train": "x.csv"}, "model": model})
