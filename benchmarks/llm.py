"""Decoder LLMs as classifiers: textclass's llm family against a plain PEFT + Trainer script, and MiniLM.

Data: bbc-news, each text cut to its headline and first paragraph, a fixed stratified training subset
(`--train-limit`), the built-in validation split cut to `--valid-limit`, the full test split (212 texts).
Variants, each in a fresh subprocess (so peak resident memory is its own):

- `lora`, `full`, `head`: textclass, SmolLM2-135M-Instruct (offline GGUF), `model.finetune` = that, last-token
  pooling, linear head, the family's default learning rate, `precision: auto`.
- `lora-ckpt`, `full-ckpt`: the same with `training.gradient_checkpointing` (each mode's best memory setting).
- `zero-shot`: `textclass zero-shot` with a topic prompt, no training.
- `minilm`: textclass's encoder default (all-MiniLM-L6-v2) at the same length, epochs and batch (lr 1e-4).
- `peft-plain`: the PEFT docs' recipe: `AutoModelForSequenceClassification` + `LoraConfig(task_type="SEQ_CLS")`
  (r 16, alpha 32, dropout 0.05, the same target modules as textclass), `DataCollatorWithPadding`, the
  Trainer in fp32 with its defaults, lr 2e-4.

    python benchmarks/llm.py --seeds 42,1,2                       # every variant, three seeds
    python benchmarks/llm.py --variants lora-ckpt,full-ckpt --seeds 42 --max-steps 10   # memory only
    python benchmarks/llm.py --combine benchmarks/results/llm-*.json

Printed per variant: test accuracy (each seed, mean and a t 95% interval), train wall time, trainable
parameters, peak resident memory of the process, and predict throughput on the test texts (batch 32).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
LLM = "HuggingFaceTB/SmolLM2-135M-Instruct"
ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
PROMPT = "{text}\nQuestion: which topic is this news text about: {labels}?\nAnswer:"
TEXTCLASS_VARIANTS = {"lora": "lora", "full": "full", "head": "head", "lora-ckpt": "lora", "full-ckpt": "full"}
ALL = ["lora", "full", "head", "zero-shot", "minilm", "peft-plain"]


def headline_and_first_paragraph(text: str) -> str:
    parts = [p.strip() for p in str(text).split("\n\n") if p.strip()]
    return "\n".join(parts[:2])


def export_data(folder: Path, train_limit: int, valid_limit: int) -> dict[str, str]:
    """The built-in splits as CSV, texts cut to headline + first paragraph, train/valid to stratified subsets."""
    from sklearn.model_selection import train_test_split

    from textclass.data.builtin import load_builtin

    paths = {}
    for split, df in load_builtin("bbc-news").items():
        df = df.assign(text=df["text"].map(headline_and_first_paragraph))
        limit = {"train": train_limit, "valid": valid_limit}.get(split)
        if limit and limit < len(df):
            df, _ = train_test_split(df, train_size=limit, stratify=df["label"], random_state=0)
        paths[split] = str(folder / f"{split}.csv")
        df.to_csv(paths[split], index=False)
    return paths


def _throughput(clf, texts: list[str]) -> float:
    clf.predict_proba(texts[:32])  # warm-up
    t0 = time.perf_counter()
    clf.predict_proba(texts)
    return len(texts) / (time.perf_counter() - t0)


def run_textclass(args: argparse.Namespace, files: dict[str, str]) -> dict:
    import pandas as pd

    import textclass

    test_texts = pd.read_csv(files["test"])["text"].tolist()
    out = tempfile.mkdtemp() + "/run"
    if args.variant == "zero-shot":
        t0 = time.perf_counter()
        labels = sorted(pd.read_csv(files["train"])["label"].unique())
        from textclass.api import zero_shot

        result = zero_shot(
            labels, data=files["test"], model=LLM, prompt=PROMPT, output=out, overrides=[f"model.max_length={args.max_length}"]
        )
        clf = textclass.Classifier.load(out, backend="torch", batch_size=32)
        return {
            "train_s": 0.0,
            "total_s": time.perf_counter() - t0,
            "test_accuracy": result["metrics"]["test"]["accuracy"],
            "trainable": 0,
            "texts_per_s": _throughput(clf, test_texts),
        }
    if args.variant == "minilm":
        model = {"family": "encoder", "name": ENCODER, "max_length": args.max_length, "pooling": "mean"}
        lr: float | None = 1e-4
    else:
        model = {"family": "llm", "name": LLM, "max_length": args.max_length, "finetune": TEXTCLASS_VARIANTS[args.variant]}
        lr = None  # the family's default for the mode
    cfg = {
        "data": files,
        "model": model,
        "training": {
            "output_dir": out,
            "epochs": args.epochs,
            "max_steps": args.max_steps,
            "batch_size": args.batch_size,
            "learning_rate": lr,
            "logging_steps": 10,
            "seed": args.seed,
            "gradient_checkpointing": args.variant.endswith("-ckpt"),
        },
    }
    t0 = time.perf_counter()
    result = textclass.train(cfg, json.loads(args.set_json))
    total_s = time.perf_counter() - t0
    clf = textclass.Classifier.load(out, backend="torch", batch_size=32)
    _, trainable = clf.predictor.parameter_counts()
    return {
        "train_s": result.metrics["train"]["train_runtime_s"],
        "total_s": total_s,
        "test_accuracy": result.metrics["test"]["accuracy"],
        "trainable": trainable,
        "texts_per_s": _throughput(clf, test_texts),
    }


def run_peft_plain(args: argparse.Namespace, files: dict[str, str]) -> dict:
    """The PEFT docs' sequence-classification recipe, on the same (converted) SmolLM2 folder."""
    import numpy as np
    from datasets import load_dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from textclass.config import LLMModelConfig
    from textclass.models.llm.pretrained import resolve

    path = resolve(LLMModelConfig(name=LLM)).path  # the GGUF converted once to safetensors (as textclass reads it)
    raw = load_dataset("csv", data_files={"train": files["train"], "validation": files["valid"], "test": files["test"]})
    labels = sorted(set(raw["train"]["label"]))
    label2id = {name: i for i, name in enumerate(labels)}
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label2id
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=16, lora_alpha=32, lora_dropout=0.05, target_modules=targets))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def preprocess(batch: dict) -> dict:
        out = tokenizer(batch["text"], truncation=True, max_length=args.max_length)
        out["labels"] = [label2id[name] for name in batch["label"]]
        return out

    raw = raw.map(preprocess, batched=True, remove_columns=["text", "label"])
    targs = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=32,
        learning_rate=2e-4,
        weight_decay=0.01,
        eval_strategy="epoch",
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        logging_steps=10,
    )
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=raw["train"],
        eval_dataset=raw["validation"],
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=[MEMORY.callback()] if MEMORY else None,
    )
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    pred = trainer.predict(raw["test"])
    predict_s = time.perf_counter() - t1
    acc = float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())
    return {
        "train_s": train_s,
        "total_s": time.perf_counter() - t0,
        "test_accuracy": acc,
        "trainable": trainable,
        "texts_per_s": len(raw["test"]) / predict_s,
    }


