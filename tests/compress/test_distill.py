"""Distillation: the loss (T², KL, BCE for multi-label, unlabeled rows), the teacher (no gradients, logits
computed once, several averaged, k-fold ensembles), alpha 1 equal to plain training, unlabeled texts, and
self-distillation (the teacher's layers copied, hidden states matched) for the encoder and llm families."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from conftest import logged_losses, make_texts, tiny_config, tiny_llm_config
from test_cli import run
from textclass import Classifier, distill, train
from textclass.models.ensemble import mean_logits
from textclass.rundir import load_model
from textclass.training.losses import DistillationLoss, make_loss, soft_target_loss

SMALL = {"family": "small", "arch": "textcnn", "embedding_dim": 16, "num_filters": 8, "max_length": 32}


# -- the loss ------------------------------------------------------------------------------------------------------
def test_soft_loss_is_t_squared_kl_of_the_softened_distributions() -> None:
    torch.manual_seed(0)
    s, t, temp = torch.randn(6, 4), torch.randn(6, 4), 3.0
    p_t = torch.softmax(t / temp, -1)
    expected = (p_t * (p_t.log() - torch.log_softmax(s / temp, -1))).sum(-1).mean() * temp**2
    assert torch.allclose(soft_target_loss(s, t, temp, multi_label=False), expected, atol=1e-6)
    assert soft_target_loss(t, t, temp, multi_label=False).abs() < 1e-6  # equal predictions: nothing to learn


def test_multi_label_soft_loss_is_bce_on_independent_sigmoids() -> None:
    torch.manual_seed(1)
    s, t, temp = torch.randn(5, 3, requires_grad=True), torch.randn(5, 3), 2.0
    q = torch.sigmoid(t / temp)
    expected = -(q * F.logsigmoid(s / temp) + (1 - q) * F.logsigmoid(-s / temp)).mean(-1).mean() * temp**2
    loss = soft_target_loss(s, t, temp, multi_label=True)
    assert torch.allclose(loss, expected, atol=1e-6)
    loss.backward()
    # independent labels: a label's gradient depends on that label's logits only ((sigma(s/T) - sigma(t/T)) * T / n)
    assert s.grad is not None
    assert torch.allclose(s.grad, (torch.sigmoid(s / temp) - q).detach() * temp / s.numel(), atol=1e-6)


def test_distillation_loss_mixes_hard_and_soft_and_skips_unlabeled_rows_in_the_hard_term() -> None:
    torch.manual_seed(2)
    hard = make_loss(False, 3, "none")
    logits, teacher, target = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    labeled = torch.tensor([True, True, False, False])
    loss = DistillationLoss(hard, alpha=0.3, temperature=2.0, multi_label=False)
    expected = 0.3 * hard(logits[:2], target[:2]) + 0.7 * soft_target_loss(logits, teacher, 2.0, False)
    assert torch.allclose(loss(logits, target, teacher, labeled), expected)
    assert torch.equal(DistillationLoss(hard, 1.0, 2.0, False)(logits, target, teacher), hard(logits, target))
    assert torch.equal(loss(logits, target), hard(logits, target))  # validation: no teacher, the hard loss


# -- runs ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny BERT teacher run, data files, and a file of unlabeled texts (a few of them test texts)."""
    root = tmp_path_factory.mktemp("distill")
    files = {}
    for split, (n, seed) in {"train": (90, 30), "valid": (30, 31), "test": (30, 32)}.items():
        files[split] = root / f"{split}.csv"
        make_texts(n, seed).to_csv(files[split], index=False)
    unlabeled = pd.concat([make_texts(60, 33)[["text"]], pd.read_csv(files["test"])[["text"]].head(5)])
    unlabeled.to_csv(root / "unlabeled.csv", index=False)
    teacher = train(tiny_config(tiny_bert, files, root / "teacher", epochs=3)).run_dir
    return {"root": root, "files": files, "teacher": Path(teacher), "unlabeled": root / "unlabeled.csv"}


