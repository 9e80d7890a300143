"""`textclass prune`: a trained run directory in, a smaller run directory out (docs/prune.md).

Order: drop layers (evenly spaced, first and last kept), then remove heads and FFN neurons by importance
(`compress.importance`, in `iterations` equal steps, rescored between steps), optionally a short recovery
fine-tune, then the vocabulary. The result is re-evaluated on the run's valid/test data from the weights as
saved and loaded back, and `prune.json` records what was removed with parameters, size and latency
before and after. Everything a user can get wrong is checked before anything is written, and
`labels.json` / `config.yaml` come last (`rundir.write_run`), so an interrupted prune leaves no loadable half-run.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from textclass.compress.importance import choose, head_groups, importance
from textclass.compress.vocab import check_tokenizer, prune_vocabulary
from textclass.data.frames import text_columns
from textclass.data.prepare import PreparedData, prepare_data, read_eval_data
from textclass.errors import UserError
from textclass.fileio import write_json
from textclass.inference.io import dir_size, latency_ms
from textclass.models import surgery
from textclass.models.base import TextModel
from textclass.rundir import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    PRUNE_FILE,
    check_run_dir,
    load_model,
    load_model_parts,
    read_metrics,
    read_run_config,
    write_parity_sample,
    write_run,
)
from textclass.training import distributed
from textclass.training.resume import pending_config
from textclass.training.run import build_loss, prepare_run_dir, split_reports, train_run

log = logging.getLogger("textclass")
TRAIN = "train"  # --vocab train: the run's own training texts


@dataclass
class PruneOptions:
    """What to remove. `heads`/`ffn`: fractions of all heads / FFN neurons; `layers`: how many layers to keep;
    `vocab`: a data file whose texts the vocabulary must cover (None: keep it); `recover`: fine-tuning epochs
    after pruning; `iterations`: heads/FFN removed in this many equal steps, rescored in between;
    `samples`: training texts the importance is measured on; `recover_from_teacher`: the recovery also
    distils the unpruned run's predictions (docs/distill.md); `seed`: the recovery's seed (default: the run's)."""

    heads: float = 0.0
    ffn: float = 0.0
    layers: int | None = None
    vocab: str | Path | None = None
    recover: int = 0
    iterations: int = 1
    samples: int = 256
    recover_from_teacher: bool = False
    seed: int | None = None

    def check(self) -> None:
        """The options alone (before any model is read): one line naming the option and the fix."""
        for name, value in (("heads", self.heads), ("ffn", self.ffn)):
            if not 0.0 <= value < 1.0:
                raise UserError(f"--{name} {value}: a fraction to remove, in [0, 1) (e.g. 0.5 removes half)")
        if self.layers is not None and self.layers < 1:
            raise UserError(f"--layers {self.layers}: the number of layers to keep, at least 1")
        if self.recover_from_teacher and not self.recover:
            raise UserError("--recover-from-teacher: give the recovery's length too, e.g. --recover 1")
        if self.iterations < 1 or self.recover < 0 or self.samples < 1:
            raise UserError("--iterations and --samples must be at least 1 and --recover at least 0")
        if not (self.heads or self.ffn or self.layers is not None or self.vocab is not None):
            raise UserError("prune: nothing to do; give --heads F, --ffn F, --layers N and/or --vocab FILE")
        if self.vocab is not None and os.fspath(self.vocab) != TRAIN and not Path(self.vocab).is_file():
            raise UserError(
                f"--vocab {self.vocab}: no such file; give a data file of the texts the vocabulary must cover "
                f"(or `{TRAIN}`: the run's training data)"
            )


def check_output(source: Path, output: Path, overwrite: bool) -> None:
    """Refuse an output that would clobber the source run, a non-run folder, or a run without --overwrite."""
    src, out = source.resolve(), output.resolve()
    if out == src or src.is_relative_to(out) or out.is_relative_to(src):
        raise UserError(f"--output {output}: is, holds or lies inside the source run {source}; choose another folder")
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output}: is a file; choose a folder for the pruned run")
    if output.is_dir() and any(output.iterdir()):
        if not (output / CONFIG_FILE).exists() and not pending_config(output).exists():
            raise UserError(
                f"--output {output}: not empty and not a textclass run; choose another --output (nothing was changed)"
            )
        if not overwrite:
            raise UserError(f"--output {output}: already holds a run; pass --overwrite or another --output")


