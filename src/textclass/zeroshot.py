"""Zero-shot classification: a decoder LLM scores each label's words after a prompt, without training.

The result is an ordinary run directory (config with `head: lm`, labels, tokenizer, the base model's
name and content hash, no weights), so `predict`, `evaluate`, `serve` and `info` take it like a trained
run; with `data` it also holds the same report `evaluate` writes.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from textclass.config import Config
from textclass.data.frames import text_columns
from textclass.data.labels import LabelSet
from textclass.errors import UserError
from textclass.rundir import CHECKPOINTS_DIR, EVAL_DIR, write_parity_sample, write_run

log = logging.getLogger("textclass")


def run_zero_shot(cfg: Config, labels: list[str], data: str | Path | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Write the zero-shot run directory; with `data` (a labelled file) also its report.

    Returns `run_dir`, `metrics` and `report` (None without data)."""
    from textclass.data.prepare import read_eval_data
    from textclass.evaluation import write_split_report
    from textclass.models.llm import LLMFamily
    from textclass.training.run import prepare_run_dir

    names = [x.strip() for x in labels if x.strip()]
    if len(names) < 2 or len(set(names)) != len(names):
        raise UserError(f"--labels {','.join(labels)}: give two or more distinct label names, e.g. --labels sport,tech")
    if cfg.training.kfold:
        raise UserError("training.kfold: zero-shot trains nothing, so it has no folds; unset training.kfold")
    if cfg.data.multi_label is True:
        raise UserError(
            "data.multi_label: zero-shot scores labels against each other (single-label); train a multi-label run instead"
        )
    label_set = LabelSet(names, multi_label=False)
    df = None
    if data is not None:
        df, _ = read_eval_data(str(data), cfg.data, label_set, require_labels=True)
        if label_set.multi_label or any(len(x) != 1 for x in df["labels"]):
            raise UserError(f"{data}: rows with several labels; zero-shot is single-label")
    model = LLMFamily().zero_shot(cfg, label_set)
    run_dir = Path(str(cfg.training.output_dir))
    prepare_run_dir(run_dir, resume=False, overwrite=overwrite)
    shutil.rmtree(run_dir / CHECKPOINTS_DIR, ignore_errors=True)
    model.save_weights(run_dir)
    metrics: dict[str, Any] = {"zero_shot": {"base_model": model.mcfg.name, "labels": names}}
    report = None
    if df is not None and data is not None:
        probs = model.predict_proba(*text_columns(df), batch_size=cfg.training.eval_batch_size, progress=True)
        report = write_split_report(run_dir / EVAL_DIR / Path(data).stem, df, probs, label_set, cfg.evaluation.threshold)
        metrics[Path(data).stem] = report["metrics"]
        write_parity_sample(run_dir, df, seed=cfg.data.seed)
    write_run(run_dir, model, metrics, [], {"sources": {"data": str(data)} if data is not None else {}})
    return {"run_dir": run_dir, "metrics": metrics, "report": report}
