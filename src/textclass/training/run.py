"""One training run, from config to a finished run directory.

Order matters for the user: everything a user can get wrong (data files, columns, labels, model name) is
checked before the run directory is touched, and the files that mark a run as finished (`config.yaml`,
`labels.json`) are written last, so an interrupted run is never mistaken for a usable model.
"""

from __future__ import annotations

import gc
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from textclass.config import Config, save_config
from textclass.data.frames import text_columns
from textclass.data.prepare import PreparedData, prepare_data
from textclass.errors import Interrupted, UserError
from textclass.evaluation import plot_training_curves, write_split_report
from textclass.models.base import TextModel
from textclass.models.registry import Family, get_family
from textclass.rundir import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    EVAL_DIR,
    TRAINING_CURVES_FILE,
    load_model_parts,
    write_parity_sample,
    write_run,
)
from textclass.training import distributed, zero
from textclass.training.losses import make_loss
from textclass.training.noisytune import apply_noisytune
from textclass.training.resume import check_resume_config, last_complete_checkpoint, pending_config
from textclass.training.trainer import ExtraTargets, build_trainer, check_trackers, resolve_precision, tokenize

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger("textclass")
MULTI_LABEL_METRICS = {"hamming_loss", "subset_accuracy"}


@dataclass
class TrainResult:
    """Where the run went and what it scored."""

    run_dir: Path
    metrics: dict[str, Any]
    reports: dict[str, dict[str, Any]]  # "valid"/"test" -> write_report's result (metrics, per-class, files)
    probabilities: dict[str, np.ndarray] = field(default_factory=dict)  # the reports' probabilities, rows as in the split


def default_run_dir(cfg: Config) -> Path:
    source = cfg.data.dataset if not cfg.data.train else Path(cfg.data.train).stem
    return Path("runs") / f"{source}-{cfg.model.family}".replace("/", "_")


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> bool:
    """Create, reuse (resume) or clear (overwrite) the run directory, refusing to clobber by accident.

    Returns whether this call created the folder (an interrupted run may then remove it again).
    """
    if resume and not run_dir.is_file():
        if last_complete_checkpoint(run_dir, quiet=True) is None:
            raise UserError(f"{run_dir}: --resume but no complete checkpoint there; train again without --resume")
        return False
    finished, unfinished = (run_dir / CONFIG_FILE).exists(), pending_config(run_dir).exists()
    held = "a finished run" if finished else "checkpoints of an unfinished run" if unfinished else None
    created = prepare_output(run_dir, "run directory", held, overwrite, "" if finished else ", or --resume")
    (run_dir / CHECKPOINTS_DIR).mkdir(exist_ok=True)
    return created


def prepare_output(folder: Path, what: str, held: str | None, overwrite: bool, also: str = "") -> bool:
    """Create the output folder of a command, or clear it (`overwrite`) when it holds that command's own earlier
    output (`held` says what; None: something else, which is never touched). `what` names the folder in
    messages, `also` adds to the fix of an occupied one (", or --resume"). Returns whether the folder is new.
    """
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder}: is a file, not a folder; choose another --output for the {what}")
    existed = folder.exists()
    if existed and any(folder.iterdir()):
        if held is None:
            raise UserError(f"{folder}: not empty and not a textclass {what}; choose another --output (nothing was changed)")
        if not overwrite:
            raise UserError(f"{folder}: already holds {held}; pass --overwrite or another --output{also}")
        shutil.rmtree(folder)
        existed = False
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{folder}: cannot create the {what} ({err.strerror}); choose another --output") from None
    return not existed


