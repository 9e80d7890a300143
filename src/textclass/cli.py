"""The `textclass` command: parse, call the API, print. No logic of its own.

A `UserError` anywhere below becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from typer.exceptions import TyperException

from textclass.errors import EXIT_INTERRUPTED, EXIT_USER_ERROR, Interrupted, UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train, evaluate and use text classifiers.")
data_app = typer.Typer(no_args_is_help=True, help="Built-in data sets.")
app.add_typer(data_app, name="data")


def _interruptible(command: Callable[..., None]) -> Callable[..., None]:
    """Ctrl-C in a command: one line saying what was kept, exit 130.

    Caught here, inside the command, because typer turns a KeyboardInterrupt that reaches it into a bare
    exit code and drops the message. `Interrupted` carries the command's own account of what it kept.
    """

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            command(*args, **kwargs)
        except KeyboardInterrupt as err:
            said = str(err) if isinstance(err, Interrupted) else "stopped before finishing"
            typer.echo(f"interrupted: {said}", err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("textclass").setLevel(logging.DEBUG if verbose else logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import torch

        if torch.accelerator.current_accelerator() is None:  # DeepSpeed (imported by accelerate when installed)
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # would warn in every process that it found no GPU
    except ImportError:
        pass
    try:
        import transformers

        transformers.logging.set_verbosity_error()  # keep progress bars, drop library chatter
        import datasets

        datasets.logging.set_verbosity_error()
    except ImportError:
        pass


@app.command()
@_interruptible
def train(
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML config (see configs/)."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a key: --set training.epochs=2"),
    output: Path | None = typer.Option(None, "--output", "-o", help="Run directory (training.output_dir)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in the run directory."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run directory."),
    nproc: int | None = typer.Option(
        None, "--nproc", help="Train with N processes on this machine (starts torchrun; docs/scaling.md)."
    ),
) -> None:
    """Train a classifier and write its run directory."""
    from textclass.api import train as api_train
    from textclass.config import build_config, load_config
    from textclass.training import distributed

    if nproc is not None:
        distributed.refuse_nproc(nproc)

    overrides = list(set_) + ([f"training.output_dir={output}"] if output else [])
    if resume and config is None and output is not None:
        from textclass.training.resume import load_pending_config

        cfg = build_config(load_pending_config(output), overrides, source=str(output))
    else:
        cfg = load_config(config, overrides)
    if nproc is not None:  # the config is valid: the same command line, minus --nproc, in N processes
        raise typer.Exit(distributed.launch(nproc, _without_option(sys.argv[1:], "--nproc")))
    from textclass.evaluation import format_report

    result = api_train(cfg, resume=resume, overwrite=overwrite)
    if not distributed.is_main_process():  # under torchrun rank 0 reports
        return
    if "test" in result.reports:
        typer.echo(format_report(result.reports["test"], title=f"test ({cfg.data.test or cfg.data.dataset})"))
    for split, metrics in result.metrics.items():
        if split in ("valid", "oof", "test"):  # oof: a k-fold run's out-of-fold predictions
            shown = {k: v for k, v in metrics.items() if isinstance(v, float)}
            typer.echo(f"{split}: " + "  ".join(f"{k}={v:.4f}" for k, v in shown.items()))
    typer.echo(f"run directory: {result.run_dir}")


@app.command()
@_interruptible
def tune(
    config: Path | None = typer.Option(None, "--config", "-c", help="The base YAML config every trial starts from."),
    space: Path = typer.Option(..., "--space", help="YAML search space: dotted config keys -> distributions (docs/tune.md)."),
    trials: int = typer.Option(20, "--trials", "-n", help="Trials in all (with --resume, counting the finished ones)."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a key of the base config: --set training.epochs=2"),
    output: Path | None = typer.Option(None, "--output", "-o", help="Tune folder (default runs/tune-NAME)."),
    pruner: str = typer.Option("median", help="Stop trials worse than the median of earlier ones: median, or none."),
    seed: int | None = typer.Option(None, help="Seed of the sampler (default training.seed): same seed, same trials."),
    resume: bool = typer.Option(False, "--resume", help="Continue the tune in --output (its study.db)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing tune folder."),
    nproc: int | None = typer.Option(None, "--nproc", help="Train each trial with N processes (starts torchrun)."),
) -> None:
    """Search hyper-parameters with Optuna; writes trials.csv, trials.png and best.yaml (for `train`)."""
    from textclass.api import raw_config
    from textclass.api import tune as api_tune
    from textclass.training import distributed
    from textclass.training.tune import check_tune
    from textclass.training.tune_folder import format_trials

    if nproc is not None:
        distributed.refuse_nproc(nproc)
        raw, source = raw_config(config, list(set_))
        check_tune(raw, space, trials, pruner, source)  # a mistake is one line here, not one per process
        raise typer.Exit(distributed.launch(nproc, _without_option(sys.argv[1:], "--nproc")))
    result = api_tune(
        config, space, trials, list(set_), output=output, seed=seed, pruner=pruner, resume=resume, overwrite=overwrite
    )
    if not distributed.is_main_process():  # under torchrun rank 0 reports
        return
    typer.echo(format_trials(result))
    typer.echo(f"best: trial {result.best_trial}, valid {result.metric} {result.best_value:.4f}")
    typer.echo(f"best config: {result.files['best']} (train it: textclass train --config {result.files['best']})")
    typer.echo(f"tune folder: {result.folder}")


@app.command()
@_interruptible
def distill(
    teacher: list[Path] = typer.Option(..., "--teacher", "-t", help="Teacher run directory (repeat for several: averaged)."),
    config: Path | None = typer.Option(
        None, "--config", "-c", help="The student's YAML config (default: the teacher's data, an encoder)."
    ),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a key: --set distill.temperature=4"),
    output: Path | None = typer.Option(None, "--output", "-o", help="The student's run directory (training.output_dir)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in the run directory."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run directory."),
) -> None:
    """Train a student model on the soft labels of teacher runs (any family into any family)."""
    from textclass.api import distill as api_distill
    from textclass.training import distributed

    result = api_distill(teacher, config, list(set_), output=output, resume=resume, overwrite=overwrite)
    if not distributed.is_main_process():  # under torchrun rank 0 reports
        return
    student = result.metrics.get("test") or result.metrics.get("valid") or {}
    split = "test" if "test" in result.metrics else "valid"
    for t in result.metrics["distill"]["teachers"]:
        ours, theirs = student.get("accuracy"), (t.get(split) or {}).get("accuracy")
        kept = f" (the student keeps {100 * ours / theirs:.1f}%)" if ours is not None and theirs else ""
        shown = f"{theirs:.4f}" if theirs is not None else "n/a"
        typer.echo(f"teacher {t['run_dir']}: {split} accuracy {shown}{kept}")
    shown_metrics = {k: v for k, v in student.items() if isinstance(v, float)}
    typer.echo(f"student {split}: " + "  ".join(f"{k}={v:.4f}" for k, v in shown_metrics.items()))
    typer.echo(f"run directory: {result.run_dir}")


@app.command("zero-shot")
@_interruptible
def zero_shot(
    labels: str = typer.Option(..., "--labels", "-l", help="Comma-separated label names, e.g. sport,tech,politics."),
    model: str | None = typer.Option(
        None, "--model", "-m", help="Decoder LLM: hub name or folder (default SmolLM2-135M-Instruct)."
    ),
    data: Path | None = typer.Option(None, "--data", "-d", help="Labelled file to score and report on."),
    prompt: str | None = typer.Option(None, "--prompt", help="Template with {text} (and {labels}, {text_pair})."),
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML config (data columns, model.label_words, ...)."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a key: --set model.max_length=128"),
    output: Path | None = typer.Option(None, "--output", "-o", help="Run directory to write (default runs/zero-shot-NAME)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run directory."),
) -> None:
    """Classify without training: an LLM scores each label's words after the prompt; writes a run directory."""
    from textclass.api import zero_shot as api_zero_shot
    from textclass.evaluation import format_report

    result = api_zero_shot(
        labels.split(","),
        data=data,
        model=model,
        prompt=prompt,
        config=config,
        overrides=list(set_),
        output=output,
        overwrite=overwrite,
    )
    if result["report"] is not None:
        typer.echo(format_report(result["report"], title=f"zero-shot ({data})"))
    typer.echo(f"run directory: {result['run_dir']}")


