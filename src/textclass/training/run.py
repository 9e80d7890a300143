"""One training run, from config to a finished run directory.

Order matters for the user: everything a user can get wrong (data files, columns, labels, model name) is
checked before the run directory is touched, and the files that mark a run as finished (`config.yaml`,
`labels.json`) are written last, so an interrupted run is never mistaken for a usable model.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from textclass.config import Config, save_config
from textclass.data.prepare import PreparedData, prepare_data
from textclass.errors import UserError
from textclass.inference.predictor import Predictor, probabilities
from textclass.models.registry import get_family
from textclass.fileio import write_json
from textclass.rundir import CONFIG_FILE, LABELS_FILE, METRICS_FILE
from textclass.training.losses import make_loss
from textclass.training.trainer import build_trainer, tokenize

log = logging.getLogger("textclass")
PENDING_CONFIG = "textclass_config.yaml"  # inside checkpoints/, so --resume can find the run's config


@dataclass
class TrainResult:
    """Where the run went and what it scored."""

    run_dir: Path
    metrics: dict[str, Any]
    reports: dict[str, dict[str, Any]]  # "valid"/"test" -> write_report's result (metrics, per-class, files)


def default_run_dir(cfg: Config) -> Path:
    source = cfg.data.dataset if not cfg.data.train else Path(cfg.data.train).stem
    return Path("runs") / f"{source}-{cfg.model.family}".replace("/", "_")


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Create, reuse (resume) or clear (overwrite) the run directory, refusing to clobber by accident."""
    ckpt = run_dir / "checkpoints"
    looks_like_run = (run_dir / CONFIG_FILE).exists() or ckpt.exists()
    if resume:
        if not any(ckpt.glob("checkpoint-*")):
            raise UserError(f"{run_dir}: --resume but no checkpoint there; train without --resume first")
        return
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            what = "a finished run" if (run_dir / CONFIG_FILE).exists() else "checkpoints of an unfinished run"
            hint = "--overwrite or another --output" + ("" if what.startswith("a fin") else ", or --resume")
            raise UserError(f"{run_dir}: already holds {what}; pass {hint}")
        if not looks_like_run:
            raise UserError(f"{run_dir}: not empty and not a textclass run; refusing to overwrite it")
        shutil.rmtree(run_dir)
    try:
        ckpt.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{run_dir}: cannot create the run directory ({err.strerror})") from None


