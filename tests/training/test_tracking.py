"""Experiment trackers (`training.report_to`): the Trainer logs to them, and the run directory is unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import tiny_config
from textclass import train

pytest.importorskip("mlflow")


def _files(run_dir: Path) -> set[str]:
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()}


def test_mlflow_offline_file_store_gets_the_curves_and_the_run_directory_is_unchanged(
    tiny_bert: Path, toy_files: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses a file store without it
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "textclass-test")
    mlflow.set_tracking_uri(store.as_uri())  # the Trainer's callback reads the variable only while no URI is set in-process
    plain = train(tiny_config(tiny_bert, toy_files, tmp_path / "plain", epochs=2, precision="fp32"))
    tracked = train(tiny_config(tiny_bert, toy_files, tmp_path / "tracked", epochs=2, precision="fp32", report_to=["mlflow", "tensorboard"]))

    assert _files(tracked.run_dir) - _files(plain.run_dir) == {p for p in _files(tracked.run_dir) if p.startswith("tensorboard/")}
    assert any(p.startswith("tensorboard/") for p in _files(tracked.run_dir))  # TensorBoard writes into the run directory
    for split in ("valid", "test"):
        assert tracked.metrics[split] == plain.metrics[split]  # the same run, tracked or not
    assert json.loads((tracked.run_dir / "metrics.json").read_text()).keys() == json.loads((plain.run_dir / "metrics.json").read_text()).keys()

    mlflow.set_tracking_uri(store.as_uri())
    runs = mlflow.search_runs(experiment_names=["textclass-test"], output_format="list")
    assert len(runs) == 1 and runs[0].info.run_name == "tracked"
    client = mlflow.MlflowClient(store.as_uri())
    evals = client.get_metric_history(runs[0].info.run_id, "eval_accuracy")
    history = [h for h in json.loads((tracked.run_dir / "training_log.json").read_text()) if "eval_accuracy" in h]
    assert [m.value for m in sorted(evals, key=lambda m: m.step)] == pytest.approx([h["eval_accuracy"] for h in history])
    assert runs[0].data.params["learning_rate"] == "0.003"


def test_tune_logs_one_tracker_run_per_trial(tiny_bert: Path, toy_files: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow
    import yaml

    from textclass import tune

    store = (tmp_path / "mlruns").as_uri()
    for key, value in {"MLFLOW_TRACKING_URI": store, "MLFLOW_ALLOW_FILE_STORE": "true", "MLFLOW_DISABLE_TELEMETRY": "true",
                       "MLFLOW_EXPERIMENT_NAME": "tune-test"}.items():
        monkeypatch.setenv(key, value)
    mlflow.set_tracking_uri(store)  # (as above: an earlier test in this process set another store)
    (tmp_path / "space.yaml").write_text(yaml.safe_dump({"training.learning_rate": {"type": "float", "low": 1e-3, "high": 5e-3}}))
    cfg = tiny_config(tiny_bert, toy_files, tmp_path / "unused", epochs=1, precision="fp32", report_to=["mlflow"])
    tune(cfg, tmp_path / "space.yaml", trials=2, output=tmp_path / "tune", pruner="none")
    mlflow.set_tracking_uri(store)
    runs = mlflow.search_runs(experiment_names=["tune-test"], output_format="list")
    assert sorted(r.info.run_name for r in runs) == ["trial-0", "trial-1"]
    rates = sorted(float(r.data.params["learning_rate"]) for r in runs)
    assert len(set(rates)) == 2 and all(1e-3 <= r <= 5e-3 for r in rates)  # each trial's own values
    assert all(r.info.status == "FINISHED" for r in runs)
