"""textclass's small models vs fastText's own C++ library and TF-IDF + LinearSVC, same fixed splits.

Contenders (`--models`, comma-separated):
- `fasttext-cpp`: the `fasttext-wheel` package (`pip install fasttext-wheel`), `train_supervised` with the same
  epochs, word n-grams, dimension, buckets and threads as textclass, on a training file written with the
  *same tokens* textclass uses (textclass's tokenizer, joined by spaces: characters for Chinese, words for
  English; truncated to the same `max_length`);
- `tfidf-svc`: scikit-learn TF-IDF + LinearSVC, character 1-3-grams for Chinese, word 1-2-grams for English;
- `textclass-<arch>` for any small arch (`textclass-fasttext`, `textclass-textcnn`, ...): `textclass.train`
  with the family's defaults and the same epochs/dimension/n-grams.

Columns: test accuracy and macro-F1; `train s` is the training proper (textclass: `Trainer.train()`, which
includes its per-epoch validation and checkpoints; fastText: `train_supervised`; SVC: `fit` incl. TF-IDF);
`total s` is everything from raw texts to a trained model (textclass: the whole `textclass.train()` call,
which also evaluates and writes the run directory; fastText: tokenising, writing its file and training);
`predict/s` is test texts per second from raw text (textclass: `Classifier.load(run).predict_proba`, batch
`eval_batch_size`). Each contender runs in a fresh subprocess with the same thread count. With `--rounds N`
each contender runs N times, interleaved, and the table shows its fastest round (every round's train s is
in the JSON): one run's timings move by 10-30% on a shared machine.

    python benchmarks/small_vs_fasttext.py --dataset chinese-reviews
    python benchmarks/small_vs_fasttext.py --dataset bbc-news --models fasttext-cpp,tfidf-svc,textclass-fasttext
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
DEFAULT_MODELS = "fasttext-cpp,tfidf-svc,textclass-fasttext,textclass-textcnn"


def _splits(args: argparse.Namespace) -> dict[str, Any]:
    from textclass.data.builtin import load_builtin

    data = load_builtin(args.dataset)
    if args.train_limit:
        data["train"] = data["train"].sample(frac=1.0, random_state=0).head(args.train_limit)
    return data


def _scores(y_true: list[str], y_pred: list[str]) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    return {"accuracy": float(accuracy_score(y_true, y_pred)), "macro_f1": float(f1_score(y_true, y_pred, average="macro"))}


def _throughput(predict: Any, texts: list[str]) -> tuple[list[str], float]:
    t0 = time.perf_counter()
    preds = predict(texts)
    return preds, len(texts) / (time.perf_counter() - t0)


def run_fasttext_cpp(args: argparse.Namespace, data: dict[str, Any]) -> dict[str, Any]:
    """fastText's library on textclass's tokens (same tokenizer fit on train, same max_length)."""
    import fasttext

    from textclass.config import SmallModelConfig
    from textclass.text import TextTokenizer

    t0 = time.perf_counter()
    cfg = SmallModelConfig(max_length=args.max_length)
    tok = TextTokenizer.fit(data["train"]["text"].tolist(), cfg.tokenizer, cfg.lowercase)

    def line(text: str) -> str:
        return " ".join(tok.tokens(text, None, cfg.max_length))

    path = Path(tempfile.mkdtemp()) / "train.txt"
    rows = (f"__label__{label} {line(text)}" for text, label in zip(data["train"]["text"], data["train"]["label"]))
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    t1 = time.perf_counter()
    model = fasttext.train_supervised(
        str(path), epoch=int(args.epochs), dim=args.dim, wordNgrams=args.word_ngrams, bucket=args.buckets,
        thread=args.threads, lr=args.fasttext_lr, verbose=0,
    )
    t2 = time.perf_counter()

    def predict(texts: list[str]) -> list[str]:
        labels, _ = model.f.multilinePredict([line(t) for t in texts], 1, 0.0, "strict")
        return [ls[0].removeprefix("__label__") for ls in labels]

    test = data["test"]
    preds, per_s = _throughput(predict, test["text"].tolist())
    return {**_scores(test["label"].tolist(), preds), "train_s": t2 - t1, "total_s": t2 - t0, "predict_per_s": per_s}


def run_tfidf_svc(args: argparse.Namespace, data: dict[str, Any]) -> dict[str, Any]:
    """The strong linear baseline: character n-grams for CJK text, word n-grams otherwise."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import make_pipeline
    from sklearn.svm import LinearSVC

    from textclass.text import cjk_share

    train = data["train"]
    if cjk_share(train["text"].head(500)) > 0.5:
        vec = TfidfVectorizer(analyzer="char", ngram_range=(1, 3), sublinear_tf=True, min_df=1)
    else:
        vec = TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True, min_df=2)
    model = make_pipeline(vec, LinearSVC(C=args.svc_c))
    t0 = time.perf_counter()
    model.fit(train["text"].tolist(), train["label"].tolist())
    train_s = time.perf_counter() - t0
    test = data["test"]
    preds, per_s = _throughput(lambda t: list(model.predict(t)), test["text"].tolist())
    return {**_scores(test["label"].tolist(), preds), "train_s": train_s, "total_s": train_s, "predict_per_s": per_s}


