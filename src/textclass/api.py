"""The Python API; the CLI is a thin layer over these functions."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from textclass.config import Config, apply_overrides, build_config, read_config_file
from textclass.errors import UserError
from textclass.inference.load import load_predictor
from textclass.inference.predictor import BasePredictor
from textclass.rundir import EVAL_DIR


def _as_config(config: Config | dict | str | Path | None, overrides: list[str] | None) -> Config:
    raw, source = raw_config(config, overrides)
    return build_config(raw, source=source)


def raw_config(config: Config | dict | str | Path | None, overrides: list[str] | None) -> tuple[dict[str, Any], str]:
    """The config as a raw dict (a file read, or a copy), overrides applied, not yet validated; and its name."""
    if isinstance(config, Config):
        raw, source = config.model_dump(mode="json"), "config"
    elif isinstance(config, dict):
        raw, source = copy.deepcopy(config), "config"
    elif config is None:
        raw, source = {}, "config"
    else:
        raw, source = read_config_file(config)
    return apply_overrides(raw, overrides or []), source


def train(
    config: Config | dict | str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
) -> Any:
    """Train a classifier; returns a `TrainResult` (run_dir, metrics).

    `config` is a Config, a dict shaped like the YAML file, or a path to one; `overrides` are
    `section.key=value` strings, exactly like `--set` on the command line. With `training.kfold` it trains
    one model per fold and writes them as one ensemble (docs/kfold.md).
    """
    cfg = _as_config(config, overrides)
    if cfg.distill is not None:
        from textclass.compress.distill import run_distillation

        return run_distillation(cfg, resume=resume, overwrite=overwrite)
    if cfg.training.kfold:
        from textclass.training.kfold import run_kfold_training

        return run_kfold_training(cfg, resume=resume, overwrite=overwrite)
    from textclass.training.run import run_training

    return run_training(cfg, resume=resume, overwrite=overwrite)


def distill(
    teachers: Sequence[str | Path] | str | Path,
    config: dict | str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    output: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> Any:
    """Train the student of `config` (any family) on the soft labels of `teachers` (run directories of any
    family, k-fold ensembles included; several are averaged); returns its `TrainResult`.

    Without a `data` section the student trains on the first teacher's data. See docs/distill.md.
    """
    from textclass.compress.distill import distill_config, run_distillation

    listed = [teachers] if isinstance(teachers, (str, Path)) else list(teachers)
    cfg = distill_config(listed, config, overrides, output)
    return run_distillation(cfg, resume=resume, overwrite=overwrite)


def tune(
    config: Config | dict | str | Path | None,
    space: str | Path,
    trials: int = 20,
    overrides: list[str] | None = None,
    *,
    output: str | Path | None = None,
    seed: int | None = None,
    pruner: Any = "median",
    resume: bool = False,
    overwrite: bool = False,
) -> Any:
    """Hyper-parameter search around `config` (the base config, as for `train`) over `space` (a YAML file
    of dotted config keys and their distributions) with Optuna; returns a `TuneResult` (best trial, every
    trial's row, the files written). See docs/tune.md.

    `trials`: in all (with `resume`, counting those finished before); `seed`: the sampler's (default
    `training.seed`); `pruner`: "median", "none" or an Optuna pruner. Writes trials.csv, trials.png,
    best.yaml (for `train`) and study.db into `output` (default runs/tune-NAME).
    """
    from textclass.training.tune import run_tune

    raw, source = raw_config(config, overrides)
    return run_tune(raw, space, trials, output, source=source, seed=seed, pruner=pruner, resume=resume, overwrite=overwrite)


def evaluate(
    model_dir: str | Path,
    data: str | Path,
    output_dir: str | Path | None = None,
    batch_size: int = 32,
    threshold: float | None = None,
    backend: str = "auto",
    threads: int | None = None,
) -> dict[str, Any]:
    """Score a labelled file with a trained model and write the reports (metrics, per-class, confusion, badcases)."""
    from textclass.data.frames import text_columns
    from textclass.data.prepare import read_eval_data
    from textclass.evaluation import write_split_report

    predictor = load_predictor(model_dir, batch_size=batch_size, threads=threads, backend=backend)
    df, _ = read_eval_data(str(data), predictor.cfg.data, predictor.labels, require_labels=True)
    probs = predictor.predict_proba(*text_columns(df), progress=True)
    out = Path(output_dir) if output_dir else Path(model_dir) / EVAL_DIR / Path(data).stem
    try:
        return write_split_report(
            out,
            df,
            probs,
            predictor.labels,
            predictor.threshold if threshold is None else threshold,
            predictor.cfg.evaluation.badcases,
        )
    except OSError as err:
        raise UserError(f"{out}: cannot write the report ({err.strerror}); choose a writable --output") from None


def zero_shot(
    labels: list[str],
    data: str | Path | None = None,
    model: str | None = None,
    prompt: str | None = None,
    config: str | Path | dict | None = None,
    overrides: list[str] | None = None,
    output: str | Path | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Classify with a decoder LLM's likelihood of each label's words after `prompt`, without training.

    Writes a run directory that `Classifier.load`, `evaluate`, `predict` and `serve` accept; with `data` (a
    labelled file) also the report `evaluate` writes. Returns `run_dir`, `metrics` and `report`.
    """
    from textclass.models.llm.zero_shot import zero_shot_config
    from textclass.zeroshot import run_zero_shot

    cfg = zero_shot_config(config, overrides, model=model, prompt=prompt, output=output)
    return run_zero_shot(cfg, labels, data=data, overwrite=overwrite)


