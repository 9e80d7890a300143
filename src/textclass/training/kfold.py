"""k-fold training (`training.kfold: K`): K models on stratified folds of train+valid, kept as one ensemble.

Train and valid are pooled and split into K stratified folds (`data.folds`, seeded by `data.seed`). Fold i
trains on the other folds and validates on fold i, so best-model selection and early stopping use the
held-out fold, and that fold's predictions (from the kept weights as saved, in fp32, like any run's valid
report) are the out-of-fold (OOF) predictions: every train+valid text is predicted exactly once, by the
one model that did not train on it. The test split is seen by no fold: the finished ensemble scores it.

Each fold is an ordinary run directory (`folds/fold-i`) written by the single-run code path
(`run.build_model` + `run.train_run`). The top of the run directory holds the ensemble's files: the
config (with `training.kfold`, written last), labels, metrics (`folds`, `oof`, `test`), the OOF and test
reports, `oof_predictions.csv` and the parity sample. `rundir.load_model` reads it as one model whose
probabilities are the mean of the folds' (`models.ensemble`).

One vocabulary for all folds: the small family fits its tokenizer on the training texts, and here it is fitted
once on all of train+valid (never the test texts). The folds then share one encoding, so one batch feeds
all K networks and the export is one graph. A word that occurs only in a fold's held-out texts then has an
untrained row in that fold's model, where a single run would map it to the (equally untrained) `<unk>`
row; no label information crosses folds.

`--resume`: folds whose folder is finished (its config.yaml) are kept as they are, the unfinished fold
continues from its last complete checkpoint, later folds start fresh; the config is checked against the
interrupted run's as for any run (`resume.check_resume_config`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from textclass.config import Config, save_config
from textclass.data.folds import assign_folds
from textclass.data.frames import text_columns
from textclass.data.labels import LabelSet
from textclass.data.prepare import PreparedData
from textclass.errors import Interrupted, UserError
from textclass.evaluation import write_split_report
from textclass.fileio import atomic_write
from textclass.models.base import TextModel
from textclass.models.registry import Family
from textclass.rundir import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    DATA_AUDIT_FILE,
    EVAL_DIR,
    HF_TOKENIZER_FILE,
    OOF_PREDICTIONS_FILE,
    OOF_SPLIT,
    fold_dir,
    load_model,
    load_model_parts,
    read_metrics,
    write_parity_sample,
    write_run,
)
from textclass.training import distributed
from textclass.training.resume import check_resume_config, last_complete_checkpoint, pending_config
from textclass.training.run import TrainResult, build_model, prepare_run_dir, start_run, train_run, vocabulary_texts
from textclass.training.trainer import tokenizer_fingerprint

log = logging.getLogger("textclass")


def run_kfold_training(cfg: Config, resume: bool = False, overwrite: bool = False) -> TrainResult:
    """`run.run_training` for a config with `training.kfold`: the K folds, then the ensemble's run directory."""
    if not cfg.training.kfold:
        raise ValueError("training.kfold is not set: train one model with textclass.training.run.run_training")
    with distributed.session():
        family, run_dir, changes, data = start_run(cfg, resume)
        return run_kfold(cfg, family, data, run_dir, resume, overwrite, changes)