def run_training(cfg: Config, resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Train, keep the best or last weights, evaluate valid/test on them as saved, and write the run directory.

    One model; a k-fold config (`training.kfold`) trains through `training.kfold.run_kfold_training`.
    """
    if cfg.training.kfold:
        raise ValueError("training.kfold is set: train through textclass.training.kfold.run_kfold_training (or textclass.train)")
    with distributed.session():
        family, run_dir, changes, data = start_run(cfg, resume)
        model, loss_fn = build_model(cfg, family, data, vocabulary_texts(data.train))
        return train_run(model, loss_fn, data, run_dir, resume, overwrite, changes)


def start_run(cfg: Config, resume: bool) -> tuple[Family, Path, dict[str, list[Any]], PreparedData]:
    """What every run does before a model exists: the family's defaults filled in, the run directory chosen,
    a resumed run's config checked, the data read and checked. Returns (family, run directory, the config
    changes a resume is allowed, data); nothing is written yet."""
    if cfg.training.num_threads:
        torch.set_num_threads(cfg.training.num_threads)
    family = get_family(cfg.model.family)
    check_trackers(cfg.training.report_to)
    resolve_defaults(cfg, family)
    run_dir = Path(cfg.training.output_dir) if cfg.training.output_dir else default_run_dir(cfg)
    cfg.training.output_dir = str(run_dir)
    changes = check_resume_config(run_dir, cfg) if resume else {}
    data = distributed.on_main(prepare_data, cfg.data)  # read and split once; every rank gets rank 0's frames
    _log_data(data)
    check_metric_fits_task(cfg, data.labels.multi_label)
    return family, run_dir, changes, data


def vocabulary_texts(df: pd.DataFrame) -> list[str]:
    """The texts a small model fits its vocabulary on: on a pair task the second texts' words count too."""
    texts, pairs = text_columns(df)
    return texts + (pairs or [])


def build_model(cfg: Config, family: Family, data: PreparedData, vocabulary: list[str]) -> tuple[TextModel, nn.Module]:
    """A fresh, seeded model to train on `data.train`, and its loss (class weights from `data.train`'s labels).

    `vocabulary`: the texts a small model's tokenizer is fitted on (pretrained tokenizers ignore them).
    """
    from transformers import set_seed

    set_seed(cfg.training.seed)
    model = family.create(cfg, data.labels, vocabulary)
    if getattr(cfg.model, "noisytune", 0.0):
        n = apply_noisytune(model.network, cfg.model.noisytune, cfg.training.seed)  # type: ignore[union-attr]
        log.info("NoisyTune: perturbed %d pretrained tensors (lambda %.3g)", n, cfg.model.noisytune)  # type: ignore[union-attr]
    return model, build_loss(cfg, data)


def build_loss(cfg: Config, data: PreparedData) -> nn.Module:
    """The training loss of `training.loss` & co., class weights counted on `data.train`'s labels."""
    t = cfg.training
    return make_loss(
        data.labels.multi_label,
        data.labels.num_labels,
        t.class_weights,
        data.labels.encode_all(data.train["labels"]),
        kind=t.loss,
        label_smoothing=t.label_smoothing,
        focal_gamma=t.focal_gamma,
        poly_epsilon=t.poly_epsilon,
    )