def _student(world: dict, **distill_keys: object) -> dict:
    return {
        "data": {k: str(v) for k, v in world["files"].items()},
        "model": SMALL,
        "training": {"epochs": 2, "batch_size": 16, "learning_rate": 3e-3, "logging_steps": 2},
        "distill": distill_keys,
    }


def test_alpha_one_equals_plain_training(world: dict, tmp_path: Path) -> None:
    """Hard labels only: the same losses, step by step, and the same model as `train` with the same config."""
    cfg = _student(world, alpha=1.0)
    distilled = distill([world["teacher"]], cfg, output=tmp_path / "student")
    plain = train({k: v for k, v in cfg.items() if k != "distill"} | {"training": cfg["training"] | {"output_dir": str(tmp_path / "plain")}})
    assert logged_losses(distilled.run_dir) == logged_losses(plain.run_dir)
    texts = pd.read_csv(world["files"]["test"])["text"].tolist()
    a, b = Classifier.load(distilled.run_dir).predict_proba(texts), Classifier.load(plain.run_dir).predict_proba(texts)
    np.testing.assert_array_equal(a, b)


def test_teacher_runs_once_without_gradients_and_the_student_learns_its_soft_labels(world: dict, tmp_path: Path, monkeypatch) -> None:
    import textclass.compress.distill as distill_mod

    calls: list[tuple[bool, int]] = []
    original = distill_mod.load_model

    def spied_load(path, *args, **kwargs):
        model = original(path, *args, **kwargs)
        model.network.register_forward_pre_hook(lambda m, a, k: calls.append((torch.is_grad_enabled(), len(k["input_ids"]))), with_kwargs=True)
        return model

    monkeypatch.setattr(distill_mod, "load_model", spied_load)
    result = distill([world["teacher"]], _student(world, alpha=0.2, temperature=3.0) | {"data": {k: str(v) for k, v in world["files"].items()} | {"unlabeled": str(world["unlabeled"])}}, output=tmp_path / "s")
    assert calls and not any(grad for grad, _ in calls)  # every teacher forward without gradients
    n_texts = sum(n for _, n in calls)
    record = result.metrics["distill"]
    assert record["labeled_texts"] == 90 - 0 and record["unlabeled_texts"] == 60  # the 5 test texts were dropped
    assert n_texts == 90 + 60  # each training text once, not once per epoch
    assert record["teachers"][0]["run_dir"] == str(world["teacher"].resolve()) and "test" in record["teachers"][0]
    assert json.loads((Path(result.run_dir) / "metrics.json").read_text())["distill"]["alpha"] == 0.2
    saved = load_model(result.run_dir)
    assert saved.cfg.distill is not None and saved.cfg.distill.teachers == [str(world["teacher"])]
    # a second run with the same teacher and texts reads the cached logits: the teacher does not run again
    calls.clear()
    distill([world["teacher"]], _student(world, alpha=0.2) | {"data": {k: str(v) for k, v in world["files"].items()} | {"unlabeled": str(world["unlabeled"])}}, output=tmp_path / "s2")
    assert calls == []


def test_several_teachers_are_averaged_like_an_ensemble(world: dict, tiny_bert: Path, tmp_path: Path) -> None:
    from textclass.compress.distill import teacher_logits

    second = train(tiny_config(tiny_bert, world["files"], tmp_path / "t2", epochs=1, seed=7)).run_dir
    paths = [world["teacher"], Path(second)]
    teachers = [load_model(p) for p in paths]
    frame = pd.read_csv(world["files"]["valid"])
    got = teacher_logits(teachers, paths, [[0, 1, 2], [0, 1, 2]], frame, 8)
    each = [torch.from_numpy(t.predict_logits(frame["text"].tolist())) for t in teachers]
    np.testing.assert_allclose(got, mean_logits(each, False).numpy(), atol=1e-5)
    np.testing.assert_allclose(torch.softmax(torch.from_numpy(got), -1).numpy(), np.mean([torch.softmax(e, -1).numpy() for e in each], 0), atol=1e-5)