def run_kfold(
    cfg: Config, family: Family, data: PreparedData, run_dir: Path, resume: bool, overwrite: bool, changes: dict[str, Any]
) -> TrainResult:
    """Train the K folds (skipping finished ones on --resume), then score OOF and test and write the top files."""
    k = int(cfg.training.kfold or 0)
    pool = pd.concat([data.train, data.valid], ignore_index=True)  # train+valid: what the folds split
    folds = assign_folds(pool, data.labels, k, cfg.data.seed)
    vocabulary = vocabulary_texts(pool)
    dirs = [fold_dir(run_dir, i + 1) for i in range(k)]
    finished = [resume and (d / CONFIG_FILE).is_file() for d in dirs]
    if resume and not any(finished) and not any(last_complete_checkpoint(d, quiet=True) for d in dirs):
        raise UserError(
            f"{run_dir}: --resume but no finished fold and no complete checkpoint there; train again without --resume"
        )
    for f in range(k):
        if finished[f]:
            _check_held_out(dirs[f], pool[folds == f], run_dir)
    todo = [i for i in range(k) if not finished[i]]
    # The first model is built before the run directory is touched: one the family cannot build fails with nothing written.
    built = (
        build_model(_fold_config(cfg, run_dir, todo[0]), family, _fold_data(data, pool, folds, todo[0]), vocabulary)
        if todo
        else None
    )
    created = distributed.on_main(_open_top, run_dir, resume, overwrite, cfg)
    tokenizer = None
    current = 0
    try:
        for i in range(k):
            current = i + 1
            if finished[i]:
                log.info("fold %d/%d: finished before, kept as it is", i + 1, k)
                continue
            fold_cfg, fold_data = _fold_config(cfg, run_dir, i), _fold_data(data, pool, folds, i)
            model, loss_fn = built if built is not None else build_model(fold_cfg, family, fold_data, vocabulary)
            built = None
            tokenizer = _same_tokenizer(model, tokenizer)
            go_on = resume and last_complete_checkpoint(dirs[i], quiet=True) is not None
            if not go_on and distributed.is_main_process():
                shutil.rmtree(dirs[i], ignore_errors=True)  # leftovers of this run's own unfinished fold
            log.info(
                "fold %d/%d: training on %d texts, validating on the %d it holds out%s",
                i + 1,
                k,
                len(fold_data.train),
                len(fold_data.valid),
                " (resuming from its last checkpoint)" if go_on else "",
            )
            fold_changes = check_resume_config(dirs[i], fold_cfg) if go_on else {}
            result = train_run(model, loss_fn, fold_data, dirs[i], resume=go_on, changes=fold_changes)
            threshold = model.cfg.evaluation.threshold  # the fold's own (tuned on its held-out texts, if asked)
            del model
            if distributed.is_main_process():  # the other ranks go on to the next fold's training
                rows = np.flatnonzero(folds == i)
                _write_oof(dirs[i], fold_data.valid, rows, i, result.probabilities["valid"], data.labels, threshold)
        current = 0
        if not distributed.is_main_process():  # rank 0 scores the ensemble and writes the top of the run
            return TrainResult(run_dir, {"kfold": k}, {})
        return _finish(cfg, data, pool, folds, run_dir, changes)
    except (KeyboardInterrupt, Interrupted):
        raise Interrupted(_interrupted_message(run_dir, dirs, created, current, k)) from None


def _open_top(run_dir: Path, resume: bool, overwrite: bool, cfg: Config) -> bool:
    """The run directory prepared (a new run's; a resumed one is used as it is) and the config the run starts with."""
    created = prepare_run_dir(run_dir, resume=False, overwrite=overwrite) if not resume else False
    save_config(cfg, pending_config(run_dir))
    return created


def _fold_config(cfg: Config, run_dir: Path, i: int) -> Config:
    """Fold i's config: the run's, for one model (no `kfold`) written into its fold folder."""
    fold_cfg = cfg.model_copy(deep=True)
    fold_cfg.training.kfold = None
    fold_cfg.training.output_dir = str(fold_dir(run_dir, i + 1))
    return fold_cfg


def _fold_data(data: PreparedData, pool: pd.DataFrame, folds: np.ndarray, i: int) -> PreparedData:
    """Fold i's splits: train = the other folds, valid = fold i, no test."""
    held = folds == i
    train, valid = pool[~held].reset_index(drop=True), pool[held].reset_index(drop=True)
    k = int(folds.max()) + 1
    sources = {
        "train": f"train+valid ({data.sources.get('train')} + {data.sources.get('valid')}) without fold {i + 1} of {k}",
        "valid": f"fold {i + 1} of {k} of train+valid",
    }
    fold = {"fold": i + 1, "of": k, "held_out_sha256": _digest(valid)}  # checked when a --resume keeps the fold
    audit = {**data.audit, "sizes": {"train": len(train), "valid": len(valid)}, "fold": fold}
    return PreparedData(train=train, valid=valid, test=None, labels=data.labels, audit=audit, sources=sources)