def train_run(
    model: TextModel,
    loss_fn: nn.Module,
    data: PreparedData,
    run_dir: Path,
    resume: bool = False,
    overwrite: bool = False,
    changes: dict[str, list[Any]] | None = None,
    extra: ExtraTargets | None = None,
    record: dict[str, Any] | None = None,
) -> TrainResult:
    """Train `model` on `data.train` (validating on `data.valid`) into `run_dir` and write it as a finished run.

    `changes`: the config changes a resumed run was allowed (recorded in its metrics). `extra`: targets
    besides the labels, one row per `data.train` row (distillation); `record`: more entries for metrics.json. The trained network
    is released once saved (`model.network` is then empty); the returned reports come from the saved weights.
    Ctrl-C raises `Interrupted` saying what was kept.
    """
    cfg = model.cfg
    # What this machine or engine cannot train is refused before the run directory is touched.
    distributed.check_sparse_gradients(model.network, distributed.backend())
    resolve_precision(cfg.training.precision, model.family.cpu_autocast, bool(cfg.training.deepspeed))
    ds_config = None
    if cfg.training.deepspeed:
        zero.check_supported(model.network)
        ds_config = zero.deepspeed_config(cfg.training.deepspeed, model.network)
    created = distributed.on_main(_open_run_dir, run_dir, resume, overwrite, cfg)
    try:
        with distributed.main_process_first():  # rank 0 writes the tokenization cache, the others read it
            train_ds, valid_ds = tokenize(model, data.train), tokenize(model, data.valid)
        trainer = build_trainer(model, train_ds, valid_ds, run_dir / CHECKPOINTS_DIR, loss_fn, extra, deepspeed=ds_config)
        # Chosen by rank 0 (which removes half-written checkpoints), so every rank resumes from the same one.
        checkpoint = distributed.on_main(last_complete_checkpoint, run_dir) if resume else None
        trainer.train(resume_from_checkpoint=checkpoint)
        _log_kept(trainer, cfg)
        assert trainer.model is not None  # build_trainer gave it the model object's network
        network = zero.full_network(trainer)  # under ZeRO-3 every rank takes part in gathering the weights
        zero.release()
        if not distributed.is_main_process():  # every rank holds the same weights; rank 0 writes the run
            model.network = nn.Module()
            return TrainResult(run_dir, {"train": _train_summary(trainer)}, {})
        model.network = network  # the kept weights (the Trainer loads the best checkpoint's into its model)
        model.save_weights(run_dir)
        write_parity_sample(run_dir, data.valid, seed=cfg.data.seed)
        metrics: dict[str, Any] = {"train": _train_summary(trainer) | ({"resumed_with_changes": changes} if changes else {})}
        metrics.update(record or {})
        history = trainer.state.log_history
        # The training model, its gradients and optimizer state go before the saved weights are read back:
        # otherwise both copies are in memory at once (for an LLM fine-tuned in full, gigabytes). The model
        # object gives up its network too, as the caller may still hold the object.
        model.network = nn.Module()
        del trainer, model
        gc.collect()
        # Reports come from the weights exactly as saved and loaded back, in fp32 without autocast: what
        # `evaluate`, `predict` and `serve` will compute, not the training-time (possibly bf16) forward.
        saved = load_model_parts(run_dir, cfg, data.labels)
        reports, probs = split_reports(run_dir, data, saved)
        metrics.update({split: r["metrics"] for split, r in reports.items()})
        plot_training_curves(history, run_dir / TRAINING_CURVES_FILE)
        if not cfg.training.keep_checkpoints:
            shutil.rmtree(run_dir / CHECKPOINTS_DIR, ignore_errors=True)
        write_run(run_dir, saved, metrics, history, {"sources": data.sources, **data.audit})
    except KeyboardInterrupt:
        raise Interrupted(_interrupted_message(run_dir, created)) from None
    return TrainResult(run_dir, metrics, reports, probs)


def _open_run_dir(run_dir: Path, resume: bool, overwrite: bool, cfg: Config) -> bool:
    """`prepare_run_dir`, then the config the run starts with (what `--resume` checks against)."""
    created = prepare_run_dir(run_dir, resume, overwrite)
    save_config(cfg, pending_config(run_dir))
    return created


def resolve_defaults(cfg: Config, family: Any) -> None:
    """Fill the family's defaults in once, so the saved config shows the values used."""
    t = cfg.training
    if t.learning_rate is None:
        t.learning_rate = family.default_learning_rate(cfg.model)
    if t.batch_size is None:
        t.batch_size = family.default_batch_size(cfg.model)
    if t.final_model is None:
        t.final_model = "best" if t.early_stopping_patience else family.default_final_model(cfg.model)


def check_metric_fits_task(cfg: Config, multi_label: bool) -> None:
    """A multi-label-only `best_metric` on a single-label run fails here, not at the first evaluation."""
    if not multi_label and cfg.training.best_metric in MULTI_LABEL_METRICS:
        raise UserError(
            f"training.best_metric: {cfg.training.best_metric} is a multi-label metric and this run is single-label; "
            "use accuracy, macro_f1, micro_f1, weighted_f1 or loss"
        )