def test_kfold_teacher_distils_into_one_small_model_that_exports(world: dict, tiny_bert: Path, tmp_path: Path) -> None:
    from textclass.api import export

    folds = train(tiny_config(tiny_bert, world["files"], tmp_path / "kfold", epochs=1, kfold=2)).run_dir
    result = distill([folds], _student(world, alpha=0.5), output=tmp_path / "one")
    assert result.metrics["distill"]["teachers"][0]["family"] == "encoder" and "oof" in result.metrics["distill"]["teachers"][0]
    assert "test" in result.metrics and not (Path(result.run_dir) / "folds").exists()
    assert export(result.run_dir)["parity"]["fp32_max_abs_diff"] < 1e-4


def test_multi_label_teacher_into_a_small_student(tiny_bert: Path, tmp_path: Path) -> None:
    files = {}
    for split, (n, seed) in {"train": (90, 40), "valid": (24, 41)}.items():
        df = make_texts(n, seed)
        df["label"] = [f"{a}|{b}" if i % 3 == 0 else a for i, (a, b) in enumerate(zip(df["label"], df["label"].shift(1).fillna("food")))]
        files[split] = tmp_path / f"{split}.csv"
        df.to_csv(files[split], index=False)
    teacher = train(tiny_config(tiny_bert, files, tmp_path / "teacher", epochs=2) | {"data": {k: str(v) for k, v in files.items()} | {"label_delimiter": "|"}}).run_dir
    result = distill([teacher], {"model": SMALL, "training": {"epochs": 1}, "distill": {"alpha": 0.5}}, output=tmp_path / "student")
    saved = load_model(result.run_dir)
    assert saved.multi_label and "hamming_loss" in result.metrics["valid"]


# -- self-distillation ---------------------------------------------------------------------------------------------
def test_self_distilled_encoder_starts_from_the_teachers_chosen_layers(world: dict, tmp_path: Path) -> None:
    from textclass.compress.distill import HiddenMatcher, student_from_teacher
    from textclass.models.surgery import transformer_layers

    teacher = load_model(world["teacher"])
    student = student_from_teacher(world["teacher"], [1])
    (t_layers, s_layers) = transformer_layers(teacher.network), transformer_layers(student.network)
    assert len(s_layers) == 1 and len(t_layers) == 2
    for (name, a), (_, b) in zip(s_layers[0].state_dict().items(), t_layers[1].state_dict().items(), strict=True):
        assert torch.equal(a, b), name  # a copy of teacher layer 1, not a random start
    t_state = teacher.network.state_dict()
    for name, value in student.network.state_dict().items():
        if "layer." not in name:
            assert torch.equal(value, t_state[name]), name  # embeddings and head copied
    # a twin of the teacher has zero hidden loss; a changed student has some, whatever the padding
    twin = student_from_teacher(world["teacher"], [0, 1]).network.eval()
    batch = teacher.collate(teacher.features(["goal team win", "soup bread chef oven kitchen dinner recipe"]))
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def hidden_loss(matches: list[tuple[int, int]], batch: dict) -> float:
        matcher = HiddenMatcher(twin, teacher.network, matches, 1.0)
        twin(**{k: v for k, v in batch.items() if k != "labels"})
        value = matcher(batch).item()
        matcher.remove()
        return value

    assert hidden_loss([(0, 0), (1, 1)], inputs) == pytest.approx(0.0, abs=1e-10)
    with torch.no_grad():  # now a different student: its hidden loss on a text must not depend on padding
        transformer_layers(twin)[1].output.dense.weight.mul_(2.0)  # (a constant shift would vanish in LayerNorm)
    short = {k: v for k, v in teacher.collate(teacher.features(["goal team win"])).items() if k != "labels"}
    padded = {k: torch.cat([v, torch.zeros(1, 6, dtype=v.dtype)], 1) for k, v in short.items()}  # 6 pad positions
    alone = hidden_loss([(1, 1)], short)
    assert alone > 1e-5 and hidden_loss([(1, 1)], padded) == pytest.approx(alone, rel=1e-5)