def pending_config(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / PENDING_CONFIG


def run_training(cfg: Config, resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Train, pick the best checkpoint, evaluate valid/test, and write the run directory."""
    from transformers import set_seed

    if cfg.training.num_threads:
        torch.set_num_threads(cfg.training.num_threads)
    data = prepare_data(cfg.data)
    _log_data(data)
    family = get_family(cfg.model.family)
    if cfg.training.learning_rate is None:  # resolved here, once, so the saved config shows the rate used
        cfg.training.learning_rate = family.default_learning_rate(cfg.model)
    if cfg.training.batch_size is None:
        cfg.training.batch_size = family.default_batch_size(cfg.model)
    if cfg.training.final_model is None:
        cfg.training.final_model = "best" if cfg.training.early_stopping_patience else family.default_final_model(cfg.model)
    tokenizer = family.build_tokenizer(cfg.model, data.train["text"].tolist())
    set_seed(cfg.training.seed)
    model = family.build_model(
        cfg.model, data.labels.num_labels, tokenizer, data.labels.id2label, multi_label=data.labels.multi_label
    )
    train_labels = np.asarray([data.labels.encode(ls) for ls in data.train["labels"]])
    loss_fn = make_loss(data.labels.multi_label, data.labels.num_labels, cfg.training.class_weights, train_labels)

    run_dir = Path(cfg.training.output_dir) if cfg.training.output_dir else default_run_dir(cfg)
    cfg.training.output_dir = str(run_dir)
    prepare_run_dir(run_dir, resume, overwrite)
    save_config(cfg, pending_config(run_dir))

    key = str(getattr(tokenizer, "name_or_path", ""))
    train_ds = tokenize(family, tokenizer, cfg, data.train, data.labels, key)
    valid_ds = tokenize(family, tokenizer, cfg, data.valid, data.labels, key)
    trainer = build_trainer(cfg, family, model, tokenizer, data.labels, train_ds, valid_ds, run_dir / "checkpoints", loss_fn)
    trainer.train(resume_from_checkpoint=True if resume else None)
    model = trainer.model
    _log_kept(trainer, cfg)

    predictor = Predictor(model, tokenizer, family, cfg, data.labels, batch_size=cfg.training.eval_batch_size)
    metrics: dict[str, Any] = {"train": _train_summary(trainer)}
    reports: dict[str, dict[str, Any]] = {}
    valid_probs = _kept_valid_probs(trainer, data.labels.multi_label)
    if valid_probs is None:  # the kept step was not validated in this process (before a --resume; off-cycle end)
        valid_probs = predictor.predict_proba(data.valid["text"].tolist(), _pairs(data.valid))
    if data.labels.multi_label and cfg.evaluation.tune_threshold:
        from textclass.evaluation import tune_threshold

        y = np.asarray([data.labels.encode(ls) for ls in data.valid["labels"]], dtype=int)
        cfg.evaluation.threshold, f1 = tune_threshold(y, valid_probs)
        log.info("tuned multi-label threshold on valid: %.2f (micro-F1 %.4f)", cfg.evaluation.threshold, f1)
    reports["valid"] = _report(run_dir / "eval" / "valid", data.valid, valid_probs, predictor)
    if data.test is not None:
        test_probs = predictor.predict_proba(data.test["text"].tolist(), _pairs(data.test), progress=True)
        reports["test"] = _report(run_dir / "eval" / "test", data.test, test_probs, predictor)
    metrics.update({split: r["metrics"] for split, r in reports.items()})

    _write_run(run_dir, cfg, data, family, model, tokenizer, trainer, metrics)
    return TrainResult(run_dir, metrics, reports)


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


def _kept_valid_probs(trainer: Any, multi_label: bool) -> np.ndarray | None:
    """The validation probabilities the Trainer computed at the kept step, if it validated there."""
    logits = trainer.eval_logits.get(_kept_step(trainer))
    return None if logits is None else probabilities(torch.as_tensor(logits), multi_label).numpy()


def _pairs(df: Any) -> list[str] | None:
    return df["text_pair"].tolist() if "text_pair" in df.columns else None


def _report(out_dir: Path, df: Any, probs: np.ndarray, predictor: Predictor) -> dict[str, Any]:
    from textclass.evaluation import write_report

    labels = predictor.labels
    y_true = np.asarray([labels.encode(ls) for ls in df["labels"]])
    return write_report(
        out_dir,
        texts=df["text"].tolist(),
        text_pairs=_pairs(df),
        y_true=y_true.astype(int),
        probs=probs,
        label_names=labels.names,
        multi_label=labels.multi_label,
        threshold=predictor.threshold,
        badcases=predictor.cfg.evaluation.badcases,
    )


def _train_summary(trainer: Any) -> dict[str, Any]:
    state = trainer.state
    last = next((h for h in reversed(state.log_history) if "train_runtime" in h), {})
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
    }


def _write_run(run_dir: Path, cfg: Config, data: PreparedData, family: Any, model: Any, tokenizer: Any, trainer: Any, metrics: dict) -> None:
    """Weights, tokenizer, logs and reports first; config and labels (the 'finished' marks) last."""
    from textclass.evaluation import plot_training_curves

    family.save(model, tokenizer, cfg.model, run_dir)
    write_json(run_dir / "training_log.json", trainer.state.log_history)
    plot_training_curves(trainer.state.log_history, run_dir / "training_curves.png")
    write_json(run_dir / "data_audit.json", {"sources": data.sources, **data.audit})
    write_json(run_dir / METRICS_FILE, metrics)
    if not cfg.training.keep_checkpoints:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    data.labels.save(run_dir / LABELS_FILE)
    save_config(cfg, run_dir / CONFIG_FILE)


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


def load_pending_config(run_dir: Path) -> dict[str, Any]:
    """The raw config an unfinished run was started with (for `train --resume` without --config)."""
    p = pending_config(run_dir)
    if not p.is_file():
        raise UserError(f"{run_dir}: no unfinished run to resume here (missing {p.name}); pass --config")
    return yaml.safe_load(p.read_text(encoding="utf-8"))