def _same_tokenizer(model: TextModel, first: str | None) -> str:
    """The folds must encode alike (one batch feeds every fold's network): a different tokenizer is a bug."""
    state = tokenizer_fingerprint(model.tokenizer)
    if first is not None and state != first:
        raise RuntimeError("k-fold: the folds' tokenizers differ; the ensemble needs one shared encoding")
    return state


def oof_frame(
    df: pd.DataFrame, rows: np.ndarray, fold: np.ndarray, probs: np.ndarray, labels: LabelSet, threshold: float
) -> pd.DataFrame:
    """One row per text: its row in train+valid, the fold that held it out, the text(s), gold and predicted
    label(s) (`|`-joined for multi-label) and one `score_<label>` probability per class."""
    names = np.asarray(labels.names, dtype=object)
    decided = labels.decide(probs, threshold)
    out = pd.DataFrame({"row": rows, "fold": fold, "text": df["text"].to_numpy()})
    if "text_pair" in df.columns:
        out["text_pair"] = df["text_pair"].to_numpy()
    out["gold"] = ["|".join(ls) for ls in df["labels"]]
    out["predicted"] = ["|".join(names[d.astype(bool)]) for d in decided] if labels.multi_label else list(names[decided])
    for j, name in enumerate(labels.names):
        out[f"score_{name}"] = probs[:, j]
    return out


def _write_oof(
    folder: Path, valid: pd.DataFrame, rows: np.ndarray, i: int, probs: np.ndarray, labels: LabelSet, threshold: float
) -> None:
    """Fold i's held-out predictions in its folder (at the fold's own threshold), so a resumed run reads them back."""
    frame = oof_frame(valid, rows, np.full(len(rows), i + 1), probs, labels, threshold)
    atomic_write(folder / OOF_PREDICTIONS_FILE, lambda tmp: frame.to_csv(tmp, index=False))


def _digest(df: pd.DataFrame) -> str:
    """A fingerprint of a fold's held-out rows: texts, second texts and labels, in order."""
    cols = [c for c in ("text", "text_pair", "labels") if c in df.columns]
    return hashlib.sha256(json.dumps(df[cols].to_numpy().tolist(), ensure_ascii=False).encode()).hexdigest()


def _check_held_out(folder: Path, held_out: pd.DataFrame, run_dir: Path) -> None:
    """A finished fold kept on --resume must have held out the rows its fold holds out now: else the data (or
    its order) changed, and the folds would no longer partition train+valid."""
    try:
        saved = json.loads((folder / DATA_AUDIT_FILE).read_text(encoding="utf-8"))["fold"]["held_out_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{folder}: its {DATA_AUDIT_FILE} is missing or damaged; train again with --overwrite") from None
    if saved != _digest(held_out):
        raise UserError(
            f"{run_dir}: the training data changed since the interrupted run ({folder.name} held out other texts); "
            "resume with the same data, or train again with --overwrite"
        )


def _fold_probabilities(folder: Path, valid: pd.DataFrame, rows: np.ndarray, i: int, labels: LabelSet) -> np.ndarray:
    """A finished fold's held-out probabilities: from its file, or (a run stopped right after the fold
    finished, before the file was written) predicted again by the fold's saved model."""
    path = folder / OOF_PREDICTIONS_FILE
    if path.is_file():
        saved = pd.read_csv(path)  # float32 scores written in shortest form: read back exactly as float32
        if saved["row"].tolist() == rows.tolist():
            return saved[[f"score_{n}" for n in labels.names]].to_numpy(dtype=np.float32)
    model = load_model(folder)
    probs = model.predict_proba(*text_columns(valid), batch_size=model.cfg.training.eval_batch_size)
    _write_oof(folder, valid, rows, i, probs, labels, model.cfg.evaluation.threshold)
    return probs


