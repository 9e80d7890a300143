"""What each training trick is worth: every trick alone (and combinations) against the defaults, over seeds.

Suites (`--suite`):
- `minilm`: bbc-news with MiniLM-L6 (the offline all-MiniLM-L6-v2), texts cut to headline + first paragraph,
  a stratified train subset (`--train-limit`, default 800), `--max-length` 128, `--epochs` 2: a shorter
  schedule than the training benchmark (`train_vs_hf.py`), so that 13 variants x 3 seeds fit in an hour;
- `fasttext`, `textcnn`: chinese-reviews, a stratified train subset (default 3,000 of 13,886), full valid
  and test splits, the small family's defaults.

Each (variant, seed) runs `textclass.train` in a fresh subprocess (`--threads` torch threads). Printed per
variant: test accuracy and macro-F1 as the mean over seeds, their difference from `default` (paired by
seed) with a t 95% interval, and the wall-time multiplier of training proper (`Trainer.train()`, which
includes validation each epoch) over `default`'s, from the same run. `--timing` measures the adversarial
methods' cost per optimizer step instead: `--timing-steps` steps without validation, each variant
`--rounds` times interleaved, the fastest round; the theory is FGM 2 passes, PGD-K K+1, FreeLB-K K, AWP 2.

    python benchmarks/tricks.py --suite minilm --seeds 42,1,2
    python benchmarks/tricks.py --suite textcnn --variants default,rdrop,fgm --seeds 42,1,2,3,4
    python benchmarks/tricks.py --suite minilm --timing
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

RESULTS = Path(__file__).parent / "results"
ENCODER = "sentence-transformers/all-MiniLM-L6-v2"

# Each variant: (training overrides, model overrides). Values are the common recommendations of the papers
# and competition write-ups, not tuned here.
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "default": ({}, {}),
    "focal": ({"loss": "focal", "focal_gamma": 2.0}, {}),
    "poly1": ({"loss": "poly1", "poly_epsilon": 1.0}, {}),
    "smooth0.1": ({"label_smoothing": 0.1}, {}),
    "rdrop": ({"rdrop_alpha": 1.0}, {}),
    "fgm": ({"adversarial": "fgm"}, {}),
    "pgd": ({"adversarial": "pgd"}, {}),
    "freelb": ({"adversarial": "freelb"}, {}),
    "awp": ({"adversarial": "awp"}, {}),
    "ema": ({"ema_decay": 0.99}, {}),
    "swa": ({"swa": {"start": 0.5, "every_steps": 10}}, {}),
    "msd5": ({}, {"multisample_dropout": 5}),
    "noisytune": ({}, {"noisytune": 0.15}),
    "llrd0.9": ({"layer_lr_decay": 0.9}, {}),
    "fgm+rdrop": ({"adversarial": "fgm", "rdrop_alpha": 1.0}, {}),
    "fgm+rdrop+ema": ({"adversarial": "fgm", "rdrop_alpha": 1.0, "ema_decay": 0.99}, {}),
    "kfold5": ({"kfold": 5}, {}),
    "epochs4x": ({}, {}),  # one model at the 5-fold ensemble's total epochs (5 models x 4/5 of the data)
}
# What a suite cannot run: the small models are trained from scratch (no NoisyTune, no layer-wise decay);
# fastText has no dropout (no R-Drop effect, no multi-sample dropout).
NOT_FOR = {
    "fasttext": {"noisytune", "llrd0.9", "msd5", "rdrop", "fgm+rdrop", "fgm+rdrop+ema"},
    "textcnn": {"noisytune", "llrd0.9"},
    "minilm": set(),
}
TIMING_VARIANTS = ["default", "fgm", "pgd", "freelb", "awp"]


def headline_and_first_paragraph(text: str) -> str:
    parts = [p.strip() for p in str(text).split("\n\n") if p.strip()]
    return "\n".join(parts[:2])


def export_data(suite: str, folder: Path, train_limit: int) -> dict[str, str]:
    """The built-in splits as CSV files, train as a stratified subset (bbc-news: texts cut short)."""
    from sklearn.model_selection import train_test_split

    from textclass.data.builtin import load_builtin

    paths = {}
    for split, df in load_builtin("bbc-news" if suite == "minilm" else "chinese-reviews").items():
        if suite == "minilm":
            df = df.assign(text=df["text"].map(headline_and_first_paragraph))
        if split == "train" and train_limit < len(df):
            df, _ = train_test_split(df, train_size=train_limit, stratify=df["label"], random_state=0)
        paths[split] = str(folder / f"{split}.csv")
        df.to_csv(paths[split], index=False)
    return paths


def config(args: argparse.Namespace, variant: str, seed: int, files: dict[str, str], out: str) -> dict[str, Any]:
    training, model_extra = VARIANTS[variant]
    if args.suite == "minilm":
        model: dict[str, Any] = {"family": "encoder", "name": ENCODER, "max_length": args.max_length, "pooling": "mean"}
        base: dict[str, Any] = {"epochs": args.epochs, "batch_size": 16, "learning_rate": 1e-4}
    else:
        model = {"family": "small", "arch": args.suite}
        base = {} if args.epochs is None else {"epochs": args.epochs}
    if variant == "epochs4x":
        base["epochs"] = 4 * (args.epochs or 3.0)  # 3.0: the config's default epochs
    if args.timing:
        # No validation inside the measured steps (eval_steps beyond them), one log line.
        base = {**base, "max_steps": args.timing_steps, "logging_steps": args.timing_steps, "eval_steps": 10**6}
        files = {"train": files["train"]}  # no validation split beyond the held-out 10%, no test
    return {
        "data": files,
        "model": model | model_extra,
        "training": {"output_dir": out, "seed": seed, "num_threads": args.threads, **base, **training},
    }


def child(args: argparse.Namespace) -> None:
    import textclass

    out = tempfile.mkdtemp() + "/run"
    t0 = time.perf_counter()
    result = textclass.train(config(args, args.variant, args.seed, json.loads(args.files), out))
    test = result.metrics.get("test") or {}
    train = result.metrics.get("train", {})
    runs = train.get("folds", [train])  # a k-fold run: each fold's summary
    row = {
        "train_s": sum(r.get("train_runtime_s") or 0.0 for r in runs),
        "total_s": time.perf_counter() - t0,
        "steps": sum(r.get("global_step") or 0 for r in runs),
        "oof_accuracy": result.metrics.get("oof", {}).get("accuracy"),
        "test_accuracy": test.get("accuracy"),
        "test_macro_f1": test.get("macro_f1"),
    }
    print("RESULT " + json.dumps(row))


def run_child(args: argparse.Namespace, variant: str, seed: int, files: dict[str, str]) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", "--suite", args.suite, "--variant", variant, "--seed", str(seed)]
    cmd += ["--files", json.dumps(files), "--max-length", str(args.max_length), "--threads", str(args.threads)]
    cmd += ["--epochs", str(args.epochs)] if args.epochs is not None else []
    cmd += ["--timing", "--timing-steps", str(args.timing_steps)] if args.timing else []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"{variant} seed {seed} failed:\n{proc.stderr[-3000:]}")
    return {**json.loads(lines[-1][7:]), "seed": seed}


def interval(diffs: list[float]) -> tuple[float, float, float]:
    """Mean and t 95% interval of paired differences."""
    import numpy as np
    from scipy import stats

    d = np.asarray(diffs, dtype=float)
    if len(d) < 2:
        return float(d.mean()), float("nan"), float("nan")
    half = float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def print_table(results: dict[str, list[dict[str, Any]]], title: str) -> None:
    import numpy as np

    print(f"\n{title}")
    head = f"{'variant':<15} {'acc':>7} {'d acc [95% interval]':>28} {'macro-F1':>8} {'d F1 [95% interval]':>28}"
    print(f"{head} {'train s':>8} {'x time':>7}")
    base = {r["seed"]: r for r in results.get("default", [])}
    base_s = np.mean([r["train_s"] for r in base.values()]) if base else float("nan")
    for name, runs in results.items():
        acc = np.mean([r["test_accuracy"] for r in runs])
        f1 = np.mean([r["test_macro_f1"] for r in runs])
        cells = []
        for key in ("test_accuracy", "test_macro_f1"):
            paired = [r[key] - base[r["seed"]][key] for r in runs if r["seed"] in base]
            mean, lo, hi = interval(paired) if paired and name != "default" else (0.0, float("nan"), float("nan"))
            cells.append(f"{mean:+.4f} [{lo:+.4f}, {hi:+.4f}]" if name != "default" else "-")
        train_s = np.mean([r["train_s"] for r in runs])
        print(f"{name:<15} {acc:>7.4f} {cells[0]:>28} {f1:>8.4f} {cells[1]:>28} {train_s:>8.1f} {train_s / base_s:>7.2f}")


def print_timing(results: dict[str, list[dict[str, Any]]], steps: int) -> None:
    theory = {"default": "1", "fgm": "2", "pgd": "K+1 = 4", "freelb": "K = 3", "awp": "2"}
    fastest = {name: min(r["train_s"] for r in runs) for name, runs in results.items()}
    print(f"\nseconds per optimizer step (fastest of the rounds, {steps} steps)")
    print(f"{'variant':<10} {'s/step':>8} {'x default':>10} {'theory (passes)':>16}")
    for name, s in fastest.items():
        print(f"{name:<10} {s / steps:>8.3f} {s / fastest['default']:>10.2f} {theory.get(name, '-'):>16}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=["minilm", "fasttext", "textcnn"], default="minilm")
    parser.add_argument("--variants", default=None, help="comma-separated; default: all the suite can run")
    parser.add_argument("--seeds", default="42,1,2")
    parser.add_argument("--train-limit", type=int, default=None, help="default: 800 (minilm), 3000 (small suites)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--epochs", type=float, default=None, help="default: 2 for minilm, the family's for small")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timing", action="store_true", help="cost per step of the adversarial methods")
    parser.add_argument("--timing-steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2, help="--timing: interleaved rounds")
    parser.add_argument("--tag", default="")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--files", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.epochs is None and args.suite == "minilm":
        args.epochs = 2.0
    if args.train_limit is None:
        args.train_limit = 800 if args.suite == "minilm" else 3000
    if args.child:
        child(args)
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    names = args.variants.split(",") if args.variants else (TIMING_VARIANTS if args.timing else list(VARIANTS))
    names = [n for n in names if n not in NOT_FOR[args.suite]]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"--variants: unknown {unknown}; known: {', '.join(VARIANTS)}")
    files = export_data(args.suite, Path(tempfile.mkdtemp()), args.train_limit)
    results: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    if args.timing:
        for _ in range(args.rounds):
            for name in names:
                results[name].append(run_child(args, name, seeds[0], files))
                print(f"{name}: {results[name][-1]['train_s']:.1f} s", flush=True)
        print_timing(results, args.timing_steps)
    else:
        for seed in seeds:  # seed-major: a slow drift of the machine spreads over every variant
            for name in names:
                results[name].append(run_child(args, name, seed, files))
                r = results[name][-1]
                print(
                    f"{name} seed {seed}: acc {r['test_accuracy']:.4f} F1 {r['test_macro_f1']:.4f} train {r['train_s']:.1f} s",
                    flush=True,
                )
        print_table(results, f"{args.suite}: test metrics over seeds {seeds}, differences paired by seed")
    RESULTS.mkdir(exist_ok=True)
    kind = "timing" if args.timing else "s" + "_".join(map(str, seeds))
    path = RESULTS / f"tricks-{args.suite}-{kind}{'-' + args.tag if args.tag else ''}.json"
    path.write_text(json.dumps({"settings": vars(args), "results": results}, indent=1))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
