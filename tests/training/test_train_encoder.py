"""End to end on a tiny random BERT: train, run directory, evaluate, predict, resume, heads, losses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from textclass import Classifier, evaluate, train
from textclass.errors import UserError

from conftest import tiny_config


@pytest.fixture(scope="module")
def trained(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory):
    """One trained tiny run shared by the read-only tests below."""
    from conftest import make_texts

    root = tmp_path_factory.mktemp("trained")
    files = {}
    for split, (n, seed) in {"train": (120, 10), "valid": (30, 11), "test": (30, 12)}.items():
        files[split] = root / f"{split}.csv"
        make_texts(n, seed).to_csv(files[split], index=False)
    result = train(tiny_config(tiny_bert, files, root / "run"))
    return result, files


def test_learns_the_toy_task(trained) -> None:
    result, _ = trained
    assert result.metrics["test"]["accuracy"] >= 0.9
    assert result.metrics["valid"]["macro_f1"] >= 0.9


def test_run_directory_contract(trained) -> None:
    result, _ = trained
    run = result.run_dir
    for name in ["config.yaml", "labels.json", "model.safetensors", "encoder_config.json", "tokenizer.json",
                 "metrics.json", "training_log.json", "training_curves.png", "data_audit.json"]:
        assert (run / name).is_file(), name
    assert not (run / "checkpoints").exists()  # finished runs keep only what prediction needs
    for name in ["metrics.json", "per_class.csv", "confusion_matrix.csv", "confusion_matrix.png", "badcases.csv"]:
        assert (run / "eval" / "test" / name).is_file(), name
    labels = json.loads((run / "labels.json").read_text())
    assert labels == {"labels": ["food", "sport", "tech"], "multi_label": False}
    assert not list(run.rglob("*.pt")) and not list(run.rglob("*.bin"))  # safetensors only


def test_classifier_load_predict_matches_training_eval(trained) -> None:
    result, files = trained
    clf = Classifier.load(result.run_dir)
    test = pd.read_csv(files["test"])
    preds = clf.predict(test["text"].tolist())
    assert set(preds[0]) == {"label", "score", "scores"}
    assert list(preds[0]["scores"].values()) == sorted(preds[0]["scores"].values(), reverse=True)
    acc = np.mean([p["label"] == g for p, g in zip(preds, test["label"])])
    assert acc == pytest.approx(result.metrics["test"]["accuracy"])
    probs = clf.predict_proba(test["text"].tolist())
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_batching_order_and_padding_do_not_change_scores(trained) -> None:
    result, files = trained
    texts = pd.read_csv(files["test"])["text"].tolist()[:9]
    batched = Classifier.load(result.run_dir, batch_size=4).predict_proba(texts)
    single = np.stack([Classifier.load(result.run_dir, batch_size=1).predict_proba([t])[0] for t in texts])
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_evaluate_writes_reports(trained, tmp_path: Path) -> None:
    result, files = trained
    report = evaluate(result.run_dir, files["test"], tmp_path / "rep")
    assert report["metrics"]["accuracy"] == pytest.approx(result.metrics["test"]["accuracy"])
    bad = pd.read_csv(tmp_path / "rep" / "badcases.csv")
    assert len(bad) == report["num_errors"]
    cm = pd.read_csv(tmp_path / "rep" / "confusion_matrix.csv", index_col=0)
    assert int(cm.to_numpy().sum()) == 30


def test_pooling_finds_cls_anywhere() -> None:
    from textclass.models.encoder import pool

    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)
    ids = torch.tensor([[101, 5, 6, 0], [0, 0, 7, 101]])  # second row: left padding, CLS last (XLNet-style)
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1]])
    assert pool(hidden, mask, ids, "cls", 101).flatten().tolist() == [0.0, 7.0]
    assert pool(hidden, mask, ids, "mean", 101).flatten().tolist() == [1.0, 6.5]


def test_hf_head_and_mean_pooling_train(tiny_bert: Path, toy_files: dict, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_bert, toy_files, tmp_path / "hf", epochs=10, learning_rate=2e-3)
    cfg["model"]["head"] = "hf"
    result = train(cfg)
    assert (result.run_dir / "config.json").is_file()
    assert result.metrics["test"]["accuracy"] >= 0.8
    cfg = tiny_config(tiny_bert, toy_files, tmp_path / "mean", epochs=3)
    cfg["model"]["pooling"] = "mean"
    assert train(cfg).metrics["test"]["accuracy"] >= 0.8


def test_multilabel_bce_and_threshold(tiny_bert: Path, tmp_path: Path) -> None:
    from conftest import make_texts

    def tags(df: pd.DataFrame) -> pd.DataFrame:
        out = df.copy()
        urgent = np.arange(len(df)) % 2 == 0
        out["text"] = [t + " urgent" if u else t for t, u in zip(df["text"], urgent)]
        out["tags"] = [[l] + (["urgent"] if u else []) for l, u in zip(df["label"], urgent)]
        return out.drop(columns="label")

    files = {}
    for split, (n, seed) in {"train": (150, 20), "test": (30, 21)}.items():
        files[split] = tmp_path / f"{split}.jsonl"
        tags(make_texts(n, seed)).to_json(files[split], orient="records", lines=True)
    cfg = tiny_config(tiny_bert, files, tmp_path / "ml", epochs=6, best_metric="micro_f1")
    cfg["data"]["label_column"] = "tags"
    cfg["evaluation"] = {"tune_threshold": True}
    result = train(cfg)
    assert result.metrics["test"]["micro_f1"] >= 0.6
    assert {"subset_accuracy", "hamming_loss"} <= set(result.metrics["test"])
    clf = Classifier.load(result.run_dir)
    assert clf.multi_label and clf.labels == ["food", "sport", "tech", "urgent"]
    pred = clf.predict(["match goal team player coach urgent"])[0]
    assert pred["labels"] == ["sport", "urgent"] or pred["labels"] == ["urgent", "sport"]


def test_text_pairs_train(tiny_bert: Path, tmp_path: Path) -> None:
    from conftest import make_texts

    a, b = make_texts(120, 30), make_texts(120, 31).sample(frac=1, random_state=0).reset_index(drop=True)
    df = pd.DataFrame({"q1": a["text"], "q2": b["text"], "same": (a["label"] == b["label"]).map({True: "yes", False: "no"})})
    df.to_csv(tmp_path / "pairs.csv", index=False)
    cfg = tiny_config(tiny_bert, {"train": tmp_path / "pairs.csv"}, tmp_path / "pairs", epochs=1)
    cfg["data"].update(text_column="q1", text_pair_column="q2", label_column="same")
    result = train(cfg)
    clf = Classifier.load(result.run_dir)
    out = clf.predict(["goal team"], pairs=["match coach"])
    assert out[0]["label"] in {"yes", "no"}


@pytest.mark.parametrize("final_model", ["best", "last"])
def test_resume_matches_uninterrupted(tiny_bert: Path, toy_files: dict, tmp_path: Path, final_model: str) -> None:
    """Stop after the first epoch's checkpoint, resume, and end with the same metrics and weights."""
    from transformers import TrainerCallback

    class StopAfterFirstSave(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            raise KeyboardInterrupt("simulated crash")

    full = train(tiny_config(tiny_bert, toy_files, tmp_path / "full", epochs=2, keep_checkpoints=True, final_model=final_model))

    import textclass.training.trainer as tr

    original = tr.build_trainer

    def crashing(*args, **kwargs):
        trainer = original(*args, **kwargs)
        trainer.add_callback(StopAfterFirstSave())
        return trainer

    tr.build_trainer = crashing
    import textclass.training.run as run_mod

    run_mod.build_trainer = crashing
    cfg = tiny_config(tiny_bert, toy_files, tmp_path / "resumed", epochs=2, keep_checkpoints=True, final_model=final_model)
    try:
        with pytest.raises(KeyboardInterrupt):
            train(cfg)
    finally:
        tr.build_trainer = original
        run_mod.build_trainer = original
    assert not (tmp_path / "resumed" / "config.yaml").exists()  # unfinished runs are not loadable
    with pytest.raises(UserError, match="not a textclass run directory"):
        Classifier.load(tmp_path / "resumed")
    resumed = train(cfg, resume=True)
    assert resumed.metrics["valid"] == full.metrics["valid"]
    assert resumed.metrics["test"] == full.metrics["test"]
    a = Classifier.load(full.run_dir).predict_proba(["goal team chip"])
    b = Classifier.load(resumed.run_dir).predict_proba(["goal team chip"])
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_final_model_keeps_the_best_or_the_last_weights(tiny_bert: Path, toy_files: dict, tmp_path: Path) -> None:
    """Valid accuracy reaches 1.0 at step 32 of 48 here: `best` keeps step 32's weights, `last` (the encoder
    default) step 48's, and each run's valid report is computed from the weights it kept."""
    from safetensors.torch import load_file

    runs = {}
    for final in ["best", None]:
        cfg = tiny_config(tiny_bert, toy_files, tmp_path / str(final), epochs=6, learning_rate=1e-2, best_metric="accuracy",
                          keep_checkpoints=True, save_total_limit=6, final_model=final)
        runs[final] = result = train(cfg)
        assert result.metrics["train"]["global_step"] == 48
        kept = result.metrics["train"]["kept_step"]
        assert (result.metrics["train"]["final_model"], kept) == (("best", 32) if final else ("last", 48))
        saved = load_file(str(result.run_dir / "model.safetensors"))
        checkpoint = load_file(str(result.run_dir / "checkpoints" / f"checkpoint-{kept}" / "model.safetensors"))
        assert saved.keys() == checkpoint.keys()
        for name, tensor in saved.items():
            torch.testing.assert_close(tensor, checkpoint[name], rtol=0, atol=0, msg=name)
        report = evaluate(result.run_dir, toy_files["valid"], tmp_path / f"valid-{final}")
        assert report["metrics"] == pytest.approx(result.metrics["valid"])
    saved_cfg = yaml.safe_load((runs[None].run_dir / "config.yaml").read_text())
    assert saved_cfg["training"]["final_model"] == "last"  # the resolved default is saved
    a = Classifier.load(runs["best"].run_dir).predict_proba(["goal team chip"])
    b = Classifier.load(runs[None].run_dir).predict_proba(["goal team chip"])
    assert not np.allclose(a, b)


def test_existing_run_dir_is_not_clobbered(trained, tiny_bert: Path) -> None:
    result, files = trained
    with pytest.raises(UserError, match="already holds a finished run; pass --overwrite"):
        train(tiny_config(tiny_bert, files, result.run_dir))


def test_class_weights_length_checked(tiny_bert: Path, toy_files: dict, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="3 labels"):
        train(tiny_config(tiny_bert, toy_files, tmp_path / "w", class_weights=[1.0, 2.0]))


def test_tensorboard_and_early_stopping(tiny_bert: Path, toy_files: dict, tmp_path: Path) -> None:
    result = train(tiny_config(tiny_bert, toy_files, tmp_path / "tb", epochs=30, tensorboard=True, early_stopping_patience=1,
                               best_metric="accuracy"))
    assert list((result.run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert result.metrics["train"]["epochs"] < 30  # stopped once valid accuracy (soon 1.0) stopped improving
    assert result.metrics["train"]["final_model"] == "best"  # early stopping keeps the best, whatever the family


def test_reports_come_from_the_weights_as_saved(tiny_bert: Path, toy_files: dict, tmp_path: Path) -> None:
    """Trained under bf16 autocast, the run's valid and test reports equal `evaluate` on the saved run, to the
    last probability (they were computed from the training-time bf16 forward: 9 of 3,000 decisions differed)."""
    import pandas as pd

    from textclass import evaluate

    result = train(tiny_config(tiny_bert, toy_files, tmp_path / "run", precision="bf16", epochs=2))
    assert result.metrics["train"]["precision"] == "bf16"
    for split in ("valid", "test"):
        report = evaluate(result.run_dir, toy_files[split], tmp_path / f"eval-{split}")
        assert report["metrics"] == result.metrics[split], split
        for name in ("badcases.csv", "confusion_matrix.csv"):  # badcases carry each wrong text's scores
            pd.testing.assert_frame_equal(
                pd.read_csv(result.run_dir / "eval" / split / name), pd.read_csv(tmp_path / f"eval-{split}" / name)
            )


def test_auto_precision_follows_the_hardware(monkeypatch: pytest.MonkeyPatch) -> None:
    from textclass.training import trainer as tr

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(tr, "cpu_has_native_bf16", lambda: True)
    from textclass.models.registry import get_family

    encoder, small = get_family("encoder").cpu_autocast, get_family("small").cpu_autocast
    assert tr.resolve_precision("auto", encoder) == {"bf16": True, "use_cpu": True}
    assert tr.resolve_precision("auto", small) == {}  # embedding-bound: autocast would only add casts
    assert tr.resolve_precision("fp32", encoder) == {}
    monkeypatch.setattr(tr, "cpu_has_native_bf16", lambda: False)
    assert tr.resolve_precision("auto", encoder) == {}  # emulated bf16 is slower than fp32
    assert tr.resolve_precision("bf16", encoder) == {"bf16": True, "use_cpu": True}  # asked for: honoured
    with pytest.raises(UserError, match="training.precision=fp16"):
        tr.resolve_precision("fp16", encoder)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_cpu_precision_is_used_and_recorded(tiny_bert: Path, toy_files: dict, tmp_path: Path, precision: str) -> None:
    result = train(tiny_config(tiny_bert, toy_files, tmp_path / "run", precision=precision, epochs=2))
    assert result.metrics["train"]["precision"] == precision
    saved = json.loads((result.run_dir / "metrics.json").read_text())
    assert saved["train"]["precision"] == precision
    clf = Classifier.load(result.run_dir)  # weights stay fp32 whatever the training precision
    assert all(p.dtype == torch.float32 for p in clf.predictor.model.network.parameters())


def test_length_grouped_batches_come_in_random_order() -> None:
    from textclass.training.trainer import ShuffledLengthGroupedSampler

    lengths = [int(n) for n in torch.randint(1, 300, (1003,), generator=torch.Generator().manual_seed(0))]
    sampler = ShuffledLengthGroupedSampler(16, lengths=lengths, seed=1)
    indices = list(sampler)
    assert sorted(indices) == list(range(1003))  # every example exactly once per epoch
    batches = [indices[i : i + 16] for i in range(0, len(indices), 16)]
    assert lengths[batches[0][0]] == max(lengths)  # the longest batch first: memory errors show at once
    assert len(batches[-1]) == 1003 % 16  # the short batch last, so the DataLoader's cuts stay aligned
    spans = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches[:-1]]
    assert np.median(spans) < 20  # still grouped: little padding (random batches span ~250)
    maxima = [max(lengths[i] for i in b) for b in batches[1:-1]]
    falls = sum(a > b for a, b in zip(maxima, maxima[1:]))
    assert 0.3 < falls / (len(maxima) - 1) < 0.7  # no long->short sweeps: HF's own order falls 93% of the time
    again = list(ShuffledLengthGroupedSampler(16, lengths=lengths, seed=1))
    assert again == indices  # seeded: --resume replays the same batches
    torch.manual_seed(123)  # the global RNG plays no part
    assert list(ShuffledLengthGroupedSampler(16, lengths=lengths, seed=1)) == indices
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != indices and sorted(second) == sorted(indices)  # a new order each epoch, from (seed, epoch)


@pytest.mark.parametrize("head", ["linear", "hf"])
def test_head_lr_scale_gives_the_new_head_its_own_rate(tiny_bert: Path, tmp_path: Path, head: str) -> None:
    from torch import nn
    from transformers import TrainingArguments

    from textclass.config import EncoderModelConfig, build_config
    from textclass.data.labels import LabelSet
    from textclass.models.encoder import EncoderFamily
    from textclass.training.trainer import ClassifierTrainer

    family = EncoderFamily()
    mcfg = EncoderModelConfig(family="encoder", name=str(tiny_bert), head=head)
    cfg = build_config({"data": {"train": "x.csv"}, "model": mcfg.model_dump()})
    model = family.create(cfg, LabelSet(["a", "b", "c"], multi_label=False), []).network
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3, warmup_steps=0, use_cpu=True, report_to="none")
    trainer = ClassifierTrainer(model=model, args=args, loss_fn=nn.CrossEntropyLoss(), head_lr_scale=10.0)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    head_ids = {id(p) for n, p in model.named_parameters() if "classifier" in n}
    assert head_ids and len(head_ids) == 2  # weight and bias of the one linear layer
    seen = set()
    for group in trainer.optimizer.param_groups:
        ids = {id(p) for p in group["params"]}
        assert ids <= head_ids or not ids & head_ids  # no group mixes head and body
        want = 1e-2 if ids <= head_ids else 1e-3
        assert group["lr"] == pytest.approx(want)
        seen |= ids
    assert seen == {id(p) for p in model.parameters()}  # every weight is trained, once
    for _ in range(5):  # the linear schedule scales both rates alike
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    rates = {ids <= head_ids: g["lr"] for g in trainer.optimizer.param_groups if (ids := {id(p) for p in g["params"]})}
    assert rates[True] == pytest.approx(10 * rates[False]) and rates[False] == pytest.approx(5e-4)


def test_tokenization_cache_follows_the_tokenizer_not_its_path(tiny_bert: Path, tmp_path: Path) -> None:
    """A model folder replaced in place (same path, other vocabulary) must not reuse the cached ids."""
    from transformers import AutoTokenizer

    from textclass.config import build_config
    from textclass.data.labels import LabelSet
    from textclass.models.encoder import EncoderModel
    from textclass.models.registry import get_family
    from textclass.training.trainer import tokenize

    folder = tmp_path / "model"
    shutil.copytree(tiny_bert, folder)
    cfg = build_config({"data": {"train": "x.csv"}, "model": {"name": str(folder), "max_length": 16}})
    family = get_family("encoder")
    df = pd.DataFrame({"text": ["goal team chip", "bread soup"]})
    labels = LabelSet(["a", "b"], multi_label=False)

    def tokenize_with(tok: object) -> list:
        return list(tokenize(EncoderModel(family, torch.nn.Module(), tok, labels, cfg), df, with_labels=False)["input_ids"])

    first = tokenize_with(AutoTokenizer.from_pretrained(folder))
    state = json.loads((folder / "tokenizer.json").read_text())
    words = sorted(state["model"]["vocab"], key=state["model"]["vocab"].get)
    swapped = words[:5] + words[5:][::-1]  # same specials, the words' ids reversed
    state["model"]["vocab"] = {w: i for i, w in enumerate(swapped)}
    (folder / "tokenizer.json").write_text(json.dumps(state))
    tok = AutoTokenizer.from_pretrained(folder)
    again = tokenize_with(tok)
    assert again == tok(df["text"].tolist(), truncation=True, max_length=16)["input_ids"]
    assert again != first
