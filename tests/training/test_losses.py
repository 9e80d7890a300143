"""The loss factory's invariants: focal with gamma 0, poly-1 with epsilon 0 and smoothing 0 equal (weighted)
cross-entropy batch after batch; weights never change; ZLPR matches its formula; bad combinations refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from textclass.config import build_config
from textclass.errors import UserError
from textclass.training.losses import make_loss

WEIGHTS = [0.5, 2.0, 1.0, 3.0]


def _batches(multi: bool, n: int = 5):
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        logits = torch.randn(16, 4, generator=g) * 3
        target = (torch.rand(16, 4, generator=g) > 0.6).float() if multi else torch.randint(0, 4, (16,), generator=g)
        yield logits, target


@pytest.mark.parametrize("weights", ["none", WEIGHTS])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize(("kind", "neutral"), [("focal", {"focal_gamma": 0.0}), ("poly1", {"poly_epsilon": 0.0})])
def test_neutral_settings_equal_cross_entropy_single_label(kind: str, neutral: dict, smoothing: float, weights) -> None:
    loss = make_loss(False, 4, weights, None, kind=kind, label_smoothing=smoothing, **neutral)
    w = torch.tensor(WEIGHTS) if weights != "none" else None
    for logits, target in _batches(False):  # batch after batch: the weights are never recomputed
        expected = F.cross_entropy(logits, target, weight=w, label_smoothing=smoothing)
        torch.testing.assert_close(loss(logits, target), expected, rtol=1e-5, atol=1e-6)
    if w is not None:
        assert torch.equal(loss.weight, w)


@pytest.mark.parametrize("weights", ["none", WEIGHTS])
@pytest.mark.parametrize(("kind", "neutral"), [("focal", {"focal_gamma": 0.0}), ("poly1", {"poly_epsilon": 0.0})])
def test_neutral_settings_equal_binary_cross_entropy_multi_label(kind: str, neutral: dict, weights) -> None:
    loss = make_loss(True, 4, weights, None, kind=kind, label_smoothing=0.1, **neutral)
    pw = torch.tensor(WEIGHTS) if weights != "none" else None
    for logits, target in _batches(True):
        smoothed = target * 0.9 + 0.05
        expected = F.binary_cross_entropy_with_logits(logits, smoothed, pos_weight=pw)
        torch.testing.assert_close(loss(logits, target), expected, rtol=1e-5, atol=1e-6)


def test_focal_down_weights_easy_examples_and_poly_adds_its_term() -> None:
    logits = torch.tensor([[6.0, 0.0, 0.0], [0.2, 0.0, 0.1]])  # one easy, one hard example, both of class 0
    target = torch.tensor([0, 0])
    ce = F.cross_entropy(logits, target, reduction="none")
    focal = make_loss(False, 3, "none", None, kind="focal", focal_gamma=2.0)
    p = torch.softmax(logits, -1)[:, 0]
    torch.testing.assert_close(focal(logits, target), ((1 - p) ** 2 * ce).mean())
    assert ((1 - p[0]) ** 2 * ce[0]) < 1e-3 * ce[0]  # the easy example nearly vanishes
    poly = make_loss(False, 3, "none", None, kind="poly1", poly_epsilon=1.0)
    torch.testing.assert_close(poly(logits, target), ce.mean() + (1 - p).mean())


def test_zlpr_matches_its_formula_and_weights() -> None:
    loss = make_loss(True, 4, WEIGHTS, None, kind="zlpr")
    for logits, target in _batches(True, 3):
        expected = []
        for s, y in zip(logits, target, strict=True):
            neg = torch.cat([torch.zeros(1), s[y == 0]])
            pos = torch.cat([torch.zeros(1), -s[y == 1] + torch.log(torch.tensor(WEIGHTS))[y == 1]])
            expected.append(torch.logsumexp(neg, 0) + torch.logsumexp(pos, 0))
        torch.testing.assert_close(loss(logits, target), torch.stack(expected).mean())
    separated = torch.tensor([[20.0, -20.0, 20.0, -20.0]])
    assert make_loss(True, 4, "none", None, kind="zlpr")(separated, torch.tensor([[1.0, 0, 1, 0]])) < 1e-6


def test_bad_loss_settings_are_refused() -> None:
    with pytest.raises(UserError, match="training.loss: zlpr is a multi-label loss"):
        make_loss(False, 3, "none", None, kind="zlpr")
    with pytest.raises(UserError, match="training.label_smoothing"):
        make_loss(True, 3, "none", None, kind="zlpr", label_smoothing=0.1)
    for key, value in [("loss", "dice"), ("focal_gamma", -1), ("label_smoothing", 1.0)]:
        with pytest.raises(UserError, match=f"training.{key}"):
            build_config({"data": {"train": "x.csv"}, "training": {key: value}})


def test_a_focal_smoothed_run_trains(tiny_bert: Path, toy_files: dict[str, Path], tmp_path: Path) -> None:
    import json

    from conftest import tiny_config

    from textclass import train

    cfg = tiny_config(tiny_bert, toy_files, tmp_path / "run", loss="focal", label_smoothing=0.1, class_weights="balanced", logging_steps=1)
    result = train(cfg)
    losses = [e["loss"] for e in json.loads((Path(result.run_dir) / "training_log.json").read_text()) if "loss" in e]
    assert losses[-1] < losses[0] and result.metrics["test"]["accuracy"] > 0.5


def test_symmetric_kl_is_the_mean_of_both_kl_directions() -> None:
    from textclass.training.losses import symmetric_kl

    (a, _), (b, _) = list(_batches(False, 2))
    la, lb = F.log_softmax(a, -1), F.log_softmax(b, -1)
    expected = (F.kl_div(lb, la, log_target=True, reduction="batchmean") + F.kl_div(la, lb, log_target=True, reduction="batchmean")) / 2
    torch.testing.assert_close(symmetric_kl(a, b, False), expected)
    assert symmetric_kl(a, a, False) == 0 and symmetric_kl(a, a, True) == 0
    pa, pb = torch.sigmoid(a), torch.sigmoid(b)
    bern = lambda p, q: p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()  # noqa: E731
    torch.testing.assert_close(symmetric_kl(a, b, True), ((bern(pa, pb) + bern(pb, pa)) / 2).mean(), rtol=1e-4, atol=1e-6)


def test_rdrop_without_dropout_equals_plain_training_and_with_dropout_trains(tiny_bert: Path, toy_files: dict[str, Path], tmp_path: Path) -> None:
    """Without dropout the two passes agree (KL 0, equal losses): R-Drop must then log exactly the plain run's
    losses, which checks that its second pass, averaging and scaling are right."""
    from conftest import logged_losses as losses
    from conftest import no_dropout_copy, tiny_config

    from textclass import train

    bert = no_dropout_copy(tiny_bert, tmp_path / "bert")
    runs = {}
    for alpha in (0.0, 1.0):
        cfg = tiny_config(bert, toy_files, tmp_path / f"run-{alpha}", logging_steps=1, max_steps=6, rdrop_alpha=alpha)
        cfg["model"]["dropout"] = 0.0
        runs[alpha] = losses(Path(train(cfg).run_dir))
    assert len(runs[0.0]) == 6
    torch.testing.assert_close(torch.tensor(runs[1.0]), torch.tensor(runs[0.0]), rtol=1e-5, atol=1e-6)

    cfg = tiny_config(tiny_bert, toy_files, tmp_path / "run-dropout", logging_steps=1, rdrop_alpha=1.0)
    with_dropout = losses(Path(train(cfg).run_dir))
    assert with_dropout[-1] < with_dropout[0]