def _measure(model: TextModel, folder: Path) -> dict[str, Any]:
    model.network.eval()
    ms1, ms32 = latency_ms(lambda texts: model.predict_proba(texts))
    return {
        "parameters": model.parameter_counts()[0],
        "size_mb": round(dir_size(folder, onnx=False) / 1e6, 3),
        "latency_ms_batch_1": round(ms1, 2),
        "latency_ms_batch_32": round(ms32, 2),
    }


def _batches(model: TextModel, data: PreparedData, samples: int) -> list[dict[str, torch.Tensor]]:
    """Labelled batches of up to `samples` training texts (a seeded sample) for importance scores."""
    df = data.train
    rows = np.sort(np.random.default_rng(model.cfg.data.seed).permutation(len(df))[:samples])
    df = df.iloc[rows].reset_index(drop=True)
    texts, pairs = text_columns(df)
    features = model.features(texts, pairs)
    for f, y in zip(features, data.labels.encode_all(df["labels"]), strict=True):
        f["labels"] = y
    size = model.cfg.training.eval_batch_size
    return [model.collate(features[i : i + size]) for i in range(0, len(features), size)]


def prune_heads_and_ffn(
    model: TextModel, batches: list[dict[str, torch.Tensor]], heads: float, ffn: float, iterations: int
) -> dict[str, int]:
    """Remove fractions `heads` and `ffn` of all heads / FFN neurons by importance, in `iterations` steps.

    Step s removes what is left to reach s/iterations of each target, after scoring the model as it is then.
    Returns the numbers removed.
    """
    blocks = surgery.transformer_layers(model.network)
    total_h = sum(surgery.num_heads(b) for b in blocks)
    total_f = sum(surgery.ffn_width(b) for b in blocks)
    for step in range(1, iterations + 1):
        scores = importance(model, batches)
        blocks = surgery.transformer_layers(model.network)
        now_h = sum(surgery.num_heads(b) for b in blocks)
        now_f = sum(surgery.ffn_width(b) for b in blocks)
        keep_h = choose(scores.heads, head_groups(model), round(total_h * heads * step / iterations) - (total_h - now_h))
        keep_f = choose(scores.ffn, [1] * len(blocks), round(total_f * ffn * step / iterations) - (total_f - now_f))
        for block, kh, kf in zip(blocks, keep_h, keep_f, strict=True):
            if len(kh) < surgery.num_heads(block):
                surgery.slice_heads(block, kh)
            if len(kf) < surgery.ffn_width(block):
                surgery.slice_ffn(block, kf)
    blocks = surgery.transformer_layers(model.network)
    return {
        "heads": total_h - sum(surgery.num_heads(b) for b in blocks),
        "ffn_neurons": total_f - sum(surgery.ffn_width(b) for b in blocks),
    }


def recover(
    model: TextModel, data: PreparedData, epochs: int, workdir: Path, teacher: Path | None = None, seed: int | None = None
) -> TextModel:
    """The recovery fine-tune: `epochs` of the run's own training on its data, through the training path;
    with a `teacher` (the unpruned run) distilled from it as well (`compress.distill`, default alpha and T).

    Trains into `workdir` (an ordinary run directory) and returns the kept weights as saved and loaded back,
    with the model's config.
    """
    cfg = model.cfg.model_copy(deep=True)
    cfg.training.epochs = epochs
    if seed is not None:
        cfg.training.seed = seed
    cfg.training.max_steps = -1  # epochs, not the run's step count
    cfg.training.output_dir = str(workdir)
    original, model.cfg = model.cfg, cfg
    loss, extra = build_loss(cfg, data), None
    if teacher is not None:
        from textclass.compress.distill import distillation_from

        loss, extra = distillation_from(teacher, data, loss, cfg.training.eval_batch_size)
    train_run(model, loss, data, workdir, overwrite=True, extra=extra)
    trained = load_model_parts(workdir, cfg, data.labels)
    trained.cfg = original
    return trained


