"""The run directory: the contract between training and everything after it.

A run directory holds the weights (safetensors), the tokenizer, `labels.json`, the resolved `config.yaml`,
metrics, reports, a small parity sample and later `onnx/`. `predict`, `evaluate`, `export`, `serve` and
`Classifier.load` need that folder and nothing else. This module owns every file name in it, opens a run
(`load_model`) and writes a finished one (`write_run`).

Writes are atomic file by file (a crash leaves the old file or none), and `labels.json` then `config.yaml`
come last: a folder without them is not a run (`check_run_dir` refuses it), so an interrupted write never
leaves something that loads half old and half new.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from textclass.config import Config, build_config, save_config, upgrade_run_config
from textclass.data.labels import LabelSet
from textclass.errors import UserError
from textclass.fileio import atomic_write, write_json

if TYPE_CHECKING:  # torch is imported by `load_model` only: the ONNX backend checks run dirs without it
    import pandas as pd

    from textclass.models.base import TextModel

# -- every file name of a run directory -------------------------------------------------------------------
CONFIG_FILE = "config.yaml"  # the resolved config; written last: its presence marks a finished run
LABELS_FILE = "labels.json"
METRICS_FILE = "metrics.json"
WEIGHTS_FILE = "model.safetensors"
ENCODER_CONFIG_FILE = "encoder_config.json"  # the encoder family's `linear` head: the body's HF config
LLM_FILE = "llm.json"  # the llm family: base model (name, GGUF file, content hash), finetune mode, backbone config
ADAPTER_DIR = "adapter"  # the llm family's LoRA adapter, in PEFT's format (adapter_config.json + weights)
HEAD_FILE = "head.safetensors"  # the llm family's head when the LLM itself is not saved (lora, head-only)
SMALL_TOKENIZER_FILE = "textclass_tokenizer.json"  # the small family's own tokenizer (vocabulary, kind)
LEGACY_SMALL_TOKENIZER_FILE = "tokenizer.json"  # its name before: Hugging Face tools read that name as theirs
HF_TOKENIZER_FILE = "tokenizer.json"  # a fast Hugging Face tokenizer's own file (save_pretrained), read by `tokenizers`
STRUCTURE_FILE = "structure.json"  # a pruned transformer: per layer its query heads and FFN width (models.surgery)
PRUNE_FILE = "prune.json"  # a pruned run: its source run, what was removed, parameters, size and latency before/after
TRAINING_LOG_FILE = "training_log.json"
TRAINING_CURVES_FILE = "training_curves.png"
DATA_AUDIT_FILE = "data_audit.json"
PARITY_SAMPLE_FILE = "parity_sample.jsonl"  # validation texts (and labels) for export's parity check
EVAL_DIR = "eval"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINTS_DIR = "checkpoints"
PENDING_CONFIG = "textclass_config.yaml"  # inside checkpoints/: the config an unfinished run started with
ONNX_DIR = "onnx"
EXPORT_FILE = "export.json"  # inside onnx/: written last, marks a finished export
ONNX_FP32_FILE = "model.onnx"
ONNX_INT8_FILE = "model.int8.onnx"
ONNX_PARITY_FILE = "parity.json"
# A k-fold run (`training.kfold`): one finished run directory per fold under folds/, and at the top the
# ensemble's files (config with `training.kfold`, labels, metrics, eval/oof and eval/test, the parity sample).
FOLDS_DIR = "folds"
FOLD_DIR = "fold-{}"  # folds/fold-1 .. folds/fold-K
OOF_PREDICTIONS_FILE = "oof_predictions.csv"  # every train+valid text, predicted by the fold that held it out
OOF_SPLIT = "oof"  # eval/oof: the report of the out-of-fold predictions

PARITY_SAMPLE_SIZE = 256


def check_run_dir(path: str | Path) -> Path:
    """The path, if it is a finished run directory; else a one-line error saying what is missing."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{p}: is a file; pass the run directory `textclass train` wrote (e.g. runs/NAME)")
    if not p.is_dir():
        raise UserError(f"{p}: no such run directory; pass the folder `textclass train` wrote (e.g. runs/NAME)")
    missing = [f for f in (CONFIG_FILE, LABELS_FILE) if not (p / f).is_file()]
    if missing:
        unfinished = (p / CHECKPOINTS_DIR / PENDING_CONFIG).is_file()
        hint = f" (training did not finish; continue it with `textclass train --output {p} --resume`)" if unfinished else ""
        raise UserError(f"{p}: not a textclass run directory, missing {', '.join(missing)}{hint}")
    return p