@app.command()
@_interruptible
def evaluate(
    model: Path = typer.Option(..., "--model", "-m", help="Run directory."),
    data: Path = typer.Option(..., "--data", "-d", help="Labelled file (same columns as training)."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Report folder (default DIR/eval/<file>)."),
    batch_size: int = typer.Option(32, min=1, help="Texts per batch."),
    threshold: float | None = typer.Option(None, min=0.0, max=1.0, help="Multi-label threshold (default: the run's)."),
    backend: str = typer.Option("auto", help="Inference backend: auto (onnx when exported), onnx or torch."),
    threads: int | None = typer.Option(None, min=1, help="Inference threads (default: all cores)."),
) -> None:
    """Per-class report, confusion matrix and badcases for a labelled file."""
    from textclass.api import evaluate as api_evaluate
    from textclass.evaluation import format_report

    report = api_evaluate(model, data, output, batch_size=batch_size, threshold=threshold, backend=backend, threads=threads)
    typer.echo(format_report(report, title=f"{data} ({report['metrics'].get('num_examples', '?')} examples)"))
    typer.echo(f"reports written to {Path(next(iter(report['files'].values()))).parent}")


@app.command()
@_interruptible
def predict(
    model: Path = typer.Option(..., "--model", "-m", help="Run directory."),
    input: Path | None = typer.Option(None, "--input", help="CSV/TSV/JSON/JSONL/Parquet file of texts."),
    output: Path | None = typer.Option(None, "--output", "-o", help="CSV or JSONL file to write."),
    interactive: bool = typer.Option(False, "-i", "--interactive", help="Type sentences, see ranked labels."),
    top_k: int | None = typer.Option(None, min=1, help="Keep the k best class scores per text."),
    threshold: float | None = typer.Option(None, min=0.0, max=1.0, help="Multi-label threshold (default: the run's)."),
    batch_size: int = typer.Option(32, min=1, help="Texts per batch."),
    backend: str = typer.Option("auto", help="Inference backend: auto (onnx when exported), onnx or torch."),
    threads: int | None = typer.Option(None, min=1, help="Inference threads (default: all cores)."),
) -> None:
    """Predict labels for a file, or interactively."""
    from textclass.inference.io import interactive_loop, predict_file
    from textclass.inference.load import load_predictor

    if interactive == (input is not None):
        raise UserError("predict: give either --input FILE (with --output FILE) or -i for interactive mode")
    if input is not None and output is None:
        raise UserError("predict: --output FILE is required with --input (a .csv or .jsonl path)")
    predictor = load_predictor(model, batch_size=batch_size, threads=threads, backend=backend)
    if interactive:
        interactive_loop(predictor, top_k=top_k or 5)
        return
    assert input is not None and output is not None
    try:
        n, unknown = predict_file(predictor, input, output, top_k=top_k, threshold=threshold)
    except KeyboardInterrupt:
        raise Interrupted(f"no output was written ({output} is unchanged)") from None
    if unknown:
        typer.echo(f"note: {input} has labels the model does not know: {', '.join(unknown[:10])}", err=True)
    typer.echo(f"wrote {n} predictions to {output}")


@app.command()
@_interruptible
def info(
    model: Path = typer.Option(..., "--model", "-m", help="Run directory."),
    backend: str = typer.Option("auto", help="Inference backend: auto (onnx when exported), onnx or torch."),
    threads: int | None = typer.Option(None, min=1, help="Inference threads (default: all cores)."),
) -> None:
    """Parameters, size on disk, labels and measured latency."""
    from textclass.inference.io import model_info

    for key, value in model_info(model, backend=backend, threads=threads).items():
        typer.echo(f"{key:>22}: {value}")


@app.command()
@_interruptible
def export(
    model: Path = typer.Option(..., "--model", "-m", help="Run directory."),
    int8: bool = typer.Option(False, "--int8", help="Also write a dynamically int8-quantised model (used by default)."),
    optimize: bool = typer.Option(False, "--optimize", help="Fuse the graph (attention, layer norm, GELU)."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Folder to write (default DIR/onnx)."),
    data: Path | None = typer.Option(None, "--data", help="Texts for the parity check (default: validation split)."),
    samples: int = typer.Option(256, min=1, help="Texts in the parity check."),
    merge: bool = typer.Option(
        False,
        "--merge",
        help="LoRA runs: write the adapters merged into full weights as a run directory (--output, default RUN-merged); no ONNX.",
    ),
) -> None:
    """Export to ONNX (dynamic batch and sequence axes) and check parity with PyTorch; or merge LoRA adapters."""
    from textclass.api import export as api_export

    if merge:
        from textclass.api import merge as api_merge

        typer.echo(f"wrote {api_merge(model, output)} (adapters merged into full weights; export it with --model)")
        return

    record = api_export(model, output=output, int8=int8, optimize=optimize, data=data, samples=samples)
    p = record["parity"]
    typer.echo(f"parity on {p['samples']} texts ({p['source']}):")
    typer.echo(f"  fp32 max |delta probability| vs PyTorch: {p['fp32_max_abs_diff']:.2e} (limit {p['fp32_tolerance']:.0e})")
    if "int8_agreement" in p:
        change = p["int8_accuracy_change"]
        typer.echo(
            f"  int8 top-1 agreement: {100 * p['int8_agreement']:.2f}%  accuracy change: "
            + ("n/a (no labels)" if change is None else f"{100 * change:+.2f} points")
        )
    if record["fused_operators"]:
        typer.echo("  fused: " + ", ".join(f"{k} {v}" for k, v in record["fused_operators"].items()))
    for variant, name in record["files"].items():
        typer.echo(f"wrote {Path(record['directory']) / name} ({variant}, {record['size_mb'][variant]} MB)")
    typer.echo(
        f"default for --backend onnx/auto: {record['default']}; "
        f"inputs {', '.join(record['inputs'])}; outputs logits, probabilities"
    )


@app.command()
@_interruptible
def prune(
    model: Path = typer.Option(..., "--model", "-m", help="Run directory to prune (encoder or llm family)."),
    output: Path = typer.Option(..., "--output", "-o", help="Run directory to write the pruned model to."),
    heads: float = typer.Option(0.0, help="Fraction of all attention heads to remove, least important first."),
    ffn: float = typer.Option(0.0, help="Fraction of all FFN neurons to remove, least important first."),
    layers: int | None = typer.Option(None, help="Keep this many layers, evenly spaced (first and last kept)."),
    vocab: str | None = typer.Option(
        None, help="Keep only the tokens of this data file's texts (`train`: the run's training data)."
    ),
    recover: int = typer.Option(0, help="Epochs of fine-tuning on the run's training data after pruning."),
    recover_from_teacher: bool = typer.Option(
        False, "--recover-from-teacher", help="The recovery also learns the unpruned run's predictions (distillation)."
    ),
    iterations: int = typer.Option(1, help="Remove heads/neurons in this many steps, rescoring importance between them."),
    seed: int | None = typer.Option(None, help="Seed of the recovery fine-tune (default: the run's training.seed)."),
    samples: int = typer.Option(256, help="Training texts the importance of heads and neurons is measured on."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run directory at --output."),
) -> None:
    """Make a trained model smaller: remove heads, FFN neurons, layers and unused vocabulary (docs/prune.md)."""
    from textclass.api import prune as api_prune

    record = api_prune(
        model,
        output,
        heads=heads,
        ffn=ffn,
        layers=layers,
        vocab=vocab,
        recover=recover,
        iterations=iterations,
        overwrite=overwrite,
        samples=samples,
        recover_from_teacher=recover_from_teacher,
        seed=seed,
    )
    b, a = record["before"], record["after"]
    typer.echo("removed: " + (", ".join(f"{k} {v}" for k, v in record["removed"].items()) or "nothing"))
    typer.echo(f"parameters: {b['parameters']:,} -> {a['parameters']:,}")
    typer.echo(f"latency batch 1: {b['latency_ms_batch_1']:.1f} ms -> {a['latency_ms_batch_1']:.1f} ms")
    typer.echo(f"latency batch 32: {b['latency_ms_batch_32']:.1f} ms -> {a['latency_ms_batch_32']:.1f} ms")
    for split in ("valid", "test"):
        old, new = b["metrics"].get(split, {}).get("accuracy"), a["metrics"].get(split, {}).get("accuracy")
        if new is not None:
            typer.echo(f"{split} accuracy: " + (f"{old:.4f} -> " if old is not None else "") + f"{new:.4f}")
    typer.echo(f"run directory: {record['run_dir']}")


@app.command()
def serve(
    model: Path = typer.Option(..., "--model", "-m", help="Run directory."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (loopback unless told otherwise)."),
    port: int = typer.Option(8000, min=0, max=65535, help="Port (0: any free port)."),
    backend: str = typer.Option("auto", help="Inference backend: auto, onnx or torch."),
    api_key: str | None = typer.Option(
        None, envvar="TEXTCLASS_API_KEY", show_envvar=True, help="Require this key (X-API-Key header or Bearer token)."
    ),
    max_batch_size: int = typer.Option(32, min=1, help="Texts gathered from concurrent requests into one model call."),
    forward_batch_size: int = typer.Option(
        8, min=1, help="Texts per forward pass: a model call is sorted by length and run in slices of this size."
    ),
    max_wait_ms: float = typer.Option(5.0, min=0.0, help="How long a batch waits to fill (ms)."),
    max_texts: int = typer.Option(64, min=1, help="Texts per request."),
    max_chars: int = typer.Option(10_000, min=1, help="Characters per text."),
    max_body_bytes: int = typer.Option(1_000_000, min=1, help="Request body size in bytes."),
    max_queue_texts: int | None = typer.Option(
        None, min=1, help="Texts waiting for the model; beyond, 429 with Retry-After (default: max(4 x batch, 2 x texts))."
    ),
    read_timeout: float = typer.Option(30.0, min=0.001, help="Seconds for a request's head, and for its body (408)."),
    keep_alive_timeout: float = typer.Option(5.0, min=0.001, help="Seconds an idle keep-alive connection stays open."),
    threads: int | None = typer.Option(None, min=1, help="Intra-op threads of the model (default: all usable cores)."),
    graceful_timeout: float = typer.Option(
        30.0, min=0.0, help="Seconds queued requests get after SIGTERM; what still waits then gets 503."
    ),
    access_log: bool = typer.Option(False, help="Log every request."),
) -> None:
    """Serve a model over HTTP: /v1/classify, Hugging Face-style POST / and /predict, /info, /docs, /metrics, a web page."""
    from textclass.inference.load import BACKENDS
    from textclass.serve import ServeSettings
    from textclass.serve import serve as run_server

    if backend not in BACKENDS:  # checked before the port is bound
        raise UserError(f"--backend {backend}: unknown backend; use one of {', '.join(BACKENDS)}")
    settings = ServeSettings(
        max_batch_size,
        max_wait_ms,
        max_texts,
        max_chars,
        max_body_bytes,
        api_key or None,
        max_queue_texts=max_queue_texts,
        read_timeout=read_timeout,
        keep_alive_timeout=keep_alive_timeout,
    )
    run_server(model, host, port, backend, settings, threads, forward_batch_size, graceful_timeout, access_log)


@data_app.command("list")
def data_list() -> None:
    """List the built-in offline data sets."""
    from textclass.data.builtin import list_builtin

    for b in list_builtin():
        typer.echo(f"{b.name:<16} {b.language}  {len(b.labels)} labels  {b.description}")


@data_app.command("export")
def data_export(name: str = typer.Argument(...), directory: Path = typer.Argument(...)) -> None:
    """Write a built-in data set's train/valid/test CSVs into DIRECTORY."""
    from textclass.data.builtin import export_builtin

    for p in export_builtin(name, directory):
        typer.echo(str(p))


def _without_option(argv: list[str], name: str) -> list[str]:
    """`argv` without `name VALUE` / `name=VALUE`."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(f"{name}="):
            out.append(arg)
    return out


def _usage_error_line(err: TyperException) -> str:
    """typer's usage error as one line that names the command and where its help is."""
    ctx = getattr(err, "ctx", None)
    command = ctx.command_path if ctx is not None else "textclass"
    return f"error: {' '.join(err.format_message().split())} (see `{command} --help`)"


def main() -> None:
    """Entry point: a user's mistake is one line on stderr and exit code 2, Ctrl-C one line and exit 130."""
    _setup_logging()
    try:
        code = app(standalone_mode=False)
    except UserError as err:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank stops with rank 0's error: one line
            typer.echo(f"error: {err}", err=True)
        sys.exit(EXIT_USER_ERROR)
    except TyperException as err:  # usage errors: unknown option or command, bad or missing value
        typer.echo(_usage_error_line(err), err=True)
        sys.exit(EXIT_USER_ERROR)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    if isinstance(code, int) and code:  # typer.Exit(code), e.g. from `_interruptible`
        sys.exit(code)


if __name__ == "__main__":
    main()