def run_textclass(args: argparse.Namespace, data: dict[str, Any], arch: str) -> dict[str, Any]:
    """`textclass.train` on the same splits (written as CSV files, as a user would)."""
    from textclass import Classifier, train

    folder = Path(tempfile.mkdtemp())
    files = {}
    for split, df in data.items():
        files[split] = str(folder / f"{split}.csv")
        df.to_csv(files[split], index=False)
    model: dict[str, Any] = {"family": "small", "arch": arch, "embedding_dim": args.dim, "max_length": args.max_length}
    if arch == "fasttext":
        model.update(word_ngrams=args.word_ngrams, buckets=args.buckets)
    training: dict[str, Any] = {"output_dir": str(folder / "run"), "epochs": args.epochs, "num_threads": args.threads}
    for key in ("learning_rate", "batch_size"):
        if getattr(args, key) is not None:
            training[key] = getattr(args, key)
    t0 = time.perf_counter()
    result = train({"data": files, "model": model, "training": training}, args.set or None)
    total_s = time.perf_counter() - t0
    clf = Classifier.load(result.run_dir, threads=args.threads)
    test = data["test"]
    probs_to_labels = lambda t: [clf.labels[i] for i in clf.predict_proba(t).argmax(1)]  # noqa: E731
    preds, per_s = _throughput(probs_to_labels, test["text"].tolist())
    cfg = result.run_dir / "config.yaml"
    lr = __import__("yaml").safe_load(cfg.read_text())["training"]["learning_rate"]
    return {
        **_scores(test["label"].tolist(), preds),
        "train_s": result.metrics["train"]["train_runtime_s"],
        "total_s": total_s,
        "predict_per_s": per_s,
        "learning_rate": lr,
    }


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    data = _splits(args)
    name = args.model
    if name == "fasttext-cpp":
        out = run_fasttext_cpp(args, data)
    elif name == "tfidf-svc":
        out = run_tfidf_svc(args, data)
    elif name.startswith("textclass-"):
        out = run_textclass(args, data, name.removeprefix("textclass-"))
    else:
        sys.exit(f"unknown model {name!r}; use fasttext-cpp, tfidf-svc or textclass-<arch>")
    print("RESULT " + json.dumps(out))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="chinese-reviews", choices=["chinese-reviews", "bbc-news"])
    p.add_argument("--models", default=DEFAULT_MODELS, help="Comma-separated contenders (see above).")
    p.add_argument("--epochs", type=int, default=5, help="Both fastTexts and every textclass model (fastText's default).")
    p.add_argument("--dim", type=int, default=100, help="Embedding dimension for all (fastText's default).")
    p.add_argument("--word-ngrams", type=int, default=2)
    p.add_argument("--buckets", type=int, default=2_000_000, help="Hash buckets for both fastTexts (fastText's default).")
    p.add_argument("--max-length", type=int, default=256, help="Tokens per text for textclass and fastText's input.")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--learning-rate", type=float, default=None, help="textclass; default: the family's per-arch rate.")
    p.add_argument("--batch-size", type=int, default=None, help="textclass; default: the config default.")
    p.add_argument("--set", action="append", help="Extra textclass overrides, e.g. --set model.dropout=0.5.")
    p.add_argument("--fasttext-lr", type=float, default=0.1, help="fastText's lr (its default 0.1).")
    p.add_argument("--svc-c", type=float, default=1.0)
    p.add_argument("--train-limit", type=int, default=None, help="Use only N training rows (quick runs).")
    p.add_argument("--rounds", type=int, default=1, help="Run every contender N times, interleaved; keep each one's fastest.")
    p.add_argument("--tag", default="", help="Suffix of the results file, for runs with other settings.")
    p.add_argument("--model", help=argparse.SUPPRESS)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.model:
        return child(args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["TEXTCLASS_CACHE"] = tempfile.mkdtemp()  # cold tokenisation cache: every run pays for its own
    passthrough = [a for a in sys.argv[1:]]
    runs: dict[str, list[dict[str, Any]]] = {}
    for round_ in range(args.rounds):  # contenders interleaved, so a slow spell of the machine hits all alike
        for name in args.models.split(","):
            print(f"running {name} (round {round_ + 1}/{args.rounds}) ...", file=sys.stderr, flush=True)
            proc = subprocess.run([sys.executable, __file__, *passthrough, "--model", name], capture_output=True, text=True)
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
            runs.setdefault(name, []).append(json.loads(line[7:]))
    # Each contender's fastest round (scores are the same every round: all of them are seeded).
    rows = {name: min(rs, key=lambda r: r["train_s"]) | {"train_s_rounds": [r["train_s"] for r in rs]} for name, rs in runs.items()}

    print(
        f"\n{args.dataset}: {args.epochs} epochs, dim {args.dim}, word n-grams {args.word_ngrams}, "
        f"buckets {args.buckets}, max_length {args.max_length}, {args.threads} threads, best of {args.rounds} rounds"
        + (f", train limited to {args.train_limit} rows" if args.train_limit else "")
    )
    header = f"{'model':<22} {'test acc':>8} {'macro-F1':>8} {'train s':>8} {'total s':>8} {'predict/s':>10}"
    print(header + "\n" + "-" * len(header))
    for name, r in rows.items():
        print(
            f"{name:<22} {r['accuracy']:>8.4f} {r['macro_f1']:>8.4f} {r['train_s']:>8.2f} {r['total_s']:>8.2f} "
            f"{r['predict_per_s']:>10.0f}"
        )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"small_vs_fasttext-{args.dataset}{'-' + args.tag if args.tag else ''}.json"
    out.write_text(json.dumps({"settings": {k: v for k, v in vars(args).items() if k != "model"}, "results": rows}, indent=2))
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
