"""Adversarial training (FGM, PGD, FreeLB, AWP): epsilon 0 equals plain training (also with gradient
accumulation); a step never changes the weights (AWP's perturbation is restored exactly); the clean gradient
is kept: a step's gradient equals the method's mean of clean and adversarial gradients computed by hand;
every method runs for encoders, LLMs with frozen embeddings (LoRA) and small models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import logged_losses, make_texts, no_dropout_copy, tiny_config, tiny_llm_config
from torch import nn

from textclass import Classifier, train
from textclass.errors import UserError

METHODS = ["fgm", "pgd", "freelb", "awp"]


def test_epsilon_zero_equals_plain_training(tiny_bert: Path, toy_files: dict[str, Path], tmp_path: Path) -> None:
    bert = no_dropout_copy(tiny_bert, tmp_path / "bert")
    runs = {}
    for name in ["plain", *METHODS]:
        extra = (
            {}
            if name == "plain"
            else {"adversarial": name, "adversarial_epsilon": 0.0, "adversarial_steps": None if name == "fgm" else 2}
        )
        cfg = tiny_config(bert, toy_files, tmp_path / name, logging_steps=1, max_steps=4, grad_accum=2, **extra)
        cfg["model"]["dropout"] = 0.0
        runs[name] = logged_losses(Path(train(cfg).run_dir))
    assert len(runs["plain"]) == 4
    for name in METHODS:
        torch.testing.assert_close(torch.tensor(runs[name]), torch.tensor(runs["plain"]), rtol=1e-5, atol=1e-6, msg=name)


def _setup(tiny_bert: Path, tmp_path: Path, method: str, **settings: Any) -> tuple[Any, nn.Module, dict, Any]:
    """A dropout-free tiny BERT, one batch, and a ClassifierTrainer with the method, outside the training loop."""
    from transformers import TrainingArguments

    from textclass.config import build_config
    from textclass.data.labels import LabelSet
    from textclass.models.registry import get_family
    from textclass.training.adversarial import make_adversary
    from textclass.training.trainer import ClassifierTrainer

    bert = no_dropout_copy(tiny_bert, tmp_path / "bert")
    cfg = build_config({"data": {"train": "x.csv"}, "model": {"name": str(bert), "dropout": 0.0}})
    torch.manual_seed(0)
    model = get_family("encoder").create(cfg, LabelSet(["food", "sport", "tech"], False), [])
    net = model.network.train()
    df = make_texts(8, seed=3)
    feats = model.features(df["text"].tolist())
    batch = model.collate([f | {"labels": model.labels.encode([y])} for f, y in zip(feats, df["label"], strict=True)])
    args = TrainingArguments(output_dir=str(tmp_path / "t"), use_cpu=True, report_to="none")
    adversary = make_adversary(method, net, **settings)
    trainer = ClassifierTrainer(model=net, args=args, loss_fn=nn.CrossEntropyLoss(), adversarial=adversary)
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which these tests bypass
    return trainer, net, batch, adversary


def _grads(net: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def _loss_and_grads(
    net: nn.Module, batch: dict, delta: torch.Tensor | None = None
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """By hand: the loss's parameter gradients and its gradient at the embedding output (shifted by delta)."""
    from textclass.training.adversarial import input_embedding

    net.zero_grad()
    captured = {}

    def hook(module: nn.Module, args: object, out: torch.Tensor) -> torch.Tensor:
        out = out + delta if delta is not None else out
        out.retain_grad()
        captured["out"] = out
        return out

    handle = input_embedding(net).register_forward_hook(hook)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    nn.functional.cross_entropy(net(**inputs), batch["labels"]).backward()
    handle.remove()
    grads = _grads(net)
    net.zero_grad()
    return grads, captured["out"].grad


def _step(trainer: Any, net: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    """One training_step; checks it left every weight as it found it, returns the gradients it produced."""
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    net.zero_grad()
    trainer.training_step(net, dict(batch))
    assert all(torch.equal(p.detach(), before[n]) for n, p in net.named_parameters()), "weights changed"
    got = _grads(net)
    net.zero_grad()
    return got


def _assert_grads(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], clean: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for n in got:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=n)
    assert any(not torch.allclose(clean[n], want[n]) for n in clean)  # the attack changed something


def _unit(g: torch.Tensor) -> torch.Tensor:
    return g / g.norm()


def _ball(d: torch.Tensor, eps: float) -> torch.Tensor:
    return d * (eps / d.norm()) if d.norm() > eps else d


def test_fgm_step_is_the_mean_of_clean_and_adversarial_gradients(tiny_bert: Path, tmp_path: Path) -> None:
    trainer, net, batch, _ = _setup(tiny_bert, tmp_path, "fgm", epsilon=0.5, alpha=0.3, steps=1)
    got = _step(trainer, net, batch)
    clean, g = _loss_and_grads(net, batch)
    adv, _ = _loss_and_grads(net, batch, 0.5 * _unit(g))
    _assert_grads(got, {n: (clean[n] + adv[n]) / 2 for n in clean}, clean)


def test_pgd_step_is_the_mean_of_clean_and_last_adversarial_gradients(tiny_bert: Path, tmp_path: Path) -> None:
    eps, alpha = 0.5, 0.3  # the second ascent step leaves the ball: the projection is exercised
    trainer, net, batch, _ = _setup(tiny_bert, tmp_path, "pgd", epsilon=eps, alpha=alpha, steps=3)
    got = _step(trainer, net, batch)
    clean, g = _loss_and_grads(net, batch)
    delta = _ball(alpha * _unit(g), eps)
    _, g = _loss_and_grads(net, batch, delta)
    delta = _ball(delta + alpha * _unit(g), eps)
    _, g = _loss_and_grads(net, batch, delta)
    delta = _ball(delta + alpha * _unit(g), eps)
    assert delta.norm() == pytest.approx(eps, rel=1e-5)
    adv, _ = _loss_and_grads(net, batch, delta)
    _assert_grads(got, {n: (clean[n] + adv[n]) / 2 for n in clean}, clean)


