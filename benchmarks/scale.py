"""One config, five ways to spend 2 CPU cores: 1 process x 2 threads, 2 processes x 1 thread (DDP over gloo),
2 processes with DeepSpeed ZeRO-2 and ZeRO-3 (`training.deepspeed`), and a plain Hugging Face Trainer +
DeepSpeed ZeRO-2 script (the docs' config with `auto` values) for comparison.

Every run trains MiniLM-L6 on the same texts at the same global batch (2 processes: half the batch each) and
reports training samples/s, peak memory per process (max RSS), the memory each process holds for the
weights and for the optimizer state after the first step, and test accuracy. Runs are sequential, each in
fresh processes; nothing else should run on the machine meanwhile.

    python benchmarks/scale.py --dataset bbc-news --train-limit 480 --seeds 42,1,2
    python benchmarks/scale.py --variants ddp,zero3 --seeds 42

Writes benchmarks/results/scale-<dataset>-s<seeds>.json and prints the table, each variant's mean with its
95% interval (t distribution over seeds), and throughput as a ratio to the 1-process run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).parent
RESULTS = HERE / "results"
MODEL = "sentence-transformers/all-MiniLM-L6-v2"
VARIANTS = ("one", "ddp", "zero2", "zero3", "plain_zero2")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--local-addr", "127.0.0.1", "--nproc-per-node", "2"]

# Run by every process: records, on each rank, the bytes of weights and optimizer state it holds after the
# first optimizer step (ZeRO-3: its shard of each weight; ZeRO-1/2: its shard of the optimizer state) and its
# peak RSS at the end of training, into <probe dir>/rank<R>.json; then runs the given script or textclass.
PROBE = '''
import json, os, resource, runpy, sys
import torch
from transformers import TrainerCallback, Trainer

def _bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))

def _innermost(opt):
    while hasattr(opt, "optimizer") and not isinstance(opt, torch.optim.Optimizer) or type(opt).__module__.startswith(("deepspeed", "accelerate")):
        if not hasattr(opt, "optimizer"):
            break
        opt = opt.optimizer
    return opt

class Probe(TrainerCallback):
    def __init__(self, trainer):
        self.trainer, self.out = trainer, {}
    def on_step_end(self, args, state, control, **kw):
        if state.global_step != 1:
            return
        model = self.trainer.model
        self.out["param_mb"] = _bytes([getattr(p, "ds_tensor", p) for p in model.parameters()]) / 2**20
        opt = _innermost(self.trainer.optimizer)
        self.out["optim_state_mb"] = _bytes([t for s in opt.state.values() for t in s.values()]) / 2**20
    def on_train_end(self, args, state, control, **kw):
        self.out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        with open(os.path.join(os.environ["SCALE_PROBE_DIR"], f"rank{os.environ.get('RANK', '0')}.json"), "w") as f:
            json.dump(self.out, f)

_init = Trainer.__init__
def _init_with_probe(self, *a, **kw):
    _init(self, *a, **kw)
    self.add_callback(Probe(self))
Trainer.__init__ = _init_with_probe
sys.argv = sys.argv[1:]
if sys.argv[0] == "-m":
    sys.argv = sys.argv[1:]
    runpy.run_module(sys.argv[0], run_name="__main__")
else:
    runpy.run_path(sys.argv[0], run_name="__main__")
'''


def plain_worker(cfg_path: str) -> None:
    """The plain script: what the transformers docs show for Trainer + DeepSpeed ZeRO-2, with dynamic padding.

    On a machine without a GPU two things must be added for it to run at all (marked below); textclass does
    both itself (`training/zero.py`).
    """
    import numpy as np
    from datasets import load_dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer, TrainingArguments

    from textclass.models.encoder import resolve_model_path

    c = json.loads(Path(cfg_path).read_text())
    raw = load_dataset("csv", data_files=c["files"])
    labels = sorted(set(raw["train"]["label"]))
    path = resolve_model_path(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(labels))

    def preprocess(batch: dict) -> dict:
        out = tokenizer(batch["text"], truncation=True, max_length=c["max_length"])
        out["labels"] = [labels.index(x) for x in batch["label"]]
        return out

    data = raw.map(preprocess, batched=True, remove_columns=["text", "label"])
    ds_config = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": "auto"},
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        # CPU fix 1 of 2: no "train_batch_size": "auto" -- the Trainer fills it before it knows the world size (as 1
        # process) and DeepSpeed then stops: "train_batch_size is not equal to micro_batch_per_gpu * ... * world_size"
    }
    extra: dict[str, Any] = {}
    import torch

    if torch.accelerator.current_accelerator() is None:
        # CPU fix 2 of 2: accelerate starts a DeepSpeed state without a backend on CPU and counts one process, so the
        # first evaluation's gather fails; configure the state with gloo and tell the Trainer to use it
        from accelerate.state import PartialState

        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(backend="gloo")
        del os.environ["ACCELERATE_USE_DEEPSPEED"]
        extra["accelerator_config"] = {"use_configured_state": True}
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        num_train_epochs=c["epochs"],
        per_device_train_batch_size=c["batch_size"],
        per_device_eval_batch_size=64,
        learning_rate=c["lr"],
        warmup_steps=0.1,
        weight_decay=0.01,
        eval_strategy="epoch",
        save_strategy="no",
        report_to="none",
        seed=c["seed"],
        logging_steps=50,
        deepspeed=ds_config,
        **extra,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data["train"], eval_dataset=data["valid"],
                      data_collator=DataCollatorWithPadding(tokenizer))
    out = trainer.train()
    pred = trainer.predict(data["test"])
    if args.process_index == 0:
        acc = float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())
        Path(c["result"]).write_text(json.dumps({"samples_per_s": out.metrics["train_samples_per_second"],
                                                 "train_s": out.metrics["train_runtime"], "test_accuracy": acc}))


def export_data(dataset: str, folder: Path, train_limit: int, eval_limit: int) -> dict[str, str]:
    from textclass.data.builtin import load_builtin

    paths = {}
    for split, df in load_builtin(dataset).items():
        limit = train_limit if split == "train" else eval_limit
        df = df.sample(frac=1.0, random_state=0).head(limit)
        paths[split] = str(folder / f"{split}.csv")
        df.to_csv(paths[split], index=False)
    return paths


def run_variant(variant: str, seed: int, files: dict[str, str], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One run in fresh processes; its throughput, accuracy and per-process memory."""
    folder = work / f"{variant}-{seed}"
    probe_dir = folder / "probe"
    probe_dir.mkdir(parents=True)
    (work / "probe.py").write_text(PROBE)
    two = variant != "one"
    batch = args.batch_size // 2 if two else args.batch_size
    env = {**os.environ, "SCALE_PROBE_DIR": str(probe_dir), "HF_HUB_OFFLINE": "1", "GLOO_SOCKET_IFNAME": "lo",
           "OMP_NUM_THREADS": "1" if two else "2", "DS_ACCELERATOR": "cpu"}
    launcher = TORCHRUN if two else [sys.executable]
    if variant == "plain_zero2":
        cfg = {"files": files, "max_length": args.max_length, "epochs": args.epochs, "batch_size": batch, "lr": args.lr,
               "seed": seed, "result": str(folder / "result.json")}
        (folder / "plain.json").write_text(json.dumps(cfg))
        cmd = [*launcher, str(work / "probe.py"), str(Path(__file__).resolve()), "--plain-worker", str(folder / "plain.json")]
    else:
        training = {"output_dir": str(folder / "run"), "epochs": args.epochs, "batch_size": batch, "learning_rate": args.lr,
                    "precision": "fp32", "seed": seed, "logging_steps": 50, "num_threads": 1 if two else 2}
        if variant.startswith("zero"):
            training["deepspeed"] = variant
        cfg = {"data": files, "model": {"name": MODEL, "max_length": args.max_length}, "training": training}
        (folder / "cfg.yaml").write_text(yaml.safe_dump(cfg))
        cmd = [*launcher, str(work / "probe.py"), "-m", "textclass", "train", "-c", str(folder / "cfg.yaml")]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(f"{variant} seed {seed} failed:\n{done.stderr[-3000:]}")
    if variant == "plain_zero2":
        result = json.loads((folder / "result.json").read_text())
    else:
        m = json.loads((folder / "run" / "metrics.json").read_text())
        result = {"samples_per_s": m["train"]["train_samples_per_second"], "train_s": m["train"]["train_runtime_s"],
                  "test_accuracy": m["test"]["accuracy"]}
    ranks = [json.loads(p.read_text()) for p in sorted(probe_dir.glob("rank*.json"))]
    return result | {
        "seed": seed,
        "wall_s": wall,
        "processes": len(ranks),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks),
        "param_mb": max(r["param_mb"] for r in ranks),
        "optim_state_mb": max(r["optim_state_mb"] for r in ranks),
    }


