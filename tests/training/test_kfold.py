"""k-fold training (`training.kfold`): folds that never see the test split, out-of-fold predictions made
exactly once per text by the fold that held it out, one run directory that loads, predicts, evaluates,
exports and serves as one model (the mean of the folds' probabilities), and --resume that keeps finished folds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import make_texts, tiny_config, tiny_llm_config
from textclass import Classifier, train
from textclass.data.folds import assign_folds
from textclass.data.labels import LabelSet
from textclass.errors import Interrupted, UserError
from textclass.rundir import load_model

K = 3
PROBE = ["goal team chip", "bread soup coach", "the new code", "stadium oven data win", "我爱自然语言处理"]


def _files(root: Path, n: dict[str, int] | None = None, test_word: str | None = None) -> dict[str, Path]:
    """train/valid/test CSVs without a text repeated anywhere (so texts identify rows); test texts may carry
    a word that no other split has."""
    n = n or {"train": 60, "valid": 15, "test": 15}
    seen: set[str] = set()
    files = {}
    for seed, (split, size) in enumerate(n.items()):
        df = make_texts(size * 2, seed=20 + seed)
        if split == "test" and test_word:
            df["text"] = df["text"] + f" {test_word}"
        df = df[~df["text"].isin(seen)].drop_duplicates("text").groupby("label").head(size // 3).reset_index(drop=True)
        seen |= set(df["text"])
        files[split] = root / f"{split}.csv"
        df.to_csv(files[split], index=False)
    return files


class TokenizeSpy:
    """Records what each fold's Trainer was given: {fold run dir: [train texts, valid texts]}."""

    def __init__(self) -> None:
        import textclass.training.run as run_mod

        self.original = run_mod.tokenize
        self.calls: dict[str, list[list[str]]] = {}

    def __call__(self, model, df, *args, **kwargs):
        self.calls.setdefault(str(model.cfg.training.output_dir), []).append(df["text"].tolist())
        return self.original(model, df, *args, **kwargs)


@pytest.fixture(scope="module")
def encoder_run(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory):
    """A 3-fold run of the tiny BERT, with what each fold's Trainer saw."""
    import textclass.training.run as run_mod

    root = tmp_path_factory.mktemp("kfold")
    files = _files(root)
    cfg = tiny_config(tiny_bert, files, root / "run", epochs=2, kfold=K, eval_batch_size=8)
    spy = TokenizeSpy()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_mod, "tokenize", spy)
        result = train(cfg)
    return result, cfg, files, spy.calls


def _texts(path: Path) -> list[str]:
    return pd.read_csv(path)["text"].tolist()


def test_no_fold_sees_the_test_texts_and_every_text_is_predicted_out_of_fold_once(encoder_run) -> None:
    result, _, files, calls = encoder_run
    run_dir = Path(result.run_dir)
    pool, test = _texts(files["train"]) + _texts(files["valid"]), set(_texts(files["test"]))
    folds = sorted(calls)
    assert [Path(f).relative_to(run_dir).as_posix() for f in folds] == [f"folds/fold-{i}" for i in range(1, K + 1)]
    held_out = {}
    for i, folder in enumerate(folds, start=1):
        assert len(calls[folder]) == 2  # the fold's train and valid splits, nothing else
        fold_train, fold_valid = calls[folder]
        assert sorted(fold_train + fold_valid) == sorted(pool)  # each fold splits all of train+valid ...
        assert not set(fold_train) & set(fold_valid)
        assert not (set(fold_train) | set(fold_valid)) & test  # ... and never a test text
        held_out.update({t: (i, set(fold_train)) for t in fold_valid})
    assert sorted(held_out) == sorted(pool)  # the held-out folds partition train+valid

    oof = pd.read_csv(run_dir / "oof_predictions.csv")
    assert sorted(oof["text"]) == sorted(pool) and oof["row"].tolist() == list(range(len(pool)))  # each text once
    for text, fold in zip(oof["text"], oof["fold"], strict=True):
        assert held_out[text][0] == fold  # predicted by the fold that held it out ...
        assert text not in held_out[text][1]  # ... whose training set did not include it
    assert set(oof["fold"]) == set(range(1, K + 1))

    # The OOF scores are those of each fold's saved model on its held-out texts.
    scores = [c for c in oof.columns if c.startswith("score_")]
    for i in range(1, K + 1):
        part = oof[oof["fold"] == i]
        probs = load_model(run_dir / "folds" / f"fold-{i}").predict_proba(part["text"].tolist())
        np.testing.assert_allclose(part[scores].to_numpy(), probs, atol=1e-6)

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["kfold"] == K and [f["fold"] for f in metrics["folds"]] == [1, 2, 3]
    assert metrics["oof"]["accuracy"] == pytest.approx(float((oof["gold"] == oof["predicted"]).mean()))
    assert metrics["oof"]["num_examples"] == len(pool) and metrics["test"]["num_examples"] == len(test)
    for i, fold in enumerate(metrics["folds"], start=1):
        assert fold == json.loads((run_dir / "folds" / f"fold-{i}" / "metrics.json").read_text())["valid"] | {"fold": i}
    assert result.metrics == metrics
    assert (run_dir / "eval" / "oof" / "metrics.json").is_file() and (run_dir / "eval" / "test" / "metrics.json").is_file()
    assert not (run_dir / "checkpoints").exists()


