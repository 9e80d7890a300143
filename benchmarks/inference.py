"""Inference speed, latency, memory and accuracy: transformers `pipeline` vs textclass (torch, ONNX fp32, int8).

Every variant runs in its own fresh Python process (so "peak resident memory" is that process's peak,
imports included) on the same test texts, with the same thread count:

- pipeline:     transformers.pipeline("text-classification", model=RUN_DIR), PyTorch fp32, batch_size set,
                truncation at the run's max_length (needs a `head: hf` run directory, the one pipeline loads)
- torch:        textclass `--backend torch`
- onnx-fp32:    textclass `--backend onnx`, model.onnx (exported with --optimize: fused graph)
- onnx-int8:    textclass `--backend onnx`, model.int8.onnx

Printed per variant: texts/s at batch 32 (all test texts, best of --repeats passes), texts/s at batch 1 and
p50/p99 latency per call (the first --batch1-texts texts, one call each), peak RSS, test accuracy, plus
ratios against the pipeline. Variants are measured one after another in the same run (--rounds N repeats
the sequence, interleaved, and keeps each variant's best round): on a shared machine compare the ratios,
not the absolute numbers.

    python benchmarks/inference.py --model runs/demo_hf --export          # export first (--optimize --int8)
    python benchmarks/inference.py --model runs/demo --no-pipeline         # linear head: textclass rows only
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

VARIANTS = ["pipeline", "torch", "onnx-fp32", "onnx-int8"]


def _test_data(dataset: str, limit: int | None) -> tuple[list[str], list[str]]:
    from textclass.data.builtin import load_builtin

    df = load_builtin(dataset)["test"]
    if limit:
        df = df.head(limit)
    return df["text"].astype(str).tolist(), df["label"].astype(str).tolist()


def _read_texts(path: Path) -> tuple[list[str], list[str], int]:
    """The workers read the texts from a JSON file the parent wrote: loading the data set (pandas, the
    reader) would otherwise add ~230 MB to every worker's peak memory, hiding what prediction costs."""
    data = json.loads(path.read_text(encoding="utf-8"))
    return data["texts"], data["labels"], data["max_length"]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _predict_fn(variant: str, model: Path, threads: int, batch_size: int, max_length: int):  # noqa: ANN202 - local helper
    """A function texts -> predicted label names, for one variant, built once per batch size."""
    if variant == "pipeline":
        import torch
        from transformers import pipeline

        torch.set_num_threads(threads)
        pipe = pipeline("text-classification", model=str(model), device=-1, dtype=torch.float32)

        def run(texts: list[str]) -> list[str]:
            out = pipe(texts, batch_size=batch_size, truncation=True, max_length=max_length)
            return [o["label"] for o in out]

        return run
    from textclass.inference.load import load_predictor

    backend, variant_name = ("torch", None) if variant == "torch" else ("onnx", variant.split("-")[1])
    pred = load_predictor(model, batch_size=batch_size, threads=threads, backend=backend, variant=variant_name)
    names = pred.labels.names

    def run(texts: list[str]) -> list[str]:
        return [names[i] for i in pred.predict_proba(texts).argmax(1)]

    return run


def worker(args: argparse.Namespace) -> dict:
    """Measure one variant in this process; returns the row as a dict."""
    texts, gold, max_length = _read_texts(args.texts)
    t0 = time.perf_counter()
    run32 = _predict_fn(args.worker, args.model, args.threads, 32, max_length)
    load_s = time.perf_counter() - t0
    run32(texts[:32])  # warm-up
    best, preds = float("inf"), []
    for _ in range(args.repeats):
        t = time.perf_counter()
        preds = run32(texts)
        best = min(best, time.perf_counter() - t)
    run1 = _predict_fn(args.worker, args.model, args.threads, 1, max_length) if args.worker == "pipeline" else run32
    one = texts[: args.batch1_texts]
    run1(one[:3])  # warm-up
    lat = []
    for text in one:
        t = time.perf_counter()
        run1([text])
        lat.append(time.perf_counter() - t)
    lat_sorted = sorted(lat)
    return {
        "variant": args.worker,
        "texts_per_s_b32": len(texts) / best,
        "texts_per_s_b1": len(one) / sum(lat),
        "p50_ms_b1": 1000 * lat_sorted[len(lat) // 2],
        "p99_ms_b1": 1000 * lat_sorted[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))],
        "peak_rss_mb": _peak_rss_mb(),
        "accuracy": sum(p == g for p, g in zip(preds, gold)) / len(gold),
        "load_s": load_s,
        "n_texts": len(texts),
        "n_batch1": len(one),
    }


