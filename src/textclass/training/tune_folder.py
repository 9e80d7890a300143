"""The tune folder of `textclass tune`: every file name in it, opening it (new, --overwrite, --resume) and the
Optuna study in it, and the results written at the end (trials.csv, trials.png, best.yaml).

```
runs/tune-NAME/
  study.db      the Optuna study (SQLite), written as trials finish; --resume continues it
  trials.csv    one row per trial: number, state, value, each searched key, evaluations, duration, error
  trials.png    each trial's value and the best so far
  best.yaml     the base config with the best trial's values, ready for `textclass train --config`
  trial-N/      a trial's Trainer output while it runs (removed after; TensorBoard logs stay)
```
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pandas as pd
import yaml

from textclass.errors import UserError
from textclass.evaluation import format_table, plot_trials
from textclass.fileio import atomic_write
from textclass.training.run import prepare_output
from textclass.training.space import with_values

if TYPE_CHECKING:
    import optuna

log = logging.getLogger("textclass")

TRIALS_FILE = "trials.csv"  # one row per trial: number, state, value, each parameter, evaluations, duration, error
PLOT_FILE = "trials.png"
BEST_FILE = "best.yaml"  # the best trial's config, ready for `textclass train --config`
STUDY_FILE = "study.db"  # the Optuna study (SQLite); written as trials finish, continued by --resume
TRIAL_DIR = "trial-{}"  # a trial's Trainer output while it runs (removed after; TensorBoard logs stay)
STUDY_NAME = "textclass-tune"
FAILED = "failed"  # the user attribute holding why a trial failed
Direction = Literal["minimize", "maximize"]


@dataclass
class TuneResult:
    """A finished search: the best trial and every trial's row (as in trials.csv)."""

    folder: Path
    metric: str
    direction: Direction
    best_trial: int
    best_value: float
    best_params: dict[str, Any]
    trials: pd.DataFrame
    files: dict[str, Path]


def open_folder(folder: Path, resume: bool, overwrite: bool) -> bool:
    """Rank 0: the tune folder made (or, --overwrite, emptied) or, --resume, found; whether this call made it."""
    if resume:
        if not (folder / STUDY_FILE).is_file():
            raise UserError(f"{folder}: --resume but no {STUDY_FILE} there (no tune to continue); tune again without --resume")
        return False
    finished, started = (folder / TRIALS_FILE).exists(), (folder / STUDY_FILE).exists()
    held = "a finished tune" if finished else "an unfinished tune" if started else None
    return prepare_output(folder, "tune folder", held, overwrite, ", or --resume to add trials")


def storage(folder: Path) -> str:
    return f"sqlite:///{(folder / STUDY_FILE).resolve()}"


def open_study(folder: Path, direction: Direction, trials: int, resume: bool, record: dict[str, Any]) -> tuple[int, int]:
    """Rank 0: the study, new or continued; returns (trials left to run, trials already finished).

    A continued study must search the same space from the same base config, or its trials would not
    compare; a trial left running by a killed tune is marked failed.
    """
    import optuna

    # The log says what each trial did (values, result, pruned, failed); Optuna's own lines would repeat it,
    # a trial stopped by Ctrl-C with a traceback.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    if not resume:
        optuna.create_study(study_name=STUDY_NAME, storage=storage(folder), direction=direction).set_user_attr("search", record)
        return trials, 0
    study = optuna.load_study(study_name=STUDY_NAME, storage=storage(folder))
    if study.user_attrs.get("search") != record:
        raise UserError(
            f"{folder}: --resume with another base config or search space than this tune started with; "
            "give the same ones, or tune into another --output"
        )
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
    done = len(study.trials)
    log.info("tune: continuing %s (%d trial(s) finished)", folder / STUDY_FILE, done)
    return max(0, trials - done), done


def write_results(
    folder: Path, base: dict[str, Any], keys: list[str], metric: str, direction: Direction, created: bool
) -> TuneResult:
    """Rank 0: trials.csv, trials.png and best.yaml (`base` with the best trial's values of `keys`) from the
    study; without one finished trial, an error (and a tune folder this call made is removed again)."""
    import optuna

    study = optuna.load_study(study_name=STUDY_NAME, storage=storage(folder))
    frame = trials_frame(study.trials, keys)
    if not (frame["state"] == "COMPLETE").any():
        if created:
            shutil.rmtree(folder, ignore_errors=True)
        failures = [t.user_attrs[FAILED] for t in study.trials if FAILED in t.user_attrs]
        why = f"; the first failure: {failures[0]}" if failures else ""
        raise UserError(f"tune: none of the {len(frame)} trial(s) finished ({_counts(frame)}){why}")
    best = study.best_trial
    files = {"trials": folder / TRIALS_FILE, "plot": folder / PLOT_FILE, "best": folder / BEST_FILE, "study": folder / STUDY_FILE}
    atomic_write(files["trials"], lambda tmp: frame.to_csv(tmp, index=False))
    points = [(int(r.number), str(r.state), None if pd.isna(r.value) else float(r.value)) for r in frame.itertuples()]
    plot_trials(points, metric, direction == "minimize", files["plot"])
    config = with_values(base, best.params)
    header = (
        f"# textclass tune: trial {best.number} of {len(frame)} had the best valid {metric} ({best.value:.4f}).\n"
        f"# Tuned: {', '.join(keys)}. Train it with: textclass train --config {files['best']}\n"
    )
    body = yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
    atomic_write(files["best"], lambda tmp: Path(tmp).write_text(header + body, encoding="utf-8"))
    log.info("tune: %s; best trial %d, valid %s %.4f", _counts(frame), best.number, metric, best.value)
    assert best.value is not None  # a finished single-objective trial has one
    return TuneResult(folder, metric, direction, best.number, best.value, dict(best.params), frame, files)


def trials_frame(trials: list[optuna.trial.FrozenTrial], keys: list[str]) -> pd.DataFrame:
    """One row per trial. `value`: a finished trial's value, or a pruned trial's last reported evaluation."""
    rows = []
    for t in trials:
        reports = t.intermediate_values
        value = t.value if t.state.name == "COMPLETE" else reports[max(reports)] if reports and t.state.name == "PRUNED" else None
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "value": value,
                **{k: t.params.get(k) for k in keys},
                "evaluations": len(reports),
                "duration_s": round(t.duration.total_seconds(), 1) if t.duration else None,
                "error": t.user_attrs.get(FAILED, ""),
            }
        )
    return pd.DataFrame(rows)


def _counts(frame: pd.DataFrame) -> str:
    return ", ".join(f"{n} {state.lower()}" for state, n in frame["state"].value_counts().items())


def format_trials(result: TuneResult) -> str:
    """The trials as a table for the terminal, the best one marked, the error column only when a trial failed."""
    frame = result.trials.copy()
    frame.insert(0, "best", ["*" if n == result.best_trial else "" for n in frame["number"]])
    frame = frame.rename(columns={"number": "trial"})
    if not frame["error"].astype(bool).any():
        frame = frame.drop(columns="error")
    arrow = "lower" if result.direction == "minimize" else "higher"
    return format_table(frame, title=f"trials: valid {result.metric} ({arrow} is better)", fixed=("value",))
