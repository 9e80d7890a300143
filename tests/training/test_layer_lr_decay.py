"""Layer-wise learning-rate decay: each block's rate is decay^(distance from the top) times the base rate,
the embeddings lowest, the head at head_lr_scale; every weight in exactly one group; the schedule scales all."""

from __future__ import annotations

from pathlib import Path

import pytest
from torch import nn
from transformers import TrainingArguments

from textclass.config import build_config
from textclass.data.labels import LabelSet
from textclass.errors import UserError
from textclass.models.registry import get_family
from textclass.training.trainer import ClassifierTrainer


def _groups(network: nn.Module, tmp_path: Path, decay: float, head_scale: float = 1.0) -> dict[str, float]:
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3, warmup_steps=0, use_cpu=True, report_to="none")
    trainer = ClassifierTrainer(model=network, args=args, loss_fn=nn.CrossEntropyLoss(), head_lr_scale=head_scale, layer_lr_decay=decay)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    rate = {id(p): g["lr"] for g in trainer.optimizer.param_groups for p in g["params"]}
    names = [n for n, p in network.named_parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in trainer.optimizer.param_groups) == len(names)  # each weight once
    return {n: rate[id(p)] for n, p in network.named_parameters() if p.requires_grad}


def test_encoder_layers_decay_from_the_top(tiny_bert: Path, tmp_path: Path) -> None:
    cfg = build_config({"data": {"train": "x.csv"}, "model": {"name": str(tiny_bert)}})
    net = get_family("encoder").create(cfg, LabelSet(["a", "b"], False), []).network
    rates = _groups(net, tmp_path, decay=0.5, head_scale=10.0)
    assert rates["encoder.encoder.layer.1.attention.self.query.weight"] == pytest.approx(1e-3)  # the top block (of 2)
    assert rates["encoder.encoder.layer.0.output.dense.bias"] == pytest.approx(5e-4)
    assert rates["encoder.embeddings.word_embeddings.weight"] == pytest.approx(2.5e-4)
    assert rates["classifier.weight"] == pytest.approx(1e-2)


def test_llm_layers_decay_and_lora_adapters_follow_their_layer(tiny_llama: Path, tmp_path: Path) -> None:
    cfg = build_config({"data": {"train": "x.csv"}, "model": {"family": "llm", "name": str(tiny_llama), "finetune": "lora"}})
    net = get_family("llm").create(cfg, LabelSet(["a", "b"], False), []).network
    rates = _groups(net, tmp_path, decay=0.8)
    layer0 = [r for n, r in rates.items() if ".layers.0." in n]
    layer1 = [r for n, r in rates.items() if ".layers.1." in n]
    assert layer0 and layer1 and all("lora_" in n for n in rates if ".layers." in n)  # only adapters train there
    assert layer0 == pytest.approx([8e-4] * len(layer0)) and layer1 == pytest.approx([1e-3] * len(layer1))
    assert rates["head.1.weight"] == pytest.approx(1e-3)


def test_models_without_layers_refuse_it(tmp_path: Path) -> None:
    cfg = build_config({"data": {"train": "x.csv"}, "model": {"family": "small", "arch": "textcnn"}})
    net = get_family("small").create(cfg, LabelSet(["a", "b"], False), ["some words here", "more words"]).network
    with pytest.raises(UserError, match="training.layer_lr_decay"):
        _groups(net, tmp_path, decay=0.9)
