"""Training under torchrun (DDP, 2 processes, gloo on CPU): the same run as one process at the same global
batch, ranks that agree on every weight, rank 0 alone writing, --resume, k-fold, distillation, --nproc.

Each multi-process run is a subprocess with a timeout (ddp_helpers), so a hang fails the test instead of
blocking the suite.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_config
from ddp_helpers import assert_trains_like, half_batch, log, python, same_batches, torchrun

from textclass.errors import UserError
from textclass.rundir import WEIGHTS_FILE, load_model
from textclass.training import distributed

pytestmark = pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="torch.distributed without gloo")

# Trains through textclass.train under torchrun; each rank saves its network's final weights (after the
# Trainer's end-of-training loads and weight averaging) as rank<R>.pt in argv[1].
DUMP_WEIGHTS = """
import os, sys
import torch
from textclass.training import trainer

train = trainer.ClassifierTrainer.train

def train_and_dump(self, *args, **kwargs):
    out = train(self, *args, **kwargs)
    net = self.accelerator.unwrap_model(self.model)
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    torch.save(state, os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.pt"))
    return out

trainer.ClassifierTrainer.train = train_and_dump
import textclass
textclass.train(sys.argv[2])
"""


def _ranks_agree(folder: Path) -> dict[str, torch.Tensor]:
    """Both ranks' final weights, which must be equal bit for bit; returns rank 0's."""
    first, second = torch.load(folder / "rank0.pt"), torch.load(folder / "rank1.pt")
    assert first.keys() == second.keys()
    differ = [k for k in first if not torch.equal(first[k], second[k])]
    assert not differ, f"ranks disagree on {differ[:5]}"
    return first


def _saved_equal(run_dir: Path, weights: dict[str, torch.Tensor]) -> None:
    """The run directory holds these weights (rank 0's, as trained)."""
    saved = load_model(run_dir).network.state_dict()
    for k, v in weights.items():
        if k in saved:
            torch.testing.assert_close(saved[k], v, rtol=0, atol=0, msg=k)


# -- one process vs two at the same global batch -------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_and_two(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """The same run with 1 process at batch 16 and with 2 at batch 8 (through `train --nproc 2`); the
    2-process run keeps its checkpoints for the --resume test."""
    root = tmp_path_factory.mktemp("ddp")
    path = same_batches(tiny_bert, root)
    two = root / "two"
    python(
        "-m",
        "textclass",
        "train",
        "-c",
        str(path),
        "--nproc",
        "2",
        *half_batch(two, "training.keep_checkpoints=true", "training.save_total_limit=10"),
    )
    return root / "one", two, yaml.safe_load(path.read_text())


def test_two_processes_train_like_one_at_the_same_global_batch(one_and_two) -> None:
    one, two, _ = one_and_two
    assert_trains_like(one, two)


def test_resume_under_torchrun_reproduces_the_run(one_and_two, tmp_path: Path) -> None:
    """Kill after the checkpoint of step 16 (epoch 2), resume with 2 processes: the rest of the run is the same."""
    _, two, _ = one_and_two
    out = tmp_path / "resumed"
    shutil.copytree(two / "checkpoints", out / "checkpoints")
    for ckpt in (out / "checkpoints").glob("checkpoint-*"):
        if int(ckpt.name.split("-")[1]) > 16:
            shutil.rmtree(ckpt)
    assert (out / "checkpoints" / "checkpoint-16" / "rng_state_1.pth").is_file()  # each rank's RNG state
    python("-m", "textclass", "train", "-o", str(out), "--resume", "--nproc", "2")
    want = {h["step"]: h["eval_loss"] for h in log(two) if "eval_loss" in h}
    got = {h["step"]: h["eval_loss"] for h in log(out) if "eval_loss" in h}
    assert {s: got[s] for s in (24, 32)} == {s: want[s] for s in (24, 32)}  # the same batches, exactly
    assert (out / WEIGHTS_FILE).read_bytes() == (two / WEIGHTS_FILE).read_bytes()


# -- ranks agree ---------------------------------------------------------------------------------------------------
def test_fasttext_sparse_table_is_identical_on_both_ranks(toy_files: dict, tmp_path: Path) -> None:
    """DDP all-reduces the table's sparse gradients (gloo) and every rank's RowWiseAdagrad applies the same rows."""
    cfg = {
        "data": {k: str(v) for k, v in toy_files.items()},
        "model": {"family": "small", "arch": "fasttext", "embedding_dim": 8, "buckets": 5000},
        "training": {"output_dir": str(tmp_path / "run"), "epochs": 2, "batch_size": 8},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "dump.py").write_text(DUMP_WEIGHTS)
    torchrun(str(tmp_path / "dump.py"), str(tmp_path), str(tmp_path / "cfg.yaml"))
    weights = _ranks_agree(tmp_path)
    assert weights["embedding.weight"][5000:].abs().sum() > 0  # hashed rows trained
    _saved_equal(tmp_path / "run", weights)


def test_adversarial_and_ema_ranks_agree_on_the_final_weights(tiny_bert: Path, toy_files: dict, tmp_path: Path) -> None:
    """FGM probes on the unwrapped network; EMA shadows follow identical weights: identical on both ranks,
    and the run directory holds them (the EMA weights)."""
    cfg = tiny_config(tiny_bert, toy_files, tmp_path / "run", epochs=2, batch_size=8, adversarial="fgm", ema_decay=0.99)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "dump.py").write_text(DUMP_WEIGHTS)
    torchrun(str(tmp_path / "dump.py"), str(tmp_path), str(tmp_path / "cfg.yaml"))
    _saved_equal(tmp_path / "run", _ranks_agree(tmp_path))
    assert (tmp_path / "run" / "config.yaml").is_file()


# -- k-fold and distillation -----------------------------------------------------------------------------------------
def test_kfold_and_distillation_under_torchrun(one_and_two, toy_files: dict, tmp_path: Path) -> None:
    """k-fold: every fold and the ensemble written once by rank 0; distillation: the teacher's logits cached once."""
    one, _, cfg = one_and_two
    kfold = {**cfg, "training": {**cfg["training"], "output_dir": str(tmp_path / "kfold"), "kfold": 2, "epochs": 1}}
    (tmp_path / "kfold.yaml").write_text(yaml.safe_dump(kfold))
    torchrun("-m", "textclass", "train", "-c", str(tmp_path / "kfold.yaml"))
    ensemble = load_model(tmp_path / "kfold")
    assert len(ensemble.members) == 2  # type: ignore[attr-defined]
    assert (tmp_path / "kfold" / "oof_predictions.csv").is_file()

    student = {
        "data": {k: str(v) for k, v in toy_files.items()},
        "model": {"family": "small", "arch": "fasttext", "embedding_dim": 8, "buckets": 5000},
        "training": {"epochs": 2, "batch_size": 8},
    }
    (tmp_path / "student.yaml").write_text(yaml.safe_dump(student))
    cache = Path(os.environ["TEXTCLASS_CACHE"]) / "teacher_logits"
    before = set(cache.glob("*.npy")) if cache.is_dir() else set()
    out = tmp_path / "student"
    torchrun("-m", "textclass", "distill", "--teacher", str(one), "-c", str(tmp_path / "student.yaml"), "-o", str(out))
    assert len(set(cache.glob("*.npy")) - before) == 1
    assert not list(cache.glob(".*"))  # no temp file left behind by a second writer
    assert json.loads((out / "metrics.json").read_text())["distill"]["teachers"][0]["run_dir"] == str(one.resolve())


# -- the command line ------------------------------------------------------------------------------------------------
def test_a_user_error_under_nproc_is_one_line_and_exit_2(tiny_bert: Path, toy_files: dict, tmp_path: Path) -> None:
    """Raised by rank 0 (the output is a file), shared with rank 1: one line, exit 2, nothing written."""
    blocker = tmp_path / "taken"
    blocker.write_text("not a folder")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tiny_bert, toy_files, blocker)))
    done = python("-m", "textclass", "train", "-c", str(cfg), "--nproc", "2", expect=2)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {blocker}: is a file, not a folder; choose another --output for the run directory"]
    assert blocker.read_text() == "not a folder"


def test_nproc_is_refused_below_one_and_insidetorchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match="--nproc 0: .*at least 1"):
        distributed.refuse_nproc(0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="--nproc: this process is already one of 2 started by torchrun"):
        distributed.refuse_nproc(2)


def test_sparse_tables_are_refused_over_nccl() -> None:
    from textclass.models.small.fasttext import FastText

    table = FastText(vocab_size=10, num_labels=2, dim=4, buckets=10, sparse=True)
    distributed.check_sparse_gradients(table, "gloo")
    distributed.check_sparse_gradients(table, None)
    with pytest.raises(UserError, match="sparse embedding table .* over nccl"):
        distributed.check_sparse_gradients(table, "nccl")
    distributed.check_sparse_gradients(torch.nn.Linear(2, 2), "nccl")
