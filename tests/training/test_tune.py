"""`textclass tune`: each trial trains its own config, bad trials are pruned (under torchrun too, every rank
together), the results (trials.csv, trials.png, best.yaml) and --resume, and every mistake is one line
before anything trains.

The searches are tiny: a 2-layer BERT on 48 texts, two trials whose learning rates are a good one and a
diverging one (5.0), in that order (`_seed_drawing` finds the sampler seed that draws them so).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import pandas as pd
import pytest
import torch
import yaml
from conftest import make_texts, tiny_config

import textclass
from textclass import train, tune
from textclass.config import load_config
from textclass.errors import UserError
from textclass.training import tune as tune_module
from textclass.training.space import read_space
from textclass.training.tune import TrialTrainer, check_tune
from textclass.training.tune_folder import format_trials

GOOD, BAD = 1e-3, 5.0
SPACE = {
    "training.learning_rate": {"type": "categorical", "choices": [GOOD, BAD]},
    "model.dropout": {"type": "float", "low": 0.0, "high": 0.3},
    "training.label_smoothing": {"type": "float", "low": 0.0, "high": 0.2},
}
TIMEOUT = 300
SRC = str(Path(textclass.__file__).resolve().parents[1])


def _seed_drawing(space: Path, *rates: float) -> int:
    """A seed for which the search's sampler (TPE, seeded, random for its first trials) draws these learning
    rates in this order, the space's keys suggested as the search suggests them."""
    params = read_space(space)
    for seed in range(200):
        study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))
        drawn = []
        for _ in rates:
            trial = study.ask()
            drawn.append({k: p.suggest(trial, k) for k, p in params.items()}["training.learning_rate"])
            study.tell(trial, 0.0)
        if drawn == list(rates):
            return seed
    raise AssertionError(f"no seed draws {rates}")


def _world(tiny_bert: Path, root: Path) -> tuple[dict[str, Any], Path]:
    files = {}
    for split, (n, seed) in {"train": (48, 10), "valid": (15, 11)}.items():
        files[split] = root / f"{split}.csv"
        make_texts(n, seed).to_csv(files[split], index=False)
    cfg = tiny_config(tiny_bert, files, root / "unused", epochs=2, best_metric="loss", learning_rate=GOOD)
    cfg["model"]["max_length"] = 16
    (root / "base.yaml").write_text(yaml.safe_dump(cfg))
    (root / "space.yaml").write_text(yaml.safe_dump(SPACE, sort_keys=False))
    return cfg, root / "space.yaml"


def _recorder(records: dict[str, dict]) -> Any:
    """`Search._trainer` that also notes what the trial's Trainer trains: its network's head dropout, its
    loss's smoothing, its learning rate, and a checksum of the initial weights."""
    build = tune_module.Search._trainer

    def wrapped(self: Any, cfg: Any, number: int) -> TrialTrainer:
        trainer = build(self, cfg, number)
        net = trainer.model
        records[f"rank{os.environ.get('RANK', '0')}-trial{number}"] = {
            "dropout": net.dropout.p,
            "label_smoothing": trainer.loss_fn.smoothing,
            "learning_rate": trainer.args.learning_rate,
            "weights": float(sum(p.detach().double().sum() for p in net.parameters())),
        }
        return trainer

    return wrapped


