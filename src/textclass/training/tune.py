"""`textclass tune`: hyper-parameter search with Optuna, through the Trainer's `hyperparameter_search`.

A trial is the base config with the trial's values (space.yaml, `training.space`) trained the way `textclass
train` trains it: a fresh seeded model and its loss (`run.build_model`) and the Trainer `build_trainer` makes
of that config. So a model, loss or trick key in the space takes effect exactly as it does in a run.

The Trainer's `hyperparameter_search` runs the study (`StudyTrainer`): Optuna on rank 0, and under
torchrun each trial's values sent to the other ranks, which build the same trial. Every validation is
reported to the study (`TrialTrainer`); its pruner (Optuna's MedianPruner by default) may stop a trial
that is worse than the median of earlier trials at the same evaluation.

A trial's value is its validation `training.best_metric`: its best evaluation when the config keeps the best
checkpoint (`final_model: best`), else its last. Trials save no checkpoints (their models are dropped after
the last evaluation; a fastText table would be rewritten ~1 GB at a time). What the tune folder holds, and
the results written into it, are `training.tune_folder`'s.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import shutil
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import HPSearchBackend

from textclass.config import Config, build_config
from textclass.data.prepare import PreparedData
from textclass.errors import Interrupted, UserError
from textclass.models.registry import get_family
from textclass.rundir import CHECKPOINTS_DIR
from textclass.training import distributed
from textclass.training.run import build_model, default_run_dir, resolve_defaults, start_run, vocabulary_texts
from textclass.training.space import Param, check_space, read_space, trial_config
from textclass.training.trainer import LOWER_IS_BETTER, ClassifierTrainer, build_trainer, tokenize, training_arguments
from textclass.training.tune_folder import (
    FAILED,
    STUDY_FILE,
    STUDY_NAME,
    TRIAL_DIR,
    Direction,
    TuneResult,
    open_folder,
    open_study,
    storage,
    write_results,
)

if TYPE_CHECKING:
    import optuna

log = logging.getLogger("textclass")
PRUNERS = ("median", "none")


def default_tune_dir(cfg: Config) -> Path:
    return Path("runs") / f"tune-{default_run_dir(cfg).name}"


def check_tune(
    raw: dict[str, Any], space: str | Path, trials: int, pruner: Any, source: str = "config"
) -> tuple[Config, dict[str, Param]]:
    """Everything about the request that can be checked before data is read: the base config, what tune
    refuses in it, the trial count, the pruner and the search space (each range end and choice put through
    the config's schema). Returns the base config and the space."""
    cfg = build_config(raw, source=source)
    if cfg.training.kfold:
        raise UserError("training.kfold: tune trains one model per trial; remove kfold, tune, then train the best config with it")
    if cfg.training.deepspeed:
        raise UserError(
            "training.deepspeed: tune trains its trials with DDP (torchrun) or one process; remove deepspeed, tune, "
            "then train the best config with it"
        )
    if cfg.distill is not None:
        raise UserError("distill: tune does not distil; remove the distill section (tune the student as an ordinary run)")
    if trials < 1:
        raise UserError(f"--trials {trials}: give the number of trials to run, at least 1")
    if isinstance(pruner, str) and pruner not in PRUNERS:
        raise UserError(f"--pruner {pruner}: use {' or '.join(PRUNERS)}")
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise UserError("textclass tune needs Optuna: pip install 'textclass[scale]' (or pip install optuna)") from None
    parsed = read_space(space)
    check_space(parsed, _base(raw), str(space))
    return cfg, parsed


def run_tune(
    raw: dict[str, Any],
    space: str | Path,
    trials: int,
    output: str | Path | None = None,
    *,
    source: str = "config",
    seed: int | None = None,
    pruner: str | optuna.pruners.BasePruner = "median",
    resume: bool = False,
    overwrite: bool = False,
) -> TuneResult:
    """Search `space` around the raw base config with `trials` trials in all (--resume counts the finished
    ones). Under torchrun every rank returns rank 0's result.

    `seed`: the sampler's (default `training.seed`); `pruner`: "median", "none" or any Optuna pruner.
    Every mistake in the config, the space or the data fails before the tune folder is touched.
    """
    cfg, parsed = check_tune(raw, space, trials, pruner, source)
    with distributed.session():
        folder = Path(output) if output is not None else default_tune_dir(cfg)
        family, _, _, data = start_run(cfg, resume=False)  # resolves the base's defaults: the driver's arguments
        created = distributed.on_main(open_folder, folder, resume, overwrite)
        base, metric = _base(raw), cfg.training.best_metric
        direction: Direction = "minimize" if metric in LOWER_IS_BETTER else "maximize"
        record = {"config": base, "space": {k: p.model_dump() for k, p in parsed.items()}}
        left, done = distributed.on_main(open_study, folder, direction, trials, resume, record)
        search = Search(base, parsed, str(space), data, vocabulary_texts(data.train), folder, metric)
        driver = StudyTrainer(search, training_arguments(cfg, family, folder, has_valid=False))  # ranks, devices
        sampler_seed = (cfg.training.seed if seed is None else seed) + done  # a resumed search draws new values
        log.info("tune: %d trial(s) to run in %s, %s valid %s", left, folder, direction, metric)
        try:
            if left:
                _search(driver, left, done, direction, folder, sampler_seed, pruner)
        except KeyboardInterrupt:
            raise Interrupted(
                f"finished trials are kept in {folder / STUDY_FILE}; continue with the same command and --resume"
            ) from None
        return distributed.on_main(write_results, folder, base, list(parsed), metric, direction, created)


def _base(raw: dict[str, Any]) -> dict[str, Any]:
    """The base config a trial starts from: the user's raw config (so that defaults filled in by the schema
    follow the trial's values), without `training.output_dir` (trials train in the tune folder)."""
    base = json.loads(json.dumps(raw, default=str))
    if isinstance(base.get("training"), dict):
        base["training"].pop("output_dir", None)
    return base


def _search(driver: StudyTrainer, n: int, done: int, direction: Direction, folder: Path, seed: int, pruner: Any) -> None:
    """The Trainer's search with Optuna for `n` more trials after `done` (rank 0 samples and prunes; under
    torchrun the other ranks follow)."""
    import optuna

    if isinstance(pruner, str):
        pruner = optuna.pruners.MedianPruner() if pruner == "median" else optuna.pruners.NopPruner()
    try:
        driver.hyperparameter_search(
            hp_space=driver.search.suggest,
            compute_objective=driver.search.objective,
            n_trials=n,
            direction=direction,
            backend="optuna",
            study_name=STUDY_NAME,
            storage=storage(folder),
            load_if_exists=True,
            sampler=optuna.samplers.TPESampler(seed=seed),
            pruner=pruner,
        )
    except ValueError:
        # After its last trial hyperparameter_search asks the study for the best one, and there is none when no
        # trial finished (`write_results` says so); a ValueError before that, or with a finished trial, is another one.
        trials = optuna.load_study(study_name=STUDY_NAME, storage=storage(folder)).trials
        if len(trials) < done + n or any(t.state == optuna.trial.TrialState.COMPLETE for t in trials):
            raise


class StudyTrainer(Trainer):
    """The Trainer whose `hyperparameter_search` runs the study. It trains no model of its own: `train(trial)`
    trains that trial's own Trainer (`Search.run_trial`) and keeps its value as `objective`, which is what
    `hyperparameter_search` hands to Optuna."""

    def __init__(self, search: Search, args: TrainingArguments) -> None:
        # `hyperparameter_search` requires a `model_init` (it rebuilds the model per trial through it), and
        # `Trainer.__init__` calls it once without a trial. Here each trial builds its model, loss and Trainer
        # from its config, so this one only makes the stand-in that the Trainer holds and never trains.
        super().__init__(model_init=_stand_in, args=args)
        self.search = search
        self.objective: float | None = None

    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None, ignore_keys_for_eval: Any = None) -> Any:
        self.objective = self.search.run_trial(trial)