def read_run_config(path: Path) -> Config:
    try:
        raw = yaml.safe_load((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        raise UserError(f"{path / CONFIG_FILE}: unreadable; the run directory is damaged") from None
    return build_config(upgrade_run_config(raw), source=str(path / CONFIG_FILE))


def read_labels(path: Path) -> LabelSet:
    return LabelSet.load(path / LABELS_FILE)


def fold_dir(run_dir: Path, fold: int) -> Path:
    """The run directory of fold `fold` (1-based) inside a k-fold run."""
    return run_dir / FOLDS_DIR / FOLD_DIR.format(fold)


def read_metrics(path: Path) -> dict[str, Any]:
    """A run directory's metrics.json ({} for runs saved without one)."""
    try:
        return dict(json.loads((path / METRICS_FILE).read_text(encoding="utf-8")))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, TypeError):
        raise UserError(f"{path / METRICS_FILE}: unreadable; the run directory is damaged") from None


def load_model(path: str | Path, network: bool = True) -> TextModel:
    """The one way to open a run directory: its model object (config, labels, tokenizer, network)."""
    p = check_run_dir(path)
    cfg = read_run_config(p)
    return load_model_parts(p, cfg, read_labels(p), network)


def load_model_parts(path: Path, cfg: Config, labels: LabelSet, network: bool = True) -> TextModel:
    """`load_model` with config and labels given (training reads its weights back before the run is finished)."""
    from textclass.models.registry import MODEL_FILE_ERRORS, get_family

    if cfg.training.kfold:
        return _load_ensemble(path, cfg, labels, network)
    try:
        return get_family(cfg.model.family).load(path, cfg, labels, network=network)
    except MODEL_FILE_ERRORS as err:
        raise UserError(
            f"{path}: the model files are missing or damaged ({type(err).__name__}: {' '.join(str(err).split())[:160]})"
        ) from None


def _load_ensemble(path: Path, cfg: Config, labels: LabelSet, network: bool) -> TextModel:
    """A k-fold run as one model: its folds' models (each a run directory of its own) behind one object.

    Without the network only fold 1 is read: the folds share one tokenizer (training checks it), and that
    is all encoding needs.
    """
    from textclass.models.ensemble import EnsembleModel

    k = int(cfg.training.kfold or 0)
    members = []
    for i in range(1, (k if network else 1) + 1):
        folder = fold_dir(path, i)
        if not (folder / CONFIG_FILE).is_file() or not (folder / LABELS_FILE).is_file():
            raise UserError(
                f"{path}: fold {i} of {k} is missing or unfinished ({folder}); the run directory is damaged, train again"
            )
        member = load_model(folder, network)
        if member.labels.names != labels.names:
            raise UserError(f"{folder}: its labels differ from {path / LABELS_FILE}; the run directory is damaged, train again")
        members.append(member)
    return EnsembleModel.of(members, cfg, labels)


def write_parity_sample(run_dir: Path, df: pd.DataFrame, seed: int = 0) -> None:
    """Up to PARITY_SAMPLE_SIZE validation rows (texts, pairs, labels), so `export` needs no data files."""
    import numpy as np

    rows = np.sort(np.random.default_rng(seed).permutation(len(df))[:PARITY_SAMPLE_SIZE])
    cols = [c for c in ("text", "text_pair", "labels") if c in df.columns]
    records = df.iloc[rows][cols].to_dict(orient="records")
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write(run_dir / PARITY_SAMPLE_FILE, lambda tmp: tmp.write_text(lines, encoding="utf-8"))


def read_parity_sample(run_dir: Path) -> pd.DataFrame | None:
    """The saved parity sample (columns text, [text_pair], [labels]), or None for runs saved without one."""
    import pandas as pd

    path = run_dir / PARITY_SAMPLE_FILE
    if not path.is_file():
        return None
    try:
        return pd.read_json(path, lines=True, dtype=False)
    except ValueError:
        raise UserError(f"{path}: unreadable; pass --data FILE with texts for the parity check") from None


def write_run(
    run_dir: Path,
    model: TextModel,
    metrics: dict[str, Any],
    log_history: list[dict[str, Any]] | None,
    data_audit: dict[str, Any],
) -> None:
    """A finished run's files besides weights, reports and plots: log, audit, metrics, then labels and config.

    `log_history` None: no training log of its own (a k-fold run's logs are its folds').
    """
    if log_history is not None:
        write_json(run_dir / TRAINING_LOG_FILE, log_history)
    write_json(run_dir / DATA_AUDIT_FILE, data_audit)
    write_json(run_dir / METRICS_FILE, metrics)
    atomic_write(run_dir / LABELS_FILE, model.labels.save)
    atomic_write(run_dir / CONFIG_FILE, lambda tmp: save_config(model.cfg, tmp))
