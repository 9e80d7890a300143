"""The small family through `textclass.train`: sparse fastText (row-wise AdaGrad + AdamW in one optimizer),
sparse gradient clipping, checkpoint resume, per-family learning rates, and every arch on Chinese reviews."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from textclass import Classifier, train
from textclass.config import SMALL_ARCHS, EncoderModelConfig, SmallModelConfig, build_config
from textclass.models.registry import get_family
from textclass.models.small.fasttext import FastText
from textclass.training.optim import RowWiseAdagrad, clip_grad_norm_, coalesced

ARCHS = ["fasttext", "textcnn", "textrnn", "textrcnn", "transformer"]


def fasttext_config(files: dict[str, Path], out: Path, **training: Any) -> dict:
    """fastText with the default 2M buckets (a small dimension keeps the table at 64 MB) and the family's lr."""
    return {
        "data": {k: str(v) for k, v in files.items()},
        "model": {"family": "small", "arch": "fasttext", "embedding_dim": 8},
        "training": {"output_dir": str(out), "epochs": 2, "batch_size": 16, "logging_steps": 5, **training},
    }


@pytest.mark.parametrize("max_norm", [0.05, float("inf")])
def test_sparse_clipping_equals_torch_on_dense_gradients(max_norm: float) -> None:
    """Same global norm and same clipped gradients as torch's clip_grad_norm_ on the dense twin."""
    # Rows repeated inside a text and across texts, and an empty text (offsets 6, 6).
    ids, offsets = torch.tensor([1, 2, 2, 3, 50, 50, 7, 1]), torch.tensor([0, 3, 6, 6])
    grads, norms = [], []
    for sparse in (True, False):
        torch.manual_seed(0)
        model = FastText(10, 3, 4, 100, sparse=sparse)
        torch.nn.init.normal_(model.fc.weight)
        model(ids, offsets).pow(2).sum().backward()
        clip = clip_grad_norm_ if sparse else torch.nn.utils.clip_grad_norm_
        norms.append(float(clip(model.parameters(), max_norm)))
        grads.append([p.grad.to_dense() for p in model.parameters()])
    assert norms[0] == pytest.approx(norms[1], rel=1e-5) and norms[0] > 0.05
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_fasttext_gradient_is_coalesced_and_accumulates() -> None:
    """Our backward's sorted unique rows skip coalescing; two accumulated batches are summed correctly."""
    torch.manual_seed(0)
    model = FastText(10, 3, 4, 100, sparse=True)
    torch.nn.init.normal_(model.fc.weight)
    batches = [(torch.tensor([5, 1, 5, 60]), torch.tensor([0, 2])), (torch.tensor([60, 3]), torch.tensor([0, 1]))]
    model(*batches[0]).sum().backward()
    once = coalesced(model.embedding.weight.grad)
    assert once.is_coalesced() and once._indices()[0].tolist() == [1, 5, 60]
    assert once._values().data_ptr() == model.embedding.weight.grad._values().data_ptr()  # no copy made
    model(*batches[1]).sum().backward()  # accumulation concatenates: 60 twice, unsorted
    both = coalesced(model.embedding.weight.grad)
    dense = torch.nn.EmbeddingBag(110, 4, mode="mean")
    dense.weight.data.copy_(model.embedding.weight.detach())
    for ids, offsets in batches:
        model.fc(dense(ids, offsets)).sum().backward()
    assert both._indices()[0].tolist() == [1, 3, 5, 60]
    torch.testing.assert_close(both.to_dense(), dense.weight.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_gather_and_scatter_match_torch(dtype: torch.dtype) -> None:
    """float32 goes through numpy views, bfloat16 (no numpy dtype) through torch: the same rows either way."""
    from textclass.table_rows import gather_rows, scatter_rows

    table = torch.randn(100, 7).to(dtype)
    expected = table.clone()
    rows = torch.tensor([3, 97, 0, 41])
    torch.testing.assert_close(gather_rows(table, rows), table.index_select(0, rows), rtol=0, atol=0)
    values = torch.randn(4, 7).to(dtype)
    scatter_rows(table, rows, values)
    expected.index_copy_(0, rows, values)
    assert torch.equal(table, expected)


def test_row_wise_adagrad_updates_used_rows_by_formula_and_resumes_exactly() -> None:
    """G[r] += mean(g[r]^2); w[r] -= lr g[r] / (sqrt(G[r]) + eps), only for rows in the batch; a state_dict
    round trip in the middle (what --resume does) changes nothing."""
    torch.manual_seed(0)
    lr, eps = 0.1, 1e-8
    table = torch.nn.EmbeddingBag(1000, 4, mode="mean", sparse=True)
    reference = table.weight.detach().clone()
    initial = reference.clone()
    acc = torch.zeros(1000)
    opt = RowWiseAdagrad(table.parameters(), lr=lr, eps=eps)
    for step in range(6):
        ids, offsets = torch.randint(0, 50, (12,)), torch.tensor([0, 5, 9])
        if step == 3:
            twin = torch.nn.EmbeddingBag(1000, 4, mode="mean", sparse=True)
            twin.load_state_dict(table.state_dict())
            state = opt.state_dict()
            table, opt = twin, RowWiseAdagrad(twin.parameters(), lr=lr, eps=eps)
            opt.load_state_dict(state)
        dense_twin = torch.nn.EmbeddingBag(1000, 4, mode="mean", _weight=reference.clone().requires_grad_())
        dense_twin(ids, offsets).pow(2).sum().backward()
        g = dense_twin.weight.grad
        used = torch.unique(ids)
        acc[used] += g[used].pow(2).mean(dim=1)
        reference[used] -= lr * g[used] / (acc[used].sqrt() + eps).unsqueeze(1)
        opt.zero_grad()
        table(ids, offsets).pow(2).sum().backward()
        opt.step()
    torch.testing.assert_close(table.weight.detach(), reference, rtol=1e-5, atol=1e-7)
    assert torch.equal(table.weight.detach()[50:], reference[50:])  # rows never used: untouched
    assert not torch.equal(table.weight.detach()[:50], initial[:50])  # the used rows did move


def test_default_learning_rate_is_the_familys() -> None:
    assert build_config({"data": {"dataset": "bbc-news"}}).training.learning_rate is None  # unset until a run
    assert get_family("encoder").default_learning_rate(EncoderModelConfig()) == 5e-5
    small = get_family("small")
    assert all(small.default_learning_rate(SmallModelConfig(arch=a)) >= 1e-4 for a in ARCHS)  # from scratch
    assert get_family("encoder").default_final_model(EncoderModelConfig()) == "last"
    assert small.default_final_model(SmallModelConfig()) == "best"


def test_fasttext_default_buckets_learns_with_row_wise_adagrad(toy_files: dict[str, Path], tmp_path: Path) -> None:
    result = train(fasttext_config(toy_files, tmp_path / "run", epochs=3))
    assert result.metrics["test"]["accuracy"] >= 0.9
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert saved["training"]["learning_rate"] == get_family("small").default_learning_rate(SmallModelConfig())
    assert saved["training"]["final_model"] == result.metrics["train"]["final_model"] == "best"
    clf = Classifier.load(result.run_dir)
    assert clf.predictor.model.network.embedding.weight.shape[0] > 2_000_000
    assert clf.predict(["match goal team referee"])[0]["label"] == "sport"


@pytest.mark.parametrize("final_model", ["best", "last"])
def test_resume_with_combined_optimizer_matches_uninterrupted(
    toy_files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, final_model: str
) -> None:
    """Crash after the first epoch's checkpoint, resume: same metrics and scores as one uninterrupted run.

    Equality needs the row-wise AdaGrad accumulators and the AdamW moments and step counts back from the
    checkpoint; a fresh optimizer state after the resume would change the second epoch.
    """
    from transformers import TrainerCallback

    import textclass.training.run as run_mod

    full = train(fasttext_config(toy_files, tmp_path / "full", final_model=final_model))

    class CrashOnSave(TrainerCallback):
        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            from safetensors import safe_open

            (weights,) = Path(args.output_dir).glob("checkpoint-*/model.safetensors")
            with safe_open(str(weights), "pt") as f:  # the table's sparse form, read back by the resume
                assert {"embedding.row_ids", "embedding.row_values"} <= set(f.keys())
                assert "embedding.weight" not in f.keys()
            raise KeyboardInterrupt("simulated crash")

    original = run_mod.build_trainer

    def crashing(*args: Any, **kwargs: Any) -> Any:
        trainer = original(*args, **kwargs)
        trainer.add_callback(CrashOnSave())
        return trainer

    cfg = fasttext_config(toy_files, tmp_path / "resumed", final_model=final_model)
    with monkeypatch.context() as patch:
        patch.setattr(run_mod, "build_trainer", crashing)
        with pytest.raises(KeyboardInterrupt):
            train(cfg)
    assert not (tmp_path / "resumed" / "config.yaml").exists()
    resumed = train(cfg, resume=True)
    assert resumed.metrics["train"]["global_step"] == full.metrics["train"]["global_step"]
    assert resumed.metrics["train"]["final_model"] == final_model
    assert resumed.metrics["valid"] == full.metrics["valid"] and resumed.metrics["test"] == full.metrics["test"]
    texts = ["goal team chip", "recipe bread", ""]
    a = Classifier.load(full.run_dir).predict_proba(texts)
    b = Classifier.load(resumed.run_dir).predict_proba(texts)
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.fixture(scope="module")
def chinese_slice(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A stratified-by-shuffle slice of the built-in chinese-reviews splits, as CSV files."""
    from textclass.data.builtin import load_builtin

    folder = tmp_path_factory.mktemp("zh")
    files = {}
    for split, n in {"train": 3000, "valid": 300, "test": 600}.items():
        df = load_builtin("chinese-reviews")[split].sample(frac=1.0, random_state=0).head(n)
        files[split] = folder / f"{split}.csv"
        df.to_csv(files[split], index=False)
    return files


@pytest.mark.integration
@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_learns_chinese_reviews(arch: str, chinese_slice: dict[str, Path], tmp_path: Path) -> None:
    """Each arch through `textclass.train` with the family's defaults (char tokens, per-arch lr), sized down."""
    cfg = {
        "data": {k: str(v) for k, v in chinese_slice.items()},
        "model": {k: v for k, v in {"family": "small", "arch": arch, "embedding_dim": 64, "hidden_size": 64,
                                    "num_filters": 64, "max_length": 64, "buckets": 100_000}.items()
                  if k in SMALL_ARCHS[arch].model_fields},  # each arch takes only its own keys
        "training": {"output_dir": str(tmp_path / arch), "epochs": 5, "batch_size": 32, "num_threads": 2},
    }
    result = train(cfg)
    # Chance is 0.5 (balanced pos/neg); on 600 test texts 0.65 is far above it (z > 7). Full-data accuracy
    # is what benchmarks/small_vs_fasttext.py measures.
    assert result.metrics["test"]["accuracy"] >= 0.65, result.metrics["test"]


def test_chinese_small_config_builds_the_documented_model() -> None:
    """configs/chinese_small.yaml validates and builds the small-family setup the README reports."""
    from textclass.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "chinese_small.yaml")
    assert isinstance(cfg.model, SmallModelConfig) and cfg.data.dataset == "chinese-reviews"
    assert cfg.model.tokenizer == "char" and cfg.model.arch == "fasttext"


def test_unset_batch_size_and_rate_are_the_archs_and_saved(toy_files: dict, tmp_path: Path) -> None:
    import pandas as pd

    from textclass.models.small.family import DEFAULT_BATCH_SIZES, DEFAULT_LEARNING_RATES

    from conftest import make_texts

    files = {**toy_files, "train": tmp_path / "train600.csv"}
    make_texts(600, 10).to_csv(files["train"], index=False)  # more than one default batch
    cfg = fasttext_config(files, tmp_path / "run", epochs=1)
    del cfg["training"]["batch_size"]
    result = train(cfg)
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())["training"]
    assert saved["batch_size"] == DEFAULT_BATCH_SIZES["fasttext"] == 256
    assert saved["learning_rate"] == DEFAULT_LEARNING_RATES["fasttext"]
    n_train = len(pd.read_csv(files["train"]))
    assert result.metrics["train"]["global_step"] == -(-n_train // 256) == 3  # one epoch of batches of 256


@pytest.mark.parametrize("labels", [[0, 2, 1], [[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]]])
def test_packed_rows_equal_the_datasets_rows(labels: list) -> None:
    """The training DataLoader's numpy view gives the same rows as `datasets`, also after a select()."""
    import datasets

    from textclass.training.trainer import PackedRows

    ds = datasets.Dataset.from_dict(
        {"input_ids": [[5, 6, 7], [], [9]], "attention_mask": [[1, 1, 1], [], [1]], "length": [3, 0, 1], "labels": labels}
    )
    for view in (ds, ds.select([2, 0, 1])):
        packed = PackedRows(view)
        assert len(packed) == len(view) and packed.lengths == list(view["length"])
        got = packed.__getitems__(list(range(len(view))))
        for row, want in zip(got, view):
            assert {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in row.items()} == want
            assert isinstance(row["input_ids"], np.ndarray)


def test_pair_task_learns_from_the_second_texts(tmp_path: Path) -> None:
    """The label depends on the second text only: with a vocabulary fitted on the first texts alone every
    second-text word was <unk> and accuracy stayed at chance (0.5); both columns fit it now."""
    import random

    rng = random.Random(0)
    words = {"yes": "agree right true correct indeed".split(), "no": "wrong false never refuse deny".split()}
    filler = "the a of it this that".split()

    def rows(n: int) -> pd.DataFrame:
        out = []
        for i in range(n):
            label = "yes" if i % 2 else "no"
            first = " ".join(rng.choice(filler) for _ in range(4))  # carries no signal
            second = " ".join(rng.choice(words[label] + filler) for _ in range(5))
            out.append({"question": first, "answer": second, "label": label})
        return pd.DataFrame(out)

    files = {}
    for split, n in {"train": 200, "valid": 40, "test": 60}.items():
        files[split] = tmp_path / f"{split}.csv"
        rows(n).to_csv(files[split], index=False)
    cfg = {
        "data": {**{k: str(v) for k, v in files.items()}, "text_column": "question", "text_pair_column": "answer"},
        "model": {"family": "small", "arch": "textcnn", "embedding_dim": 16, "num_filters": 8, "max_length": 32},
        "training": {"output_dir": str(tmp_path / "run"), "epochs": 8, "batch_size": 16, "learning_rate": 1e-2},
    }
    result = train(cfg)
    vocab = set(Classifier.load(result.run_dir).predictor.model.tokenizer.vocab.tokens)
    assert {"agree", "deny"} <= vocab
    assert result.metrics["test"]["accuracy"] >= 0.9