def _stand_in() -> Any:
    return nn.Linear(1, 1)


class TrialTrainer(ClassifierTrainer):
    """A trial's Trainer (the one `build_trainer` makes for the trial's config), in the search's mode: each
    validation is reported to the study, numbered by evaluation (1, 2, ...) rather than optimizer step, so
    that trials of other batch sizes compare at the same point; under torchrun every rank stops a pruned
    trial together (the Trainer's own report prunes on rank 0 alone, and the others would wait for it in
    their next all-reduce). `objective`: the trial's value so far."""

    evaluations = 0
    objective: float | None = None

    def _report_to_hp_search(self, trial: Any, step: int, metrics: dict[str, float]) -> None:
        if self.hp_search_backend is None or trial is None:
            return
        import optuna

        value = self.compute_objective(metrics)
        self.evaluations += 1
        keep_best = self.args.load_best_model_at_end and self.objective is not None
        better = max if self.args.greater_is_better else min
        self.objective = better(self.objective, value) if keep_best else value
        last = self.state.global_step >= self.state.max_steps  # the trial is done: nothing left to save
        if distributed.on_main(_report, trial, value, self.evaluations, last):
            self.callback_handler.on_train_end(self.args, self.state, self.control)
            metric = self.args.metric_for_best_model
            raise optuna.TrialPruned(f"pruned at evaluation {self.evaluations} (valid {metric} {value:.4f})")


