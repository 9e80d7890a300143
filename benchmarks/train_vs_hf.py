"""textclass vs a plain Hugging Face Trainer script, same model, data and settings.

The plain script is written the way transformers' `examples/pytorch/text-classification/
run_classification.py` does it: `load_dataset("csv")`, a label->id map, tokenisation with
`padding="max_length"` (that example's default, `pad_to_max_length=True`), `AutoModelForSequenceClassification`,
the default collator, `Trainer.train()`, then `Trainer.predict()` on the test split.

Each variant runs in a fresh subprocess (same threads, no shared caches) and reports wall time, training
samples/s and test accuracy; the parent prints them side by side and writes JSON to benchmarks/results/.

    python benchmarks/train_vs_hf.py --dataset bbc-news --epochs 3 --max-length 256 --batch-size 16
    python benchmarks/train_vs_hf.py --dataset chinese-reviews --train-limit 2000 --seeds 42,1,2

With several `--seeds` every variant runs once per seed (the seed of the model head's initialisation, of
dropout and of the data order) and the table adds each variant's mean: on a few thousand texts one seed's
test accuracy moves by a point or more, more than the variants differ.

`--combine` reads result files written by earlier runs (other seeds, other variants), pools the runs of
each variant by data set, and prints every run, every variant's mean and its accuracy difference from
the plain script with a Welch 95% confidence interval:

    python benchmarks/train_vs_hf.py --combine benchmarks/results/train_vs_hf-chinese-reviews-*.json
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

RESULTS = Path(__file__).parent / "results"
MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def export_data(dataset: str, folder: Path, train_limit: int | None) -> dict[str, Path]:
    """The built-in splits as CSV files (train optionally cut to a stratified-by-shuffle prefix)."""
    from textclass.data.builtin import load_builtin

    paths = {}
    for split, df in load_builtin(dataset).items():
        if split == "train" and train_limit:
            df = df.sample(frac=1.0, random_state=0).head(train_limit)
        paths[split] = folder / f"{split}.csv"
        df.to_csv(paths[split], index=False)
    return paths


def run_plain(args: argparse.Namespace, files: dict[str, str]) -> dict:
    """The run_classification.py way."""
    import numpy as np
    from datasets import load_dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments, default_data_collator

    from textclass.models.encoder import resolve_model_path

    raw = load_dataset("csv", data_files={"train": files["train"], "validation": files["valid"], "test": files["test"]})
    label_list = sorted(set(raw["train"]["label"]))
    label_to_id = {l: i for i, l in enumerate(label_list)}
    path = resolve_model_path(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(label_list), id2label=dict(enumerate(label_list)), label2id=label_to_id
    )

    def preprocess(examples: dict) -> dict:
        result = tokenizer(examples["text"], padding="max_length", max_length=args.max_length, truncation=True)
        result["labels"] = [label_to_id[l] for l in examples["label"]]  # a new name: datasets 5 keeps "label" a string
        return result

    raw = raw.map(preprocess, batched=True, remove_columns=["text", "label"])
    targs = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64,
        learning_rate=args.lr,
        warmup_steps=0.1,
        weight_decay=0.01,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        logging_steps=50,
    )
    trainer = Trainer(
        model=model, args=targs, train_dataset=raw["train"], eval_dataset=raw["validation"],
        processing_class=tokenizer, data_collator=default_data_collator,
    )
    t0 = time.perf_counter()
    train_out = trainer.train()
    train_s = time.perf_counter() - t0
    pred = trainer.predict(raw["test"])
    total_s = time.perf_counter() - t0
    acc = float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())
    return {"train_s": train_s, "total_s": total_s, "samples_per_s": train_out.metrics["train_samples_per_second"], "test_accuracy": acc}


def run_textclass(args: argparse.Namespace, files: dict[str, str]) -> dict:
    """The same job through textclass's API (dynamic padding, length grouping, per-epoch validation)."""
    from textclass import train

    cfg = {
        "data": files,
        "model": {"name": MODEL, "max_length": args.max_length, "pooling": args.pooling, "head": args.head},
        "training": {
            "output_dir": tempfile.mkdtemp() + "/run",
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "learning_rate": args.lr,
            "head_lr_scale": args.head_lr_scale,
            "precision": args.precision,
            "warmup_ratio": 0.1,
            "logging_steps": 50,
            "seed": args.seed,
        },
    }
    t0 = time.perf_counter()
    result = train(cfg, args.set or None)
    total_s = time.perf_counter() - t0
    t = result.metrics["train"]
    return {
        "train_s": t["train_runtime_s"],
        "total_s": total_s,
        "samples_per_s": t["train_samples_per_second"],
        "test_accuracy": result.metrics["test"]["accuracy"],
        "final_model": t["final_model"],  # which weights the run kept (best validation step or last)
        "kept_step": t["kept_step"],
    }