def prune_run(model_dir: str | Path, output: str | Path, options: PruneOptions, overwrite: bool = False) -> dict[str, Any]:
    """Prune a run directory into `output`; returns the prune record (also `output/prune.json`) with metrics."""
    if distributed.launched():  # one process writes the pruned run; its short recovery needs no DDP
        raise UserError("prune: runs in one process; start `textclass prune` without torchrun")
    source, out = check_run_dir(model_dir), Path(output)
    options.check()
    check_output(source, out, overwrite)
    cfg = read_run_config(source)
    if cfg.training.kfold:
        raise UserError(f"{source}: a k-fold run is {cfg.training.kfold} models; prune one fold (folds/fold-N) instead")
    model = load_model(source)
    layers = len(surgery.transformer_layers(model.network))  # refuses networks without a transformer
    if options.layers is not None and options.layers > layers:
        raise UserError(f"--layers {options.layers}: the model has {layers} layers; keep between 1 and {layers}")
    if model.parameter_counts()[1] == 0:
        raise UserError(f"{source}: a run without trained weights (zero-shot) cannot be pruned")
    data = prepare_data(cfg.data)
    if data.labels.names != model.labels.names or data.labels.multi_label != model.labels.multi_label:
        raise UserError(
            f"{source}: its training data ({data.sources.get('train')}) now has other labels than the run was "
            f"trained on ({', '.join(model.labels.names[:10])}); restore the data the run was trained on"
        )
    vocab_texts = _vocab_texts(options, cfg, data)
    if vocab_texts is not None:
        check_tokenizer(model)  # a tokenizer whose vocabulary cannot be pruned fails before anything is written
    before = _measure(model, source)
    model.prepare_surgery()
    removed: dict[str, Any] = {}
    if options.layers is not None and options.layers < layers:
        kept = surgery.evenly_spaced(layers, options.layers)
        surgery.keep_layers(model, kept)
        removed["layers"] = layers - len(kept)
        removed["kept_layers"] = kept
    if options.heads or options.ffn:
        removed |= prune_heads_and_ffn(
            model, _batches(model, data, options.samples), options.heads, options.ffn, options.iterations
        )
    created = prepare_run_dir(out, resume=False, overwrite=overwrite)  # every check passed: now the output is written
    try:
        return _write_pruned(model, source, out, options, data, vocab_texts, removed, before)
    except BaseException:
        if created:  # nothing half-made stays behind (a run --overwrite replaced was already cleared)
            shutil.rmtree(out, ignore_errors=True)
        raise


def _write_pruned(
    model: TextModel,
    source: Path,
    out: Path,
    options: PruneOptions,
    data: PreparedData,
    vocab_texts: tuple[list[str], list[str] | None] | None,
    removed: dict[str, Any],
    before: dict[str, Any],
) -> dict[str, Any]:
    """The steps that write into `out`: recovery, vocabulary, weights, reports, then the run's files."""
    cfg = model.cfg
    cfg.training.output_dir = str(out)  # the pruned run's own folder (a --config of it must never name the source)
    if options.recover:
        teacher = source if options.recover_from_teacher else None
        model = recover(model, data, options.recover, out / CHECKPOINTS_DIR / "recover", teacher, options.seed)
    if vocab_texts is not None:
        sizes = prune_vocabulary(model, *vocab_texts)
        removed["vocabulary"] = sizes["before"] - sizes["after"]
    model.save_weights(out)
    shutil.rmtree(out / CHECKPOINTS_DIR, ignore_errors=True)
    saved = load_model_parts(out, model.cfg, model.labels)
    write_parity_sample(out, data.valid, seed=cfg.data.seed)
    reports, _ = split_reports(out, data, saved)
    after = _measure(saved, out)
    record = {
        "source": str(source),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()},
        "removed": removed,
        "before": before | {"metrics": {k: v for k, v in read_metrics(source).items() if k in ("valid", "test")}},
        "after": after | {"metrics": {split: r["metrics"] for split, r in reports.items()}},
    }
    write_json(out / PRUNE_FILE, record)
    metrics = {split: r["metrics"] for split, r in reports.items()} | {"pruned_from": str(source)}
    write_run(out, saved, metrics, None, {"sources": data.sources, **data.audit})
    return record | {"run_dir": str(out)}


def _vocab_texts(options: PruneOptions, cfg: Any, data: PreparedData) -> tuple[list[str], list[str] | None] | None:
    """The texts the pruned vocabulary must encode as before: `--vocab FILE`'s, or the training data's."""
    if options.vocab is None:
        return None
    if os.fspath(options.vocab) == TRAIN:
        return text_columns(data.train)
    df, _ = read_eval_data(str(options.vocab), cfg.data, data.labels, require_labels=False)
    return text_columns(df)