class TrainingMemory:
    """Peak resident memory while the Trainer trains (sampled every 20 ms), apart from loading and reports.

    Both sides get it the same way: a TrainerCallback opens and closes the window. textclass builds its
    Trainer inside `train()`, so the harness wraps `build_trainer` to add the callback (measurement only).
    """

    def __init__(self) -> None:
        import threading

        import psutil

        self.proc, self.peak, self.active = psutil.Process(), 0, False
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            if self.active:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.02)

    def callback(self):  # noqa: ANN201
        from transformers import TrainerCallback

        memory = self

        class Window(TrainerCallback):
            def on_train_begin(self, *a, **k):  # noqa: ANN002, ANN003, ANN202
                memory.active = True

            def on_train_end(self, *a, **k):  # noqa: ANN002, ANN003, ANN202
                memory.active = False

        return Window()


MEMORY: TrainingMemory | None = None


def child(args: argparse.Namespace) -> None:
    global MEMORY
    MEMORY = TrainingMemory()
    import textclass.training.run as run_module

    build = run_module.build_trainer

    def build_with_window(*a, **k):  # noqa: ANN002, ANN003, ANN202
        trainer = build(*a, **k)
        trainer.add_callback(MEMORY.callback())
        return trainer

    run_module.build_trainer = build_with_window
    files = json.loads(args.files)
    out = (run_peft_plain if args.variant == "peft-plain" else run_textclass)(args, files)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["train_peak_rss_mb"] = MEMORY.peak / 2**20
    print("RESULT " + json.dumps(out))