KEYS = ["train_s", "total_s", "process_wall_s", "samples_per_s", "test_accuracy"]


def print_table(rows: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    """Print each run, each variant's mean and (two seeds or more) its accuracy difference from plain; return the means."""
    from scipy.stats import ttest_ind

    means = {name: {k: sum(r[k] for r in runs) / len(runs) for k in KEYS} for name, runs in rows.items()}
    base = means.get("plain", {}).get("total_s")
    width = max(10, *(len(n) for n in rows))
    header = (f"{'variant':<{width}} {'seed':>6} {'train s':>9} {'total s':>9} {'process s':>10} {'samples/s':>10} "
              f"{'test acc':>9} {'x plain':>8}")
    print(header)
    print("-" * len(header))
    for name, runs in rows.items():
        for r in runs + ([{**means[name], "seed": "mean"}] if len(runs) > 1 else []):
            ratio = f"{r['total_s'] / base:.2f}" if base else "-"
            print(f"{name:<{width}} {r['seed']:>6} {r['train_s']:>9.1f} {r['total_s']:>9.1f} {r['process_wall_s']:>10.1f} "
                  f"{r['samples_per_s']:>10.1f} {r['test_accuracy']:>9.4f} {ratio:>8}")
    plain = [r["test_accuracy"] for r in rows.get("plain", [])]
    if len(plain) < 2:
        return means
    print(f"\ntest accuracy against plain ({len(plain)} seeds, mean {means['plain']['test_accuracy']:.4f}); "
          "difference of means, Welch 95% interval:")
    for name, runs in rows.items():
        acc = [r["test_accuracy"] for r in runs]
        if name == "plain" or len(acc) < 2:
            continue
        low, high = ttest_ind(acc, plain, equal_var=False).confidence_interval(0.95)
        diff = means[name]["test_accuracy"] - means["plain"]["test_accuracy"]
        print(f"  {name:<{width}} n={len(acc)}  {diff * 100:+.2f} points  [{low * 100:+.2f}, {high * 100:+.2f}]")
    return means


def variant_label(variant: str, settings: dict, run: dict) -> str:
    """`plain`, or `textclass` plus whatever its settings (and the weights it kept) change from its defaults."""
    if variant == "plain":
        return "plain"
    extra = [f"{k}={settings[k]}" for k, default in (("head", "linear"), ("pooling", "mean"), ("precision", "auto"),
                                                     ("head_lr_scale", 1.0)) if settings.get(k) not in (None, default)]
    extra += [o.split(".")[-1] for o in settings.get("set") or [] if not o.startswith("training.final_model")]
    if run.get("final_model", "last") != "last":  # encoders keep the last epoch by default
        extra.append(f"final_model={run['final_model']}")
    return " ".join([variant, *extra])


def combine(files: list[str]) -> None:
    """Pool the runs of earlier result files by data set and variant (a seed counts once per variant)."""
    by_data: dict[tuple, dict[str, dict[int, dict]]] = {}
    for f in files:
        data = json.loads(Path(f).read_text())
        s = data["settings"]
        setting = (s["dataset"], s.get("train_limit"), s["epochs"], s["max_length"], s["batch_size"], s["lr"])
        for variant, runs in data["results"].items():
            for r in runs:
                by_data.setdefault(setting, {}).setdefault(variant_label(variant, s, r), {}).setdefault(r["seed"], r)
    for (dataset, limit, epochs, max_length, batch, lr), variants in by_data.items():
        rows = {name: [runs[seed] for seed in sorted(runs)]
                for name, runs in sorted(variants.items(), key=lambda kv: (kv[0] != "plain", kv[0]))}
        limit_s = f", train limited to {limit} rows" if limit else ""
        print(f"\n{dataset}, max_length {max_length}, {epochs:g} epochs, batch {batch}, lr {lr:g}{limit_s}")
        print_table(rows)


def child(args: argparse.Namespace) -> None:
    import torch

    torch.manual_seed(0)
    files = json.loads(args.files)
    out = (run_plain if args.variant == "plain" else run_textclass)(args, files)
    print("RESULT " + json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="bbc-news", choices=["bbc-news", "chinese-reviews"])
    p.add_argument("--epochs", type=float, default=3)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--pooling", default="mean", choices=["cls", "mean"], help="textclass pooling (MiniLM was trained with mean).")
    p.add_argument("--head", default="linear", choices=["linear", "hf"], help="textclass head (hf: the plain script's).")
    p.add_argument("--head-lr-scale", type=float, default=1.0, help="textclass: the new head's lr multiple.")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="textclass precision.")
    p.add_argument("--set", action="append", help="Extra textclass overrides, e.g. --set training.group_by_length=false.")
    p.add_argument("--train-limit", type=int, default=None, help="Use only N training rows (for quick runs).")
    p.add_argument("--variants", default="plain,textclass")
    p.add_argument("--out", default=None, help="JSON to write (default: results/train_vs_hf-DATASET-HEAD-sSEEDS.json).")
    p.add_argument("--seeds", default="42", help="Comma-separated training seeds; each variant runs once per seed.")
    p.add_argument("--combine", nargs="+", metavar="JSON", help="Pool earlier result files and compare; runs nothing.")
    p.add_argument("--seed", type=int, default=42, help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--files", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        return child(args)
    if args.combine:
        return combine(args.combine)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tmp = Path(tempfile.mkdtemp())
    files = {k: str(v) for k, v in export_data(args.dataset, tmp, args.train_limit).items()}
    seeds = [int(x) for x in args.seeds.split(",")]
    rows: dict[str, list[dict]] = {}
    for variant in args.variants.split(","):
        for seed in seeds:
            cmd = [sys.executable, __file__, "--variant", variant, "--files", json.dumps(files),
                   "--epochs", str(args.epochs), "--max-length", str(args.max_length),
                   "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--pooling", args.pooling, "--head", args.head,
                   "--head-lr-scale", str(args.head_lr_scale), "--precision", args.precision, "--seed", str(seed)]
            cmd += [f"--set={o}" for o in args.set or []]
            print(f"running {variant} seed {seed} ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                sys.exit(f"{variant} seed {seed} failed:\n{proc.stderr[-3000:]}")
            rows.setdefault(variant, []).append({**json.loads(line[7:]), "process_wall_s": wall, "seed": seed})

    settings = (f"{args.dataset}, MiniLM-L6, max_length {args.max_length}, {args.epochs:g} epochs, batch {args.batch_size}, "
                f"lr {args.lr:g}, textclass pooling {args.pooling}, head {args.head}, head lr x{args.head_lr_scale:g}, precision {args.precision}")
    if args.set:
        settings += ", textclass " + " ".join(args.set)
    if args.train_limit:
        settings += f", train limited to {args.train_limit} rows"
    print(f"\n{settings}, torch threads {__import__('torch').get_num_threads()}")
    means = print_table(rows)
    RESULTS.mkdir(exist_ok=True)
    # One file per data set, head and seed list, so a later run with other settings does not overwrite it.
    out = Path(args.out) if args.out else RESULTS / f"train_vs_hf-{args.dataset}-{args.head}-s{args.seeds.replace(',', '_')}.json"
    settings_json = vars(args) | {"variant": None, "files": None, "seed": None}
    out.write_text(json.dumps({"settings": settings_json, "results": rows, "means": means}, indent=2))
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