def test_self_distillation_run_of_an_encoder(world: dict, tmp_path: Path) -> None:
    cfg = {"distill": {"student": {"from_teacher": True, "layers": 1}, "hidden_weight": 1.0}, "training": {"epochs": 2}}
    result = distill([world["teacher"]], cfg, output=tmp_path / "self")
    saved = load_model(result.run_dir)
    assert saved.network.encoder.config.num_hidden_layers == 1
    assert saved.cfg.model.name == load_model(world["teacher"]).cfg.model.name  # the teacher's model section
    assert saved.parameter_counts()[0] < load_model(world["teacher"]).parameter_counts()[0]
    assert result.metrics["distill"]["from_teacher"] is True and "test" in result.metrics


def test_self_distillation_of_a_lora_llm_into_a_one_layer_full_model(tiny_llama: Path, tmp_path: Path) -> None:
    files = {}
    for split, (n, seed) in {"train": (60, 50), "valid": (15, 51)}.items():
        files[split] = tmp_path / f"{split}.csv"
        make_texts(n, seed).to_csv(files[split], index=False)
    teacher = train(tiny_llm_config(tiny_llama, files, tmp_path / "teacher", epochs=1)).run_dir
    result = distill([teacher], {"distill": {"student": {"from_teacher": True, "layers": [1]}}, "training": {"epochs": 1}}, output=tmp_path / "s")
    saved = load_model(result.run_dir)
    assert saved.cfg.model.finetune == "full" and saved.network.body.config.num_hidden_layers == 1
    probs = Classifier.load(result.run_dir).predict_proba(["goal team win"])
    assert probs.shape == (1, 3) and np.isclose(probs.sum(), 1.0, atol=1e-5)


def test_self_distillation_refuses_a_small_teacher(world: dict, tmp_path: Path) -> None:
    small = train({"data": {k: str(v) for k, v in world["files"].items()}, "model": SMALL, "training": {"epochs": 1, "output_dir": str(tmp_path / "small")}}).run_dir
    proc = run("distill", "-t", small, "-o", tmp_path / "s", "--set", "distill.student={from_teacher: true, layers: 1}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert not (tmp_path / "s").exists()


def test_cli_prints_how_much_of_the_teacher_the_student_keeps(world: dict, tmp_path: Path) -> None:
    import yaml

    (tmp_path / "student.yaml").write_text(yaml.safe_dump({"model": SMALL, "training": {"epochs": 1}}))
    proc = run("distill", "--teacher", world["teacher"], "--config", tmp_path / "student.yaml", "--output", tmp_path / "s")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "the student keeps" in proc.stdout and "run directory:" in proc.stdout


def test_a_built_in_set_offers_its_training_texts_this_run_does_not_use() -> None:
    from textclass.config import DataConfig
    from textclass.data.builtin import load_builtin
    from textclass.data.labels import LabelSet
    from textclass.data.prepare import PreparedData
    from textclass.compress.distill import unlabeled_texts

    pool = load_builtin("chinese-reviews")["train"]
    used = pool.head(300).assign(labels=lambda d: d["label"].map(lambda x: [x]))[["text", "labels"]]
    labels = LabelSet.from_labels(used["labels"], False)
    data = PreparedData(train=used.iloc[:200], valid=used.iloc[200:250], test=used.iloc[250:], labels=labels)
    got = unlabeled_texts(DataConfig(dataset="chinese-reviews", unlabeled="chinese-reviews", unlabeled_limit=500), data)
    assert len(got) == 500 and list(got.columns) == ["text"]
    assert not set(got["text"]) & set(used["text"])  # none of this run's train, valid or test texts
    everything = unlabeled_texts(DataConfig(dataset="chinese-reviews", unlabeled="chinese-reviews"), data)
    assert len(everything) == len(pool) - 300