def _report(trial: optuna.Trial, value: float, evaluation: int, last: bool) -> bool:
    """Rank 0: one evaluation reported to the study; whether its pruner stops the trial."""
    trial.report(value, evaluation)
    return not last and trial.should_prune()


def _no_checkpoints(trial: Any) -> dict[str, Any]:
    """A trial's TrainingArguments changes (the Trainer's `hp_space` hook): its values are in its config
    already; it only saves no checkpoints (the value is read from its evaluations, the model dropped)."""
    return {"save_strategy": "no"}


@dataclass
class Search:
    """What every trial shares: the base config, the space, the data read once, and the tune folder."""

    base: dict[str, Any]
    space: dict[str, Param]
    space_source: str
    data: PreparedData
    vocabulary: list[str]
    folder: Path
    metric: str

    def suggest(self, trial: Any) -> dict[str, Any]:
        """The trial's values (Optuna samples them on rank 0; a FixedTrial repeats them on the others)."""
        return {key: param.suggest(trial, key) for key, param in self.space.items()}

    def objective(self, metrics: dict[str, float]) -> float:
        return float(metrics[f"eval_{self.metric}"])

    def run_trial(self, trial: Any) -> float:
        """Train one trial and return its value; NaN marks a failed trial (one whose values make no valid
        config, or out of GPU memory), which the study records as failed and the search goes past."""
        import optuna

        values = self.suggest(trial)
        number = trial.number
        log.info("trial %d: %s", number, ", ".join(f"{k}={_shown(v)}" for k, v in values.items()))
        trainer: TrialTrainer | None = None
        try:
            trainer = self._trainer(trial_config(self.base, values, self.space_source), number)
            trainer.train(trial=trial)
            value = trainer.objective if trainer.objective is not None else self.objective(trainer.evaluate())
        except optuna.TrialPruned as pruned:
            log.info("trial %d: %s", number, pruned)
            if distributed.is_main_process():
                raise
            return math.nan
        except (UserError, torch.OutOfMemoryError) as err:
            if isinstance(err, torch.OutOfMemoryError) and distributed.active():
                raise  # another rank may be mid-step: no way to go on together
            message = " ".join(str(err).split())
            log.warning("trial %d failed: %s", number, message)
            trial.set_user_attr(FAILED, message[:500])
            return math.nan
        except KeyboardInterrupt:
            trial.set_user_attr(FAILED, "stopped by Ctrl-C")
            raise
        finally:
            trainer = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if distributed.is_main_process():
                shutil.rmtree(self._trial_dir(number) / CHECKPOINTS_DIR, ignore_errors=True)
                with suppress(OSError):
                    self._trial_dir(number).rmdir()  # kept when it holds TensorBoard logs
        log.info("trial %d: valid %s %.4f%s", number, self.metric, value, _best_so_far(trial, value))
        return value

    def _trial_dir(self, number: int) -> Path:
        return self.folder / TRIAL_DIR.format(number)

    def _trainer(self, cfg: Config, number: int) -> TrialTrainer:
        """The trial's Trainer: what `textclass train` builds for this config (a fresh seeded model, its loss,
        the tokenized splits, every trick), in the search's mode."""
        family = get_family(cfg.model.family)
        resolve_defaults(cfg, family)
        model, loss = build_model(cfg, family, self.data, self.vocabulary)
        distributed.check_sparse_gradients(model.network, distributed.backend())
        with distributed.main_process_first():  # rank 0 writes the tokenization cache, the others read it
            train_ds, valid_ds = tokenize(model, self.data.train), tokenize(model, self.data.valid)
        output_dir = self._trial_dir(number) / CHECKPOINTS_DIR
        trainer = build_trainer(model, train_ds, valid_ds, output_dir, loss, trainer_class=TrialTrainer)
        assert isinstance(trainer, TrialTrainer)
        trainer.hp_search_backend = HPSearchBackend.OPTUNA  # type: ignore[assignment]
        trainer.hp_space = _no_checkpoints
        trainer.compute_objective = self.objective
        return trainer


def _shown(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _best_so_far(trial: Any, value: float) -> str:
    """How this value stands against the study's best (rank 0, whose trial knows its study)."""
    study = getattr(trial, "study", None)
    try:
        best = study.best_trial if study is not None else None
    except ValueError:  # no finished trial yet
        return " (the first finished trial)"
    if best is None:
        return ""
    minimize = study.direction.name == "MINIMIZE"  # type: ignore[union-attr]
    if (value < best.value) if minimize else (value > best.value):
        return f" (new best; was {best.value:.4f}, trial {best.number})"
    return f" (best so far {best.value:.4f}, trial {best.number})"