def _finish(
    cfg: Config, data: PreparedData, pool: pd.DataFrame, folds: np.ndarray, run_dir: Path, changes: dict[str, Any]
) -> TrainResult:
    """The top of the run directory: OOF and test reports of the ensemble, metrics, then labels and config."""
    labels, k = data.labels, int(folds.max()) + 1
    oof = np.zeros((len(pool), labels.num_labels), dtype=np.float32)
    for i in range(k):
        rows = np.flatnonzero(folds == i)
        oof[rows] = _fold_probabilities(fold_dir(run_dir, i + 1), pool.iloc[rows].reset_index(drop=True), rows, i, labels)
    if labels.multi_label and cfg.evaluation.tune_threshold:
        from textclass.evaluation import tune_threshold

        cfg.evaluation.threshold, f1 = tune_threshold(labels.encode_all(pool["labels"]), oof)
        log.info("tuned multi-label threshold on the out-of-fold predictions: %.2f (micro-F1 %.4f)", cfg.evaluation.threshold, f1)
    threshold, badcases = cfg.evaluation.threshold, cfg.evaluation.badcases
    reports = {OOF_SPLIT: write_split_report(run_dir / EVAL_DIR / OOF_SPLIT, pool, oof, labels, threshold, badcases)}
    frame = oof_frame(pool, np.arange(len(pool)), folds + 1, oof, labels, threshold)
    atomic_write(run_dir / OOF_PREDICTIONS_FILE, lambda tmp: frame.to_csv(tmp, index=False))
    write_parity_sample(run_dir, pool, seed=cfg.data.seed)
    shared = fold_dir(run_dir, 1) / HF_TOKENIZER_FILE  # the folds' one tokenizer, where the torch-free ONNX backend reads it
    if shared.is_file():
        atomic_write(run_dir / HF_TOKENIZER_FILE, lambda tmp: shutil.copyfile(shared, tmp))
    # The K folds as one model, what predict and serve run (its networks only to score a test split).
    ensemble = load_model_parts(run_dir, cfg, labels, network=data.test is not None)
    probabilities = {OOF_SPLIT: oof}
    if data.test is not None:
        log.info("scoring the test split with the %d-fold ensemble", k)
        test = ensemble.predict_proba(*text_columns(data.test), batch_size=cfg.training.eval_batch_size, progress=True)
        reports["test"] = write_split_report(run_dir / EVAL_DIR / "test", data.test, test, labels, threshold, badcases)
        probabilities["test"] = test
    fold_metrics = [read_metrics(fold_dir(run_dir, i + 1)) for i in range(k)]
    metrics: dict[str, Any] = {
        "kfold": k,
        "folds": [{"fold": i + 1, **m.get("valid", {})} for i, m in enumerate(fold_metrics)],
        **{split: r["metrics"] for split, r in reports.items()},
        "train": {"folds": [m.get("train", {}) for m in fold_metrics]} | ({"resumed_with_changes": changes} if changes else {}),
    }
    if not cfg.training.keep_checkpoints:
        shutil.rmtree(run_dir / CHECKPOINTS_DIR, ignore_errors=True)
    audit = {
        "sources": data.sources,
        **data.audit,
        "kfold": {"folds": k, "seed": cfg.data.seed, "held_out": np.bincount(folds).tolist()},
    }
    write_run(run_dir, ensemble, metrics, None, audit)
    return TrainResult(run_dir, metrics, reports, probabilities)


def _interrupted_message(run_dir: Path, dirs: list[Path], created: bool, current: int, k: int) -> str:
    """What an interrupted k-fold run kept: finished folds and checkpoints stay for --resume; a run directory
    this run made that holds neither is removed."""
    kept = any((d / CONFIG_FILE).is_file() or last_complete_checkpoint(d, quiet=True) for d in dirs)
    where = f"fold {current}/{k}" if current else "after the last fold"
    if kept:
        return f"{where}: finished folds and checkpoints kept; continue with `textclass train --output {run_dir} --resume`"
    if created and distributed.is_main_process():
        shutil.rmtree(run_dir, ignore_errors=True)
        return f"{where}: stopped before the first checkpoint; nothing was kept ({run_dir} removed)"
    return f"{where}: stopped before the first checkpoint; {run_dir} is as it was"