def test_freelb_step_is_the_mean_of_its_passes_starting_clean(tiny_bert: Path, tmp_path: Path) -> None:
    eps, alpha = 0.4, 0.3
    trainer, net, batch, _ = _setup(tiny_bert, tmp_path, "freelb", epsilon=eps, alpha=alpha, steps=3)
    got = _step(trainer, net, batch)
    clean, g = _loss_and_grads(net, batch)
    delta = _ball(alpha * _unit(g), eps)
    second, g = _loss_and_grads(net, batch, delta)
    third, _ = _loss_and_grads(net, batch, _ball(delta + alpha * _unit(g), eps))
    _assert_grads(got, {n: (clean[n] + second[n] + third[n]) / 3 for n in clean}, clean)


def test_awp_step_adds_the_gradient_at_perturbed_weights_and_restores_them_exactly(tiny_bert: Path, tmp_path: Path) -> None:
    eps, alpha = 0.02, 0.5
    trainer, net, batch, _ = _setup(tiny_bert, tmp_path, "awp", epsilon=eps, alpha=alpha, steps=1)
    got = _step(trainer, net, batch)  # also checks every weight is bit-for-bit what it was
    clean, _ = _loss_and_grads(net, batch)
    saved = {n: p.detach().clone() for n, p in net.named_parameters()}
    with torch.no_grad():
        for n, p in net.named_parameters():
            if p.dim() >= 2 and n in clean:
                moved = p + alpha * p.norm() * _unit(clean[n])
                p.copy_(torch.clamp(moved, p - eps * p.abs(), p + eps * p.abs()))
    adv, _ = _loss_and_grads(net, batch)
    with torch.no_grad():
        for n, p in net.named_parameters():
            p.copy_(saved[n])
    _assert_grads(got, {n: (clean[n] + adv[n]) / 2 for n in clean}, clean)


def test_every_method_trains_lora_llms_and_small_models(tiny_llama: Path, toy_files: dict[str, Path], tmp_path: Path) -> None:
    """Each method runs and really perturbs (the model differs from plain training's): a hook that never
    fires, as on fastText's sparse path before, would be plain training under another name."""
    texts = ["goal team chip", "bread soup coach", "the new code"]

    def llm(name: str, **extra: object) -> np.ndarray:
        # Adam's first updates are nearly sign(gradient), so runs part slowly: compare what the models predict.
        run = train(tiny_llm_config(tiny_llama, toy_files, tmp_path / name, model={"finetune": "lora"}, max_steps=6, **extra))
        assert np.isfinite(logged_losses(Path(run.run_dir))).all()
        return Classifier.load(run.run_dir).predict_proba(texts)

    def small(name: str, arch: str, **extra: object) -> list[float]:
        cfg = {
            "data": {k: str(v) for k, v in toy_files.items()},
            "model": {"family": "small", "arch": arch} | ({"dropout": 0.0} if arch == "textcnn" else {}),
            "training": {"output_dir": str(tmp_path / name), "epochs": 3, "batch_size": 16, "logging_steps": 1, **extra},
        }
        result = train(cfg)
        assert result.metrics["valid"]["accuracy"] > 0.5
        return logged_losses(Path(result.run_dir))

    plain_llm = llm("llm-plain")
    plain_small = {arch: small(f"{arch}-plain", arch) for arch in ("fasttext", "textcnn")}
    for method in METHODS:
        steps = {} if method == "fgm" else {"adversarial_steps": 2}
        if method in ("fgm", "awp"):  # pgd and freelb perturb through fgm's hook: the LLM's frozen embeddings
            assert not np.array_equal(llm(f"llm-{method}", adversarial=method, **steps), plain_llm), method
        arch = "textcnn" if method == "awp" else "fasttext"  # AWP moves dense matrices: fastText's table is sparse
        assert small(f"{arch}-{method}", arch, adversarial=method, adversarial_start_epoch=0, **steps) != plain_small[arch], (
            method
        )


@pytest.mark.parametrize(
    ("training", "key"),
    [
        ({"adversarial": "freelb2"}, "training.adversarial"),
        ({"adversarial": "fgm", "adversarial_steps": 3}, "training.adversarial_steps"),
        ({"adversarial": "pgd", "adversarial_alpha": 0}, "training.adversarial_alpha"),
        ({"adversarial": "awp", "epochs": 2, "adversarial_start_epoch": 2}, "training.adversarial_start_epoch"),
        ({"adversarial": "pgd", "adversarial_epsilon": -1}, "training.adversarial_epsilon"),
    ],
)
def test_bad_adversarial_settings_are_refused(training: dict, key: str) -> None:
    from textclass.config import build_config

    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        build_config({"data": {"train": "x.csv"}, "training": training})


def test_method_defaults_are_filled_in() -> None:
    from textclass.config import build_config

    def resolved(**t: Any) -> tuple:
        tc = build_config({"data": {"train": "x.csv"}, "training": t}).training
        return tc.adversarial_epsilon, tc.adversarial_alpha, tc.adversarial_steps, tc.adversarial_start_epoch

    assert resolved(adversarial="pgd") == (1.0, 0.3, 3, 0.0)
    assert resolved(adversarial="awp", epochs=3) == (0.01, 1.0, 1, 1.0)  # from the second epoch, as the paper
    assert resolved(adversarial="awp", epochs=1) == (0.01, 1.0, 1, 0.0)