def export(model: Path) -> None:
    """Export with --optimize --int8 into MODEL/onnx (both the fused fp32 and the int8 file)."""
    cmd = [sys.executable, "-m", "textclass.cli", "export", "--model", str(model), "--optimize", "--int8"]
    subprocess.run(cmd, check=True)


def table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["variant"] == "pipeline"), None)
    head = "| variant | texts/s b32 | texts/s b1 | p50 ms b1 | p99 ms b1 | peak RSS MB | test acc |"
    if base:
        head += " b32 vs pipeline | b1 vs pipeline | RSS vs pipeline |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        line = (
            f"| {r['variant']} | {r['texts_per_s_b32']:.1f} | {r['texts_per_s_b1']:.1f} | {r['p50_ms_b1']:.1f} | "
            f"{r['p99_ms_b1']:.1f} | {r['peak_rss_mb']:.0f} | {r['accuracy']:.4f} |"
        )
        if base:
            line += (
                f" {r['texts_per_s_b32'] / base['texts_per_s_b32']:.2f}x | {r['texts_per_s_b1'] / base['texts_per_s_b1']:.2f}x |"
                f" {100 * r['peak_rss_mb'] / base['peak_rss_mb']:.0f}% |"
            )
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="Run directory (head: hf for the pipeline row).")
    ap.add_argument("--dataset", default="bbc-news", help="Built-in data set whose test split is used.")
    ap.add_argument("--limit", type=int, default=None, help="Use only the first N test texts.")
    ap.add_argument("--threads", type=int, default=2, help="Intra-op threads for every variant.")
    ap.add_argument("--repeats", type=int, default=3, help="Passes over the test texts at batch 32 (best is kept).")
    ap.add_argument("--batch1-texts", type=int, default=100, help="Texts timed one call each.")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="Comma-separated subset of " + ", ".join(VARIANTS))
    ap.add_argument("--no-pipeline", action="store_true", help="Skip the pipeline row.")
    ap.add_argument("--pipeline-model", type=Path, default=None,
                    help="Folder the pipeline loads (default --model; pipeline() needs a `head: hf` run).")
    ap.add_argument("--export", action="store_true", help="Run `textclass export --optimize --int8` first.")
    ap.add_argument("--rounds", type=int, default=1,
                    help="Run all variants this many times, interleaved; keep each variant's best round (less "
                         "sensitive to other load on a shared machine).")
    ap.add_argument("--json", type=Path, default=None, help="Also write the rows here.")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--texts", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.export:
        export(args.model)
    variants = [v for v in args.variants.split(",") if not (args.no_pipeline and v == "pipeline")]
    texts, labels = _test_data(args.dataset, args.limit)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        data_file = Path(tmp) / "texts.json"
        import yaml  # the pipeline truncates where the run does

        max_length = yaml.safe_load((args.model / "config.yaml").read_text())["model"]["max_length"]
        data_file.write_text(json.dumps({"texts": texts, "labels": labels, "max_length": max_length}), encoding="utf-8")
        results: dict[str, list[dict]] = {v: [] for v in variants}
        for _ in range(args.rounds):
            for v in variants:
                model = args.pipeline_model if v == "pipeline" and args.pipeline_model else args.model
                cmd = [sys.executable, __file__, "--worker", v, "--model", str(model), "--texts", str(data_file),
                       "--threads", str(args.threads), "--repeats", str(args.repeats),
                       "--batch1-texts", str(args.batch1_texts)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                results[v].append(json.loads(out.strip().splitlines()[-1]))
                print(f"{v}: {json.dumps(results[v][-1])}", file=sys.stderr, flush=True)
        for v in variants:  # best round per measure; memory and accuracy do not depend on load
            rs = results[v]
            b1 = max(rs, key=lambda r: r["texts_per_s_b1"])
            rows.append({**b1, "texts_per_s_b32": max(r["texts_per_s_b32"] for r in rs),
                         "peak_rss_mb": max(r["peak_rss_mb"] for r in rs), "rounds": len(rs)})
    print(f"model {args.model}" + (f" (pipeline: {args.pipeline_model})" if args.pipeline_model else "")
          + f", {rows[0]['n_texts']} {args.dataset} test texts (batch 1: first {rows[0]['n_batch1']}), {args.threads} threads, CPU")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