def test_the_run_directory_is_one_model_whose_probabilities_are_the_folds_mean(encoder_run) -> None:
    result, _, files, _ = encoder_run
    run_dir = Path(result.run_dir)
    ensemble = load_model(run_dir)
    folds = [load_model(run_dir / "folds" / f"fold-{i}") for i in range(1, K + 1)]
    texts = PROBE + _texts(files["test"])
    mean = np.mean([m.predict_proba(texts) for m in folds], axis=0)
    got = ensemble.predict_proba(texts, batch_size=4)
    np.testing.assert_allclose(got, mean, atol=1e-5)
    assert ensemble.parameter_counts() == tuple(sum(c) for c in zip(*(m.parameter_counts() for m in folds)))
    # The ensemble's test metrics are those of the mean probabilities.
    test = pd.read_csv(files["test"])
    names = ensemble.labels.names
    accuracy = float((np.asarray(names)[mean[len(PROBE) :].argmax(1)] == test["label"]).mean())
    assert result.metrics["test"]["accuracy"] == pytest.approx(accuracy)
    np.testing.assert_allclose(Classifier.load(run_dir).predict_proba(texts), got, atol=1e-6)


def test_predict_evaluate_info_and_serve_take_it_as_one_model(encoder_run, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from test_cli import run
    from textclass.inference.load import load_predictor
    from textclass.serve import ServeSettings
    from textclass.serve.app import create_app

    result, _, files, _ = encoder_run
    run_dir = Path(result.run_dir)
    proc = run("evaluate", "--model", run_dir, "--data", files["test"], "--output", tmp_path / "eval")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["accuracy"] == pytest.approx(result.metrics["test"]["accuracy"])
    out = tmp_path / "pred.csv"
    assert run("predict", "--model", run_dir, "--input", files["test"], "--output", out).returncode == 0
    predicted = pd.read_csv(out)
    assert len(predicted) == len(_texts(files["test"])) and {"label", "score"} <= set(predicted.columns)
    info = run("info", "--model", run_dir)
    assert info.returncode == 0, info.stderr[-2000:]
    assert f"{K}-fold ensemble" in info.stdout and "out-of-fold" in info.stdout

    predictor = load_predictor(run_dir)
    with TestClient(create_app(predictor, ServeSettings()), raise_server_exceptions=False) as client:
        r = client.post("/v1/classify", json={"texts": PROBE[:3]})
    assert r.status_code == 200, r.text
    served = [row["scores"][row["label"]] for row in r.json()["results"]]
    np.testing.assert_allclose(served, predictor.predict_proba(PROBE[:3]).max(1), atol=1e-5)


def test_onnx_export_is_one_graph_with_parity(encoder_run, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    import shutil

    from textclass import api

    result, _, files, _ = encoder_run
    run_dir = tmp_path / "run"
    shutil.copytree(result.run_dir, run_dir)
    record = api.export(run_dir)
    assert record["parity"]["fp32_max_abs_diff"] <= 1e-4 and record["files"] == {"fp32": "model.onnx"}
    texts = PROBE + _texts(files["test"])
    torch_probs = Classifier.load(run_dir, backend="torch").predict_proba(texts)
    onnx = Classifier.load(run_dir, backend="onnx")
    assert onnx.backend == "onnx"
    assert np.abs(onnx.predict_proba(texts) - torch_probs).max() <= 1e-4
    # --optimize (the generic graph optimisation: onnxruntime's transformer fusion takes one transformer) and int8.
    record = api.export(run_dir, output=tmp_path / "optimized", optimize=True, int8=True)
    assert record["parity"]["fp32_max_abs_diff"] <= 1e-4 and record["optimized"] and record["default"] == "int8"
    assert record["parity"]["int8_agreement"] >= 0.8


# ---- folds ---------------------------------------------------------------------------------------------


def test_single_label_folds_are_stratified_deterministic_and_shuffled() -> None:
    df = pd.DataFrame({"labels": [["a"]] * 30 + [["b"]] * 12 + [["c"]] * 5})
    labels = LabelSet.from_labels(df["labels"], False)
    folds = assign_folds(df, labels, 5, seed=1)
    assert np.bincount(folds).tolist() == [10, 10, 9, 9, 9]
    for name, size in {"a": 30, "b": 12, "c": 5}.items():
        per_fold = np.bincount(folds[(df["labels"].str[0] == name).to_numpy()], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1 and per_fold.sum() == size
    np.testing.assert_array_equal(assign_folds(df, labels, 5, seed=1), folds)
    assert not np.array_equal(assign_folds(df, labels, 5, seed=2), folds)
    assert not np.array_equal(folds[:30], np.sort(folds[:30]))  # shuffled, not consecutive blocks
    with pytest.raises(UserError, match=r"training.kfold: 6 folds .* label 'c' has 5 in train\+valid; lower training.kfold to 5"):
        assign_folds(df, labels, 6, seed=1)


def test_multi_label_folds_keep_every_label_in_every_fold(caplog: pytest.LogCaptureFixture) -> None:
    """Iterative stratification: each label with at least K examples appears in every held-out fold, in
    about its share; rarer labels are allowed, with a warning naming them."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(90):
        ls = [n for n, p in {"common": 0.6, "mid": 0.3, "rare": 0.07}.items() if rng.random() < p] or ["other"]
        rows.append(ls)
    rows[0], rows[1] = ["rare", "tiny"], ["tiny"]
    df = pd.DataFrame({"labels": rows})
    labels = LabelSet.from_labels(df["labels"], True)
    y = labels.encode_all(df["labels"])
    k = 4
    with caplog.at_level("WARNING", logger="textclass"):
        folds = assign_folds(df, labels, k, seed=3)
    assert "'tiny' (2)" in caplog.text and "'rare'" not in caplog.text
    counts = y.sum(0)
    for j, name in enumerate(labels.names):
        per_fold = np.array([y[folds == f, j].sum() for f in range(k)])
        assert per_fold.sum() == counts[j]
        if counts[j] >= k:
            assert per_fold.min() >= 1, (name, per_fold)
            assert per_fold.max() - per_fold.min() <= max(2, counts[j] // 10), (name, per_fold)
    np.testing.assert_array_equal(assign_folds(df, labels, k, seed=3), folds)


# ---- --resume -----------------------------------------------------------------------------------------


def test_resume_keeps_the_finished_fold_and_ends_as_an_uninterrupted_run(
    encoder_run, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from transformers import TrainerCallback

    import textclass.training.run as run_mod

    full, cfg, files, _ = encoder_run
    out = Path(full.run_dir).parent / "resumed"
    cfg = {**cfg, "training": {**cfg["training"], "output_dir": str(out)}}
    built = []
    original = run_mod.build_trainer

    class StopAfterSave(TrainerCallback):
        def on_save(self, *args, **kwargs):
            raise KeyboardInterrupt

    def build(*args, **kwargs):  # the second fold stops right after its first checkpoint (end of epoch 1 of 2)
        trainer = original(*args, **kwargs)
        built.append(trainer)
        if len(built) == 2:
            trainer.add_callback(StopAfterSave())
        return trainer

    monkeypatch.setattr(run_mod, "build_trainer", build)
    with pytest.raises(Interrupted, match=r"fold 2/3: .*--resume"):
        train(cfg)
    monkeypatch.undo()
    fold1 = out / "folds" / "fold-1"
    assert (fold1 / "config.yaml").is_file() and not (out / "config.yaml").exists()
    assert list((out / "folds" / "fold-2" / "checkpoints").glob("checkpoint-*/trainer_state.json"))
    # As if the run had stopped right after fold 1 finished, before its held-out predictions were written:
    # the resumed run predicts them again with fold 1's saved model.
    (fold1 / "oof_predictions.csv").unlink()
    stamps = {p: p.stat().st_mtime_ns for p in fold1.rglob("*") if p.is_file()}

    changed = {**cfg, "training": {**cfg["training"], "kfold": 4}}
    with pytest.raises(UserError, match=r"training.kfold \(3 -> 4\) cannot change on --resume"):
        train(changed, resume=True)
    original_train = files["train"].read_bytes()
    try:  # the same texts in another order make other folds: the kept fold 1 would no longer fit
        pd.read_csv(files["train"]).iloc[::-1].to_csv(files["train"], index=False)
        with pytest.raises(UserError, match="the training data changed since the interrupted run"):
            train(cfg, resume=True)
    finally:
        files["train"].write_bytes(original_train)

    caplog.clear()
    with caplog.at_level("INFO", logger="textclass"):
        resumed = train(cfg, resume=True)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fold ")]
    assert said[0] == "fold 1/3: finished before, kept as it is"
    assert said[1].startswith("fold 2/3: training on") and said[1].endswith("(resuming from its last checkpoint)")
    assert said[2].startswith("fold 3/3: training on") and "resuming" not in said[2]
    after = {p: p.stat().st_mtime_ns for p in fold1.rglob("*") if p.is_file()}
    assert after.pop(fold1 / "oof_predictions.csv") and after == stamps  # fold 1 was not retrained
    for key in ("folds", "oof", "test"):
        assert resumed.metrics[key] == full.metrics[key], key
    np.testing.assert_array_equal(Classifier.load(out).predict_proba(PROBE), Classifier.load(full.run_dir).predict_proba(PROBE))
    assert pd.read_csv(out / "oof_predictions.csv").equals(pd.read_csv(Path(full.run_dir) / "oof_predictions.csv"))


def test_ctrl_c_before_any_checkpoint_removes_the_new_run_dir(tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import TrainerCallback

    import textclass.training.run as run_mod

    original = run_mod.build_trainer

    class Stop(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            raise KeyboardInterrupt

    def build(*args, **kwargs):
        trainer = original(*args, **kwargs)
        trainer.add_callback(Stop())
        return trainer

    monkeypatch.setattr(run_mod, "build_trainer", build)
    out = tmp_path / "run"
    with pytest.raises(Interrupted, match="nothing was kept"):
        train(tiny_config(tiny_bert, _files(tmp_path), out, epochs=1, kfold=2))
    assert not out.exists()


# ---- the other families --------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["fasttext", "textcnn"])
def test_small_family_shares_one_vocabulary_without_test_words(arch: str, tmp_path: Path) -> None:
    """fastText and TextCNN: the vocabulary is fitted once on train+valid (never on the test texts), the folds
    share it, and the ensemble exports as one graph (fastText: its bags layout) with parity."""
    files = _files(tmp_path, test_word="zyzzyva")
    model = {"family": "small", "arch": arch, "max_length": 32, "embedding_dim": 8}
    model |= {"buckets": 1000} if arch == "fasttext" else {"num_filters": 4}
    cfg = {
        "data": {k: str(v) for k, v in files.items()},
        "model": model,
        "training": {"output_dir": str(tmp_path / "run"), "epochs": 2, "batch_size": 16, "kfold": 2},
    }
    run_dir = Path(train(cfg).run_dir)
    vocabs = [json.loads((run_dir / "folds" / f"fold-{i}" / "textclass_tokenizer.json").read_text()) for i in (1, 2)]
    assert vocabs[0] == vocabs[1] and "zyzzyva" not in json.dumps(vocabs[0])
    words = set(" ".join(_texts(files["train"]) + _texts(files["valid"])).split())
    assert words <= set(json.dumps(vocabs[0]).replace('"', " ").split())  # held-out words too: one shared vocabulary
    texts = PROBE + _texts(files["test"])
    mean = np.mean([load_model(run_dir / "folds" / f"fold-{i}").predict_proba(texts) for i in (1, 2)], axis=0)
    np.testing.assert_allclose(load_model(run_dir).predict_proba(texts), mean, atol=1e-5)
    if arch == "fasttext":
        pytest.importorskip("onnxruntime")
        from textclass import api

        record = api.export(run_dir)
        assert record["layout"] == "bags" and record["parity"]["fp32_max_abs_diff"] <= 1e-4
        np.testing.assert_allclose(Classifier.load(run_dir, backend="onnx").predict_proba(texts), mean, atol=1e-4)


def test_multi_label_fasttext_ensemble_is_the_mean_of_its_sigmoids(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    base = make_texts(90, seed=7)
    labels = ["|".join(sorted({l, *(["extra"] if rng.random() < 0.4 else [])})) for l in base["label"]]
    df = base.assign(label=labels)
    df.iloc[:70].to_csv(tmp_path / "train.csv", index=False)
    cfg = {
        "data": {"train": str(tmp_path / "train.csv"), "label_delimiter": "|"},  # no test split
        "model": {"family": "small", "arch": "fasttext", "embedding_dim": 8, "buckets": 1000},
        "training": {"output_dir": str(tmp_path / "run"), "epochs": 3, "batch_size": 16, "kfold": 2, "best_metric": "micro_f1"},
        "evaluation": {"tune_threshold": True},
    }
    result = train(cfg)
    run_dir = Path(result.run_dir)
    texts = PROBE + df["text"].iloc[70:].tolist()
    mean = np.mean([load_model(run_dir / "folds" / f"fold-{i}").predict_proba(texts) for i in (1, 2)], axis=0)
    ensemble = load_model(run_dir)
    assert ensemble.multi_label
    np.testing.assert_allclose(ensemble.predict_proba(texts), mean, atol=1e-5)
    oof = pd.read_csv(run_dir / "oof_predictions.csv")
    assert len(oof) == 70 and set(oof["fold"]) == {1, 2} and "extra" in "".join(oof["gold"])
    assert ensemble.threshold == result.metrics["oof"]["threshold"]  # tuned on the out-of-fold predictions
    assert "test" not in result.metrics and not (run_dir / "eval" / "test").exists()


def test_llm_lora_trains_two_folds(tiny_llama: Path, tmp_path: Path) -> None:
    files = _files(tmp_path, {"train": 30, "valid": 9, "test": 9})
    cfg = tiny_llm_config(tiny_llama, files, tmp_path / "run", max_steps=3, kfold=2)
    run_dir = Path(train(cfg).run_dir)
    for i in (1, 2):
        assert (run_dir / "folds" / f"fold-{i}" / "adapter" / "adapter_config.json").is_file()
    texts = PROBE + _texts(files["test"])
    mean = np.mean([load_model(run_dir / "folds" / f"fold-{i}").predict_proba(texts) for i in (1, 2)], axis=0)
    np.testing.assert_allclose(Classifier.load(run_dir).predict_proba(texts), mean, atol=1e-5)
    from textclass import api

    with pytest.raises(UserError, match="training.kfold: zero-shot trains nothing"):
        api.zero_shot(["sport", "tech"], model=str(tiny_llama), overrides=["training.kfold=2"], output=tmp_path / "zs")
    assert not (tmp_path / "zs").exists()
    with pytest.raises(UserError, match="one adapter per fold"):
        api.merge(run_dir)
    pytest.importorskip("onnxruntime")
    record = api.export(run_dir)  # one graph, every fold's adapters merged into it
    assert record["parity"]["fp32_max_abs_diff"] <= 1e-4
    np.testing.assert_allclose(Classifier.load(run_dir, backend="onnx").predict_proba(texts), mean, atol=1e-4)