def export(
    model_dir: str | Path,
    output: str | Path | None = None,
    int8: bool = False,
    optimize: bool = False,
    data: str | Path | None = None,
    samples: int = 256,
) -> dict[str, Any]:
    """Export a run directory to ONNX (into `DIR/onnx` unless `output`), with the parity check.

    Returns the export record (also written as `export.json`): files, input/output names, parity numbers.
    Raises UserError when the fp32 model differs from PyTorch by more than 1e-4 in any probability.
    """
    from textclass.export import export_onnx

    return export_onnx(model_dir, output=output, int8=int8, optimize=optimize, data=data, samples=samples)


def merge(model_dir: str | Path, output: str | Path | None = None) -> Path:
    """Fold a LoRA run's adapters into full weights: a new run directory (default `RUN-merged`) that needs no
    base model, predicts the same, and exports to ONNX like any full fine-tune. Returns its path."""
    from textclass.export.merge import merge_run

    return merge_run(model_dir, output)


class Classifier:
    """A trained classifier loaded from its run directory.

    >>> clf = Classifier.load("runs/bbc-news-encoder")
    >>> clf.predict(["Shares rose sharply after the merger."])
    [{'label': 'business', 'score': 0.97, 'scores': {...}}]
    """

    def __init__(self, predictor: BasePredictor) -> None:
        self.predictor = predictor

    @classmethod
    def load(cls, run_dir: str | Path, batch_size: int = 32, threads: int | None = None, backend: str = "auto") -> Classifier:
        """`backend`: `torch`, `onnx` (needs `textclass export`) or `auto` (onnx when exported)."""
        return cls(load_predictor(run_dir, batch_size=batch_size, threads=threads, backend=backend))

    @property
    def backend(self) -> str:
        return self.predictor.backend

    @property
    def labels(self) -> list[str]:
        return list(self.predictor.labels.names)

    @property
    def multi_label(self) -> bool:
        return self.predictor.labels.multi_label

    def predict_proba(self, texts: list[str], pairs: list[str] | None = None) -> np.ndarray:
        return self.predictor.predict_proba(list(texts), list(pairs) if pairs is not None else None)

    def predict(
        self, texts: list[str], pairs: list[str] | None = None, top_k: int | None = None, threshold: float | None = None
    ) -> list[dict[str, Any]]:
        """Per text: `label`, `score`, `scores` (single-label) or `labels`, `scores` (multi-label)."""
        if isinstance(texts, str):
            raise TypeError("predict() takes a list of texts; wrap a single text in a list")
        return self.predictor.predict(list(texts), list(pairs) if pairs is not None else None, top_k, threshold)


load = Classifier.load


def prune(
    model_dir: str | Path,
    output: str | Path,
    heads: float = 0.0,
    ffn: float = 0.0,
    layers: int | None = None,
    vocab: str | Path | None = None,
    recover: int = 0,
    iterations: int = 1,
    overwrite: bool = False,
    samples: int = 256,
    recover_from_teacher: bool = False,
    seed: int | None = None,
) -> dict[str, Any]:
    """Structured pruning of a trained encoder or LLM run into a new run directory (docs/prune.md).

    `heads`/`ffn`: fractions of all attention heads / FFN neurons to remove, least important first;
    `layers`: keep this many layers, evenly spaced; `vocab`: a data file (or `"train"`) whose texts the smaller
    vocabulary must still encode; `recover`: epochs of fine-tuning afterwards; `iterations`: prune in this
    many steps; `recover_from_teacher`: the recovery also distils the unpruned run; `seed`: the recovery's
    (default: the run's). Returns the record written as `prune.json` (removed units, parameters, size,
    latency and metrics before and after) plus `run_dir`.
    """
    from textclass.compress.prune import PruneOptions, prune_run

    options = PruneOptions(heads, ffn, layers, vocab, recover, iterations, samples, recover_from_teacher, seed)
    return prune_run(model_dir, output, options, overwrite=overwrite)
