"""DeepSpeed ZeRO through `training.deepspeed` (2 processes on CPU: DeepSpeed's CPU accelerator over gloo).

ZeRO changes where the optimizer state, gradients (stage 2) and weights (stage 3) live, not the arithmetic:
in fp32, without dropout, a ZeRO run must train the same model as the DDP run at the same global batch, and
the run directory must hold that model whole (stage 3 gathers the shards) so that it loads in one process.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import make_texts, no_dropout_copy, tiny_config, tiny_llm_config
from ddp_helpers import files, log, metrics, python, torchrun
from textclass.config import Config
from textclass.errors import UserError
from textclass.rundir import load_model
from textclass.training import zero

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="torch.distributed without gloo")
TEXTS = make_texts(12, seed=5)["text"].tolist()


def _data(root: Path) -> dict[str, Path]:
    files = {}
    for split, (n, seed) in {"train": (96, 10), "valid": (30, 11), "test": (30, 12)}.items():
        files[split] = root / f"{split}.csv"
        make_texts(n, seed).to_csv(files[split], index=False)
    return files


def _train(cfg: dict, name: str, root: Path, deepspeed: str | None, nproc: int = 2, **training: object) -> Path:
    """`cfg` trained into root/name with `nproc` processes (DDP, or ZeRO with `deepspeed`)."""
    out = root / name
    cfg = {**cfg, "training": {**cfg["training"], "output_dir": str(out), "deepspeed": deepspeed, **training}}
    (root / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    if nproc == 1:
        python("-m", "textclass", "train", "-c", str(root / f"{name}.yaml"))
    else:
        torchrun("-m", "textclass", "train", "-c", str(root / f"{name}.yaml"))
    return out


def _logits(run_dir: Path) -> torch.Tensor:
    return torch.as_tensor(load_model(run_dir).predict_logits(TEXTS))


@pytest.fixture(scope="module")
def encoder_runs(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny BERT without dropout, 2 processes at batch 8: DDP, ZeRO-2 and ZeRO-3."""
    root = tmp_path_factory.mktemp("zero")
    cfg = tiny_config(no_dropout_copy(tiny_bert, root / "model"), _data(root), root, epochs=2, batch_size=8, precision="fp32")
    cfg["model"]["dropout"] = 0.0
    runs = {stage: _train(cfg, stage, root, None if stage == "ddp" else stage) for stage in ("ddp", "zero2")}
    return runs | {"zero3": _train(cfg, "zero3", root, "zero3", keep_checkpoints=True)}  # for the --resume test


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_zero_trains_the_ddp_model_and_saves_it_whole(encoder_runs: dict[str, Path], stage: str) -> None:
    """Same run directory, same training, and saved weights that load in this (plain, single) process with
    the DDP run's logits. Tolerance: ZeRO reduces gradients in buckets, a different summation order than
    DDP's all-reduce; measured differences are ~1e-6."""
    ddp, run = encoder_runs["ddp"], encoder_runs[stage]
    assert files(run) == files(ddp)
    summary = metrics(run)["train"]
    assert (summary["processes"], summary["zero_stage"]) == (2, int(stage[-1]))
    assert metrics(ddp)["train"]["zero_stage"] is None
    ddp_log = [h["loss"] for h in log(ddp) if "loss" in h]
    run_log = [h["loss"] for h in log(run) if "loss" in h]
    assert run_log == pytest.approx(ddp_log, abs=1e-4)
    saved, want = load_file(str(run / "model.safetensors")), load_file(str(ddp / "model.safetensors"))
    assert saved.keys() == want.keys()
    for k in want:
        assert saved[k].shape == want[k].shape and saved[k].numel() > 0, k
        torch.testing.assert_close(saved[k], want[k], rtol=0, atol=1e-4, msg=k)
    torch.testing.assert_close(_logits(run), _logits(ddp), rtol=0, atol=1e-4)
    assert metrics(run)["test"]["accuracy"] == metrics(ddp)["test"]["accuracy"]