@pytest.fixture(scope="module")
def tuned(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two trials (good learning rate, then the diverging one) with a median pruner that needs one
    finished trial, so the second is pruned at its first evaluation."""
    root = tmp_path_factory.mktemp("tune")
    cfg, space = _world(tiny_bert, root)
    seed = _seed_drawing(space, GOOD, BAD)
    records: dict[str, dict] = {}
    mp = pytest.MonkeyPatch()
    mp.setattr(tune_module.Search, "_trainer", _recorder(records))
    try:
        pruner = optuna.pruners.MedianPruner(n_startup_trials=1)
        result = tune(root / "base.yaml", space, 2, output=root / "out", seed=seed, pruner=pruner)
    finally:
        mp.undo()
    return {"root": root, "cfg": cfg, "space": space, "seed": seed, "result": result, "records": records}


def test_each_trial_trains_its_own_config(tuned: dict[str, Any]) -> None:
    """Model, loss and TrainingArguments keys all reach the trial's Trainer; every trial starts from the same
    seeded initial weights."""
    trials = pd.read_csv(tuned["result"].folder / "trials.csv").to_dict("records")
    assert [t["number"] for t in trials] == [0, 1]
    assert [t["training.learning_rate"] for t in trials] == [GOOD, BAD]
    for t in trials:
        seen = tuned["records"][f"rank0-trial{t['number']}"]
        assert seen["dropout"] == pytest.approx(t["model.dropout"])
        assert seen["label_smoothing"] == pytest.approx(t["training.label_smoothing"])
        assert seen["learning_rate"] == t["training.learning_rate"]
    first, second = (tuned["records"][f"rank0-trial{n}"] for n in (0, 1))
    assert first["dropout"] != second["dropout"] and first["label_smoothing"] != second["label_smoothing"]
    assert first["weights"] == second["weights"]


def test_a_diverging_trial_is_pruned_and_marked(tuned: dict[str, Any]) -> None:
    result = tuned["result"]
    trials = pd.read_csv(result.folder / "trials.csv")
    assert trials["state"].tolist() == ["COMPLETE", "PRUNED"]
    assert trials["evaluations"].tolist() == [2, 1]  # stopped at its first of two evaluations
    assert trials.loc[1, "value"] > 3 * trials.loc[0, "value"]  # the pruned trial's last report: diverged
    assert result.best_trial == 0 and result.best_value == pytest.approx(trials.loc[0, "value"])
    table = format_trials(result)
    assert "PRUNED" in table and "COMPLETE" in table and "loss (lower is better)" in table
    assert (result.folder / "trials.png").stat().st_size > 1000
    # nothing of the trials' Trainers is left: no checkpoints, no trial folders
    assert sorted(p.name for p in result.folder.iterdir()) == ["best.yaml", "study.db", "trials.csv", "trials.png"]


def test_best_yaml_is_the_best_trial_and_trains(tuned: dict[str, Any], tmp_path: Path) -> None:
    result = tuned["result"]
    best = yaml.safe_load((result.folder / "best.yaml").read_text())
    assert "output_dir" not in best["training"]
    assert best["training"]["learning_rate"] == GOOD
    assert best["model"]["dropout"] == result.best_params["model.dropout"]
    assert best["training"]["label_smoothing"] == result.best_params["training.label_smoothing"]
    cfg = load_config(result.folder / "best.yaml", ["training.epochs=1", f"training.output_dir={tmp_path / 'run'}"])
    run = train(cfg)
    saved = yaml.safe_load((run.run_dir / "config.yaml").read_text())
    assert saved["model"]["dropout"] == pytest.approx(result.best_params["model.dropout"])


def test_resume_adds_trials_and_the_cli_prints_the_table(tuned: dict[str, Any]) -> None:
    from test_cli import run

    root, folder = tuned["root"], tuned["result"].folder
    base = ["tune", "-c", root / "base.yaml", "--space", tuned["space"], "-o", folder, "--seed", tuned["seed"]]
    again = run(*base, "--trials", 2)
    assert again.returncode == 2 and "already holds a finished tune; pass --overwrite" in again.stderr
    more = run(*base, "--trials", 3, "--resume")
    assert more.returncode == 0, more.stderr[-3000:]
    assert "trials: valid loss" in more.stdout and f"best config: {folder / 'best.yaml'}" in more.stdout
    trials = pd.read_csv(folder / "trials.csv")
    assert trials["number"].tolist() == [0, 1, 2]
    assert trials.loc[2, "model.dropout"] not in trials.loc[:1, "model.dropout"].tolist()  # new draws, not a replay
    (root / "other.yaml").write_text(yaml.safe_dump({**SPACE, "training.weight_decay": {"type": "float", "low": 0, "high": 1}}))
    with pytest.raises(UserError, match="another base config or search space"):
        tune(root / "base.yaml", root / "other.yaml", 4, output=folder, resume=True)
    assert len(pd.read_csv(folder / "trials.csv")) == 3


class _Trial:
    """An Optuna trial stand-in: records the reports, prunes when told."""

    def __init__(self, prune: bool) -> None:
        self.prune, self.reports = prune, []

    def report(self, value: float, step: int) -> None:
        self.reports.append((value, step))

    def should_prune(self) -> bool:
        return self.prune


def _reporting_trainer(keep_best: bool) -> TrialTrainer:
    trainer = TrialTrainer.__new__(TrialTrainer)  # only what the report reads
    trainer.hp_search_backend = "optuna"
    trainer.compute_objective = lambda metrics: metrics["eval_macro_f1"]
    trainer.args = SimpleNamespace(load_best_model_at_end=keep_best, greater_is_better=True, metric_for_best_model="macro_f1")
    trainer.state = SimpleNamespace(global_step=0, max_steps=30)
    trainer.callback_handler = SimpleNamespace(on_train_end=lambda *args: None)
    trainer.control = None
    return trainer


@pytest.mark.parametrize(("keep_best", "expected"), [(True, 0.8), (False, 0.6)])
def test_trial_value_is_the_kept_evaluation(keep_best: bool, expected: float) -> None:
    """The best evaluation when the run keeps its best checkpoint, else the last; reported by evaluation
    number, not optimizer step."""
    trainer, trial = _reporting_trainer(keep_best), _Trial(prune=False)
    for step, value in zip((10, 20, 30), (0.5, 0.8, 0.6), strict=True):
        trainer.state.global_step = step
        trainer._report_to_hp_search(trial, step, {"eval_macro_f1": value})
    assert trainer.objective == expected
    assert trial.reports == [(0.5, 1), (0.8, 2), (0.6, 3)]


def test_pruning_stops_a_trial_but_never_at_its_last_evaluation() -> None:
    trainer, trial = _reporting_trainer(False), _Trial(prune=True)
    trainer.state.global_step = 30  # the last evaluation: the trial is done, its value counts
    trainer._report_to_hp_search(trial, 30, {"eval_macro_f1": 0.4})
    trainer, trial = _reporting_trainer(False), _Trial(prune=True)
    trainer.state.global_step = 10
    with pytest.raises(optuna.TrialPruned, match="evaluation 1 .valid macro_f1 0.4000"):
        trainer._report_to_hp_search(trial, 10, {"eval_macro_f1": 0.4})


# -- mistakes: one line naming the file and key, before anything trains ---------------------------------------------
SPACE_OK = "training.epochs: {type: int, low: 1, high: 2}"


@pytest.mark.parametrize(
    ("space", "request_", "words"),
    [
        (None, {}, ("nope.yaml", "search space file not found")),
        ("training.learning_rate: {type: float, low: 1", {}, ("space.yaml", "not valid YAML")),
        ("- training.learning_rate", {}, ("space.yaml", "must be a mapping of dotted config keys")),
        ("", {}, ("space.yaml", "empty")),
        ("training.lr: {type: float, low: 0.1, high: 0.2}", {}, ("space.yaml", "training.lr", "unknown key")),
        ("learning_rate: {type: float, low: 0.1, high: 0.2}", {}, ("space.yaml", "`learning_rate`", "dotted config keys")),
        ("training.learning_rate: {type: float, low: 0.1}", {}, ("space.yaml", "training.learning_rate", "`high` is missing")),
        ("training.learning_rate: {type: gauss, low: 0, high: 1}", {}, ("space.yaml", "float, int or categorical")),
        ("training.learning_rate: {type: float, low: 0.2, high: 0.1}", {}, ("space.yaml", "low 0.2 is above high 0.1")),
        ("training.learning_rate: {type: float, low: 0, high: 0.1, log: true}", {}, ("space.yaml", "log: true needs low > 0")),
        ("training.learning_rate: {type: float, low: 0.0, high: 0.1}", {}, ("space.yaml", "training.learning_rate: 0.0")),
        ("training.batch_size: {type: categorical, choices: [8, 8.5]}", {}, ("space.yaml", "training.batch_size", "integer")),
        ("training.loss: {type: categorical, choices: [ce, hinge]}", {}, ("space.yaml", "training.loss", "hinge")),
        ("training.epochs: 3", {}, ("space.yaml", "training.epochs", "must be a mapping with `type`")),
        ("data.valid_ratio: {type: float, low: 0.1, high: 0.2}", {}, ("space.yaml", "data.valid_ratio", "read once")),
        ("training.best_metric: {type: categorical, choices: [loss]}", {}, ("training.best_metric", "objective")),
        ("training.num_threads: {type: int, low: 1, high: 2}", {}, ("training.num_threads", "a trial does not use it")),
        (SPACE_OK, {"training": {"kfold": 3}}, ("training.kfold",)),
        (SPACE_OK, {"training": {"deepspeed": "zero2"}}, ("training.deepspeed", "remove deepspeed")),
        (SPACE_OK, {"trials": 0}, ("--trials 0",)),
        (SPACE_OK, {"pruner": "hyperband"}, ("--pruner hyperband", "median")),
    ],
)
def test_mistakes_are_one_line_naming_file_and_key(tmp_path: Path, space: str | None, request_: dict, words: tuple) -> None:
    path = tmp_path / ("nope.yaml" if space is None else "space.yaml")
    if space is not None:
        path.write_text(space)
    raw = {"data": {"train": "t.csv"}, "training": request_.get("training", {})}
    with pytest.raises(UserError) as err:
        check_tune(raw, path, request_.get("trials", 5), request_.get("pruner", "median"))
    message = str(err.value)
    for word in words:
        assert word in message, message


def test_a_distill_section_is_refused(tmp_path: Path) -> None:
    (tmp_path / "space.yaml").write_text("training.epochs: {type: int, low: 1, high: 2}")
    with pytest.raises(UserError, match="distill: tune does not distil"):
        check_tune({"data": {"train": "t.csv"}, "distill": {"teachers": ["runs/x"]}}, tmp_path / "space.yaml", 5, "median")


def test_the_example_space_fits_the_demo_config() -> None:
    configs = Path(__file__).resolve().parents[2] / "configs"
    cfg, space = check_tune(yaml.safe_load((configs / "demo.yaml").read_text()), configs / "tune_space.yaml", 20, "median")
    assert "model.dropout" in space and cfg.training.best_metric == "macro_f1"


def test_no_finished_trial_is_one_line_and_leaves_nothing(tiny_bert: Path, tmp_path: Path) -> None:
    """Values that are valid alone but not together fail each trial (before any training); with no trial
    finished there is no best config: one line with the first failure's reason, the new folder removed."""
    cfg, _ = _world(tiny_bert, tmp_path)
    space = tmp_path / "clash.yaml"
    space.write_text(
        "model.dropout: {type: categorical, choices: [0.0]}\nmodel.multisample_dropout: {type: int, low: 4, high: 4}\n"
    )
    with pytest.raises(
        UserError, match=r"none of the 2 trial\(s\) finished \(2 fail\); the first failure: .*multisample_dropout"
    ):
        tune(cfg, space, 2, output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- torchrun ---------------------------------------------------------------------------------------------------------
TUNE_AND_RECORD = """
import json, os, sys
import optuna
sys.path[:0] = [sys.argv[2], os.path.dirname(sys.argv[2])]
from test_tune import _recorder
from textclass.training import tune as tune_module
records = {}
tune_module.Search._trainer = _recorder(records)
import textclass
root = sys.argv[1]
textclass.tune(os.path.join(root, "base.yaml"), os.path.join(root, "space.yaml"), 2, output=os.path.join(root, "out"),
               seed=int(sys.argv[3]), pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
with open(os.path.join(root, f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump(records, f)
"""


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="torch.distributed without gloo")
def test_torchrun_ranks_build_the_same_trials_and_prune_together(tiny_bert: Path, tmp_path: Path) -> None:
    """Two processes (gloo on CPU): each trial's values reach both ranks, which build the same model and
    loss; the diverging trial is pruned on both (a rank that went on training would wait for the other
    in its next all-reduce, and the run would time out)."""
    _, space = _world(tiny_bert, tmp_path)
    (tmp_path / "run.py").write_text(TUNE_AND_RECORD)
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if Path("/sys/class/net/lo").is_dir():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--local-addr",
        "127.0.0.1",
        "--nproc-per-node",
        "2",
    ]
    args = [str(tmp_path / "run.py"), str(tmp_path), str(Path(__file__).parent), str(_seed_drawing(space, GOOD, BAD))]
    done = subprocess.run([*command, *args], env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for n in (0, 1):
        assert ranks[0][f"rank0-trial{n}"] == ranks[1][f"rank1-trial{n}"]
    trials = pd.read_csv(tmp_path / "out" / "trials.csv")
    assert trials["state"].tolist() == ["COMPLETE", "PRUNED"]
    assert [ranks[1][f"rank1-trial{n}"]["dropout"] for n in (0, 1)] == pytest.approx(trials["model.dropout"].tolist())