def print_table(rows: dict[str, list[dict[str, Any]]]) -> None:
    from compress import interval  # the benchmarks' mean and 95% half-width

    base = rows.get("one")
    base_speed = sum(r["samples_per_s"] for r in base) / len(base) if base else None
    head = (f"{'variant':<12} {'procs':>5} {'samples/s':>10} {'x one':>6} {'peak RSS/proc MB':>16} {'weights/proc MB':>15} "
            f"{'optim/proc MB':>13} {'test acc':>8} {'±95%':>6}")
    print(head)
    print("-" * len(head))
    for name, runs in rows.items():
        speed, _ = interval([r["samples_per_s"] for r in runs])
        acc, half = interval([r["test_accuracy"] for r in runs])
        mean = {k: sum(r[k] for r in runs) / len(runs) for k in ("peak_rss_mb", "param_mb", "optim_state_mb")}
        ratio = f"{speed / base_speed:.2f}" if base_speed else "-"
        print(f"{name:<12} {runs[0]['processes']:>5} {speed:>10.1f} {ratio:>6} {mean['peak_rss_mb']:>16.0f} "
              f"{mean['param_mb']:>15.1f} {mean['optim_state_mb']:>13.1f} {acc:>8.4f} {half:>6.4f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="bbc-news")
    p.add_argument("--train-limit", type=int, default=480)
    p.add_argument("--eval-limit", type=int, default=300, help="rows of valid and of test")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=16, help="global batch (2 processes: half each)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seeds", default="42,1,2")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--plain-worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.plain_worker:
        return plain_worker(args.plain_worker)
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"--variants: unknown {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    rows: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = export_data(args.dataset, work, args.train_limit, args.eval_limit)
        for seed in seeds:  # seeds outermost: a slow drift of the machine spreads over every variant
            for v in variants:
                rows[v].append(run_variant(v, seed, files, args, work))
                r = rows[v][-1]
                print(f"{v} seed {seed}: {r['samples_per_s']:.1f} samples/s, acc {r['test_accuracy']:.4f}, "
                      f"peak {r['peak_rss_mb']:.0f} MB, wall {r['wall_s']:.0f} s", flush=True)
    import platform

    print(f"\n{args.dataset}: {args.train_limit} training texts, max_length {args.max_length}, {args.epochs:g} epoch(s), "
          f"global batch {args.batch_size}, fp32, {platform.processor() or platform.machine()}, {os.cpu_count()} cores\n")
    print_table(rows)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"scale-{args.dataset}-s{'_'.join(map(str, seeds))}.json"
    out.write_text(json.dumps({"settings": vars(args), "results": rows}, indent=1))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
