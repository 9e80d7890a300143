"""NoisyTune: each trained pretrained tensor moves by at most lambda/2 x its std, the head not at all; 0 is off;
runs that train no pretrained weights refuse it; the same seed gives the same noise."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from textclass.config import build_config
from textclass.data.labels import LabelSet
from textclass.errors import UserError
from textclass.models.registry import get_family
from textclass.training.noisytune import apply_noisytune

LABELS = LabelSet(["a", "b"], multi_label=False)


def _encoder(tiny_bert: Path):  # noqa: ANN202
    cfg = build_config({"data": {"train": "x.csv"}, "model": {"name": str(tiny_bert)}})
    torch.manual_seed(0)
    return get_family("encoder").create(cfg, LABELS, []).network


def test_noise_is_bounded_per_tensor_and_spares_the_head(tiny_bert: Path) -> None:
    net = _encoder(tiny_bert)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    count = apply_noisytune(net, 0.15, seed=42)
    moved = 0
    for n, p in net.named_parameters():
        delta = (p.detach() - before[n]).abs()
        if n.startswith("classifier."):
            assert torch.equal(p.detach(), before[n])  # the new head is not perturbed
            continue
        if before[n].numel() > 1:
            std = before[n].float().std()
            assert delta.max() <= 0.15 / 2 * std + 1e-7, n
            assert (delta.max() > 0) == (std > 0), n  # every tensor moves (LayerNorm's all-ones weights: std 0)
            moved += int(std > 0)
    assert count >= moved > 10
    again = _encoder(tiny_bert)
    apply_noisytune(again, 0.15, seed=42)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values(), strict=True))


def test_lambda_zero_changes_nothing(tiny_bert: Path) -> None:
    net = _encoder(tiny_bert)
    before = {n: p.detach().clone() for n, p in net.state_dict().items()}
    apply_noisytune(net, 0.0, seed=1)
    assert all(torch.equal(before[n], p) for n, p in net.state_dict().items())


def test_runs_without_trained_pretrained_weights_refuse_it(tiny_llama: Path, toy_files: dict[str, Path], tmp_path: Path) -> None:
    from conftest import tiny_llm_config

    from textclass import train

    with pytest.raises(UserError, match="model.noisytune"):
        train(tiny_llm_config(tiny_llama, toy_files, tmp_path / "run", model={"finetune": "lora", "noisytune": 0.15}))
    with pytest.raises(UserError, match="model.noisytune"):  # small models have no such key
        build_config({"data": {"train": "x.csv"}, "model": {"family": "small", "noisytune": 0.1}})


def test_a_noisytune_run_trains(tiny_bert: Path, toy_files: dict[str, Path], tmp_path: Path) -> None:
    from conftest import tiny_config

    from textclass import train

    cfg = tiny_config(tiny_bert, toy_files, tmp_path / "run")
    cfg["model"]["noisytune"] = 0.15
    assert train(cfg).metrics["test"]["accuracy"] > 0.5
