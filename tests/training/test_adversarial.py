"""FGM adversarial training: epsilon 0 equals plain training; the perturbation never touches the weights;
the clean gradient is kept (a step's gradient is the mean of the clean and the adversarial one); it runs
for encoders, LLMs with frozen embeddings (LoRA) and small models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import logged_losses, make_texts, no_dropout_copy, tiny_config, tiny_llm_config

from textclass import train
from textclass.errors import UserError


def test_fgm_with_epsilon_zero_equals_plain_training(tiny_bert: Path, toy_files: dict[str, Path], tmp_path: Path) -> None:
    bert = no_dropout_copy(tiny_bert, tmp_path / "bert")
    runs = {}
    for name, extra in {"plain": {}, "fgm0": {"adversarial": "fgm", "adversarial_epsilon": 0.0}}.items():
        cfg = tiny_config(bert, toy_files, tmp_path / name, logging_steps=1, max_steps=6, **extra)
        cfg["model"]["dropout"] = 0.0
        runs[name] = logged_losses(Path(train(cfg).run_dir))
    assert len(runs["plain"]) == 6
    torch.testing.assert_close(torch.tensor(runs["fgm0"]), torch.tensor(runs["plain"]), rtol=1e-5, atol=1e-6)


def test_fgm_step_is_the_mean_of_clean_and_adversarial_gradients(tiny_bert: Path, tmp_path: Path) -> None:
    from torch import nn
    from transformers import TrainingArguments

    from textclass.config import build_config
    from textclass.data.labels import LabelSet
    from textclass.models.registry import get_family
    from textclass.training.adversarial import FGM, input_embedding
    from textclass.training.trainer import ClassifierTrainer

    bert = no_dropout_copy(tiny_bert, tmp_path / "bert")
    cfg = build_config({"data": {"train": "x.csv"}, "model": {"name": str(bert), "dropout": 0.0}})
    torch.manual_seed(0)
    model = get_family("encoder").create(cfg, LabelSet(["food", "sport", "tech"], False), [])
    net = model.network.train()
    df = make_texts(8, seed=3)
    batch = model.collate([f | {"labels": model.labels.encode([y])} for f, y in zip(model.features(df["text"].tolist()), df["label"], strict=True)])
    weights_before = {n: p.detach().clone() for n, p in net.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path / "t"), use_cpu=True, report_to="none")
    fgm = FGM(input_embedding(net), epsilon=0.5)
    trainer = ClassifierTrainer(model=net, args=args, loss_fn=nn.CrossEntropyLoss(), adversarial=fgm)
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which this test bypasses
    trainer.training_step(net, dict(batch))
    got = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    assert all(torch.equal(p.detach(), weights_before[n]) for n, p in net.named_parameters())  # weights untouched

    # By hand: the clean gradient, then the gradient at the embedding output shifted by eps * g / |g|.
    net.zero_grad()
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    captured = {}

    def keep(module: nn.Module, args: object, out: torch.Tensor) -> None:
        out.retain_grad()
        captured["out"] = out

    handle = input_embedding(net).register_forward_hook(keep)
    nn.functional.cross_entropy(net(**inputs), labels).backward()
    handle.remove()
    clean = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    g = captured["out"].grad
    delta = 0.5 * g / g.norm()
    net.zero_grad()
    handle = input_embedding(net).register_forward_hook(lambda m, a, out: out + delta)
    nn.functional.cross_entropy(net(**inputs), labels).backward()
    handle.remove()
    adv = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    assert set(got) == set(clean)
    for n in got:
        torch.testing.assert_close(got[n], (clean[n] + adv[n]) / 2, rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(clean[n], adv[n]) for n in clean)  # the attack changed something


def test_fgm_runs_for_lora_llms_and_small_models(tiny_llama: Path, toy_files: dict[str, Path], tmp_path: Path) -> None:
    run = train(tiny_llm_config(tiny_llama, toy_files, tmp_path / "llm", model={"finetune": "lora"}, max_steps=4, adversarial="fgm"))
    assert len(logged_losses(Path(run.run_dir))) >= 1
    cfg = {
        "data": {k: str(v) for k, v in toy_files.items()},
        "model": {"family": "small", "arch": "fasttext"},
        "training": {"output_dir": str(tmp_path / "ft"), "epochs": 2, "adversarial": "fgm", "adversarial_epsilon": 0.1},
    }
    assert train(cfg).metrics["valid"]["accuracy"] > 0.5


def test_unknown_adversarial_method_is_refused() -> None:
    from textclass.config import build_config

    with pytest.raises(UserError, match="training.adversarial"):
        build_config({"data": {"train": "x.csv"}, "training": {"adversarial": "freelb2"}})