def test_resume_under_zero3_continues_the_run_exactly(encoder_runs: dict[str, Path], tmp_path: Path) -> None:
    """Each rank reloads its own shards of the optimizer state from the checkpoint of epoch 1."""
    run, out = encoder_runs["zero3"], tmp_path / "resumed"
    shutil.copytree(run / "checkpoints", out / "checkpoints")
    last = max((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    shutil.rmtree(last)
    assert len(list((out / "checkpoints").glob("checkpoint-*/global_step*/*optim_states.pt"))) == 2  # one shard per rank
    python("-m", "textclass", "train", "-o", str(out), "--resume", "--nproc", "2")
    evals = [[(h["step"], h["eval_loss"]) for h in log(d) if "eval_loss" in h] for d in (run, out)]
    assert evals[0] == evals[1]
    assert (out / "model.safetensors").read_bytes() == (run / "model.safetensors").read_bytes()


def test_lora_under_zero3_saves_a_whole_adapter_and_head(tiny_llama: Path, tmp_path: Path) -> None:
    """PEFT + ZeRO-3 elsewhere saves an empty adapter (the shards); ours holds the DDP run's adapter and head."""
    cfg = tiny_llm_config(tiny_llama, _data(tmp_path), tmp_path, epochs=2, batch_size=8, precision="fp32")
    ddp, run = _train(cfg, "ddp", tmp_path, None), _train(cfg, "zero3", tmp_path, "zero3")
    assert files(run) == files(ddp)
    for name in ("adapter/adapter_model.safetensors", "head.safetensors"):
        saved, want = load_file(str(run / name)), load_file(str(ddp / name))
        assert saved and saved.keys() == want.keys(), name
        for k in want:
            assert saved[k].numel() > 0 and saved[k].abs().sum() > 0, k
            torch.testing.assert_close(saved[k], want[k], rtol=0, atol=1e-4, msg=k)
    torch.testing.assert_close(_logits(run), _logits(ddp), rtol=0, atol=1e-4)


def test_deepspeed_in_one_process_without_a_launcher(tiny_bert: Path, toy_files: dict, tmp_path: Path) -> None:
    """`textclass train` with training.deepspeed and no torchrun: a one-process group on loopback, not MPI."""
    run = _train(tiny_config(tiny_bert, toy_files, tmp_path, epochs=1, batch_size=16), "one", tmp_path, "zero3", nproc=1)
    assert metrics(run)["train"]["zero_stage"] == 3
    assert _logits(run).shape == (len(TEXTS), 3)


# -- configs ---------------------------------------------------------------------------------------------------------
def test_presets_leave_batch_and_precision_to_the_trainer(tiny_bert: Path) -> None:
    from transformers import AutoModel

    network = AutoModel.from_pretrained(tiny_bert)
    for preset in zero.PRESETS:
        config = zero.deepspeed_config(preset, network)
        assert config["train_micro_batch_size_per_gpu"] == config["gradient_accumulation_steps"] == "auto"
        assert "train_batch_size" not in config
        assert config["bf16"] == config["fp16"] == {"enabled": "auto"}
        hidden = network.config.hidden_size
        assert config["zero_optimization"]["reduce_bucket_size"] == hidden * hidden  # as the Trainer fills it
    z3 = zero.deepspeed_config("zero3", network)["zero_optimization"]
    assert z3["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero.deepspeed_config("zero3_offload", network)["zero_optimization"]["offload_param"]["device"] == "cpu"
    small = zero.deepspeed_config("zero3", torch.nn.Linear(4, 2))["zero_optimization"]  # no transformer: DeepSpeed's defaults
    assert "reduce_bucket_size" not in small and "stage3_param_persistence_threshold" not in small


def test_a_json_config_is_read_and_made_to_save_whole_weights(tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": "auto", "zero_optimization": {"stage": 3, "reduce_bucket_size": 1000}}))
    config = zero.deepspeed_config(str(path), torch.nn.Linear(4, 2))
    assert "train_batch_size" not in config
    assert config["zero_optimization"] == {"stage": 3, "reduce_bucket_size": 1000, "stage3_gather_16bit_weights_on_model_save": True}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "not found"),
        ('{"zero_optimization": {"stage": 3},\n  oops}', "line 2: not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
        ('{"zero_optimization": {"stage": 5}}', "stage must be 0, 1, 2 or 3"),
    ],
)
def test_a_bad_json_config_is_one_line_naming_the_key(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "ds.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=message) as err:
        zero.deepspeed_config(str(path), torch.nn.Linear(4, 2))
    assert str(err.value).startswith("training.deepspeed:") and "\n" not in str(err.value)


def test_config_refuses_what_deepspeed_cannot_run() -> None:
    base = {"data": {"dataset": "bbc-news"}, "model": {"family": "encoder"}}
    with pytest.raises(ValueError, match="zero2, zero3, zero3_offload or the path"):
        Config.model_validate({**base, "training": {"deepspeed": "zero4"}})
    for key, value in (("ema_decay", 0.99), ("adversarial", "fgm"), ("kfold", 3)):
        with pytest.raises(ValueError, match="cannot run under training.deepspeed"):
            Config.model_validate({**base, "training": {"deepspeed": "zero2", key: value}})
    from textclass.training.trainer import check_trackers

    with pytest.raises(UserError, match="training.report_to: unknown tracker 'mlfow'; use some of .*mlflow"):
        check_trackers(Config.model_validate({**base, "training": {"report_to": ["mlfow"]}}).training.report_to)


def test_fasttext_under_deepspeed_is_refused_before_the_run_directory(toy_files: dict, tmp_path: Path) -> None:
    from textclass import train

    cfg = {
        "data": {k: str(v) for k, v in toy_files.items()},
        "model": {"family": "small", "arch": "fasttext", "embedding_dim": 8, "buckets": 500},
        "training": {"output_dir": str(tmp_path / "run"), "deepspeed": "zero2"},
    }
    with pytest.raises(UserError, match="sparse embedding table cannot be partitioned"):
        train(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="bf16 under DeepSpeed is refused only without a GPU")
def test_bf16_under_deepspeed_without_a_gpu_is_refused_before_the_run_directory(tiny_bert: Path, toy_files: dict, tmp_path: Path) -> None:
    from textclass import train

    with pytest.raises(UserError, match="precision=bf16 with training.deepspeed needs a GPU"):
        train(tiny_config(tiny_bert, toy_files, tmp_path / "run", deepspeed="zero2", precision="bf16"))
    assert not (tmp_path / "run").exists()