def run_child(args: argparse.Namespace, variant: str, seed: int, files: dict[str, str]) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--variant",
        variant,
        "--seed",
        str(seed),
        "--files",
        json.dumps(files),
        "--epochs",
        str(args.epochs),
        "--max-steps",
        str(args.max_steps),
        "--batch-size",
        str(args.batch_size),
        "--max-length",
        str(args.max_length),
        "--set-json",
        json.dumps(args.set or []),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"{variant} seed {seed} failed:\n{proc.stderr[-3000:]}")
    return {**json.loads(lines[-1][7:]), "process_wall_s": time.perf_counter() - t0, "seed": seed}


def train_mb(runs: list[dict]) -> str:
    """Mean peak RSS while training; '-' for result files written before it was measured."""
    values = [r["train_peak_rss_mb"] for r in runs if "train_peak_rss_mb" in r]
    return f"{sum(values) / len(values):.0f}" if len(values) == len(runs) else "-"


def print_table(results: dict[str, list[dict]], settings: dict) -> None:
    import numpy as np
    from scipy import stats

    print(
        f"\nbbc-news headline + first paragraph, {settings['max_length']} tokens, train {settings['train_limit']} texts, "
        f"valid {settings['valid_limit']}, test 212; {settings['epochs']:g} epoch(s), batch {settings['batch_size']}"
        + (f", max_steps {settings['max_steps']}" if settings["max_steps"] > 0 else "")
    )
    head = (
        f"{'variant':<11} {'test acc by seed':<26} {'mean':>7} {'95% interval':>17} {'train s':>8} {'trainable':>11} "
        f"{'peak MB':>8} {'train MB':>9} {'texts/s':>8}"
    )
    print(head)
    print("-" * len(head))
    for name, runs in results.items():
        acc = np.array([r["test_accuracy"] for r in runs])
        if len(acc) > 1:
            half = stats.t.ppf(0.975, len(acc) - 1) * acc.std(ddof=1) / np.sqrt(len(acc))
            interval = f"[{acc.mean() - half:.4f}, {acc.mean() + half:.4f}]"
        else:
            interval = "-"
        mean = lambda k: float(np.mean([r[k] for r in runs]))  # noqa: E731
        by_seed = " ".join(f"{a:.4f}" for a in acc)
        print(
            f"{name:<11} {by_seed:<26} {acc.mean():>7.4f} {interval:>17} {mean('train_s'):>8.1f} {int(mean('trainable')):>11,} "
            f"{mean('peak_rss_mb'):>8.0f} {train_mb(runs):>9} {mean('texts_per_s'):>8.1f}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(ALL))
    p.add_argument("--seeds", default="42,1,2")
    p.add_argument("--train-limit", type=int, default=320)
    p.add_argument("--valid-limit", type=int, default=100)
    p.add_argument("--epochs", type=float, default=1)
    p.add_argument("--max-steps", type=int, default=-1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--set", action="append", help="Extra textclass overrides, e.g. --set training.precision=fp32.")
    p.add_argument("--set-json", default="[]", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None)
    p.add_argument("--combine", nargs="+", metavar="JSON", help="Print earlier result files together; runs nothing.")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=42, help=argparse.SUPPRESS)
    p.add_argument("--files", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        return child(args)
    if args.combine:
        merged: dict[str, list[dict]] = {}
        settings: dict = {}
        for f in args.combine:
            data = json.loads(Path(f).read_text())
            settings = settings or data["settings"]
            for name, runs in data["results"].items():
                merged.setdefault(name, []).extend(runs)
        return print_table(merged, settings)
    settings = {
        k: getattr(args, k) for k in ("train_limit", "valid_limit", "epochs", "max_steps", "batch_size", "max_length", "set")
    }
    settings["cpu"] = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?"
    )
    folder = Path(tempfile.mkdtemp())
    files = export_data(folder, args.train_limit, args.valid_limit)
    results: dict[str, list[dict]] = {}
    seeds = [int(s) for s in args.seeds.split(",")]
    for seed in seeds:  # seeds outermost: a long run leaves complete rounds behind
        for variant in args.variants.split(","):
            r = run_child(args, variant, seed, files)
            results.setdefault(variant, []).append(r)
            print(f"{variant} seed {seed}: {json.dumps(r)}", flush=True)
            out = Path(args.out or RESULTS / f"llm-{args.variants.replace(',', '_')}-s{args.seeds.replace(',', '_')}.json")
            out.write_text(json.dumps({"settings": settings, "results": results}, indent=2))
    print_table(results, settings)


if __name__ == "__main__":
    main()