def split_reports(run_dir: Path, data: PreparedData, model: TextModel) -> tuple[dict[str, dict[str, Any]], dict[str, np.ndarray]]:
    """Valid (after threshold tuning, which it drives) and test reports of the saved model, and its probabilities."""
    cfg, labels, batch_size = model.cfg, model.labels, model.cfg.training.eval_batch_size
    valid_probs = model.predict_proba(*text_columns(data.valid), batch_size=batch_size)
    if labels.multi_label and cfg.evaluation.tune_threshold:
        from textclass.evaluation import tune_threshold

        cfg.evaluation.threshold, f1 = tune_threshold(labels.encode_all(data.valid["labels"]), valid_probs)
        log.info("tuned multi-label threshold on valid: %.2f (micro-F1 %.4f)", cfg.evaluation.threshold, f1)
    splits = {"valid": (data.valid, valid_probs)}
    if data.test is not None:
        splits["test"] = (data.test, model.predict_proba(*text_columns(data.test), batch_size=batch_size, progress=True))
    reports = {
        name: write_split_report(run_dir / EVAL_DIR / name, df, probs, labels, cfg.evaluation.threshold, cfg.evaluation.badcases)
        for name, (df, probs) in splits.items()
    }
    return reports, {name: probs for name, (_, probs) in splits.items()}


def _interrupted_message(run_dir: Path, created: bool) -> str:
    """What an interrupted run kept; a run directory this run made and never checkpointed is removed."""
    if last_complete_checkpoint(run_dir, quiet=True) is not None:
        return f"checkpoints kept in {run_dir / 'checkpoints'}; continue with `textclass train --output {run_dir} --resume`"
    if created and distributed.is_main_process():
        shutil.rmtree(run_dir, ignore_errors=True)
        return f"stopped before the first checkpoint; nothing was kept ({run_dir} removed)"
    return f"stopped before the first checkpoint; {run_dir} is as it was"


def _kept_step(trainer: Any) -> int:
    """The step whose weights the run keeps: the best checkpoint's when the Trainer loaded it, else the last."""
    best = trainer.state.best_model_checkpoint
    if trainer.args.load_best_model_at_end and best:
        return int(Path(best).name.split("-")[-1])
    return trainer.state.global_step


def _log_kept(trainer: Any, cfg: Config) -> None:
    state = trainer.state
    best = ""
    if state.best_metric is not None and state.best_global_step:
        best = f" (best valid {cfg.training.best_metric} {state.best_metric:.4f} at step {state.best_global_step})"
    log.info("final_model=%s: keeping step %d of %d%s", cfg.training.final_model, _kept_step(trainer), state.global_step, best)


def _train_summary(trainer: Any) -> dict[str, Any]:
    state = trainer.state
    last: dict[str, Any] = next((h for h in reversed(state.log_history) if "train_runtime" in h), {})
    return {
        "global_step": state.global_step,
        "epochs": state.epoch,
        "final_model": "best" if trainer.args.load_best_model_at_end else "last",
        "kept_step": _kept_step(trainer),
        "best_checkpoint": state.best_model_checkpoint,
        "best_metric": state.best_metric,
        "train_runtime_s": last.get("train_runtime"),
        "train_samples_per_second": last.get("train_samples_per_second"),
        "precision": "bf16" if trainer.args.bf16 else "fp16" if trainer.args.fp16 else "fp32",
        "processes": trainer.args.world_size,
        "zero_stage": zero.zero_stage(trainer.accelerator.deepspeed_config) if trainer.is_deepspeed_enabled else None,
    }


def _log_data(data: PreparedData) -> None:
    a = data.audit
    log.info(
        "data: %s | labels (%s): %s",
        ", ".join(f"{k} {v}" for k, v in a["sizes"].items()),
        "multi-label" if data.labels.multi_label else "single-label",
        ", ".join(data.labels.names[:20]),
    )
    dups = {**{f"within {k}": v for k, v in a["within"].items()}, **a["across"]}
    if any(dups.values()):
        log.warning(
            "leak audit: duplicate texts %s%s",
            ", ".join(f"{k}: {v}" for k, v in dups.items() if v),
            "" if a["dedup"] else " (set data.dedup=true to drop them)",
        )
