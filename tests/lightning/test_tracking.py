"""Experiment tracking and sweeps with the Trainer: several loggers at once (TensorBoard, Weights &
Biases offline, MLflow in a local store) and an Optuna search that minimises val/loss."""

from __future__ import annotations

import mlflow
import pytest
import yaml
from helpers import DEFAULT_MODEL, run_cli, succeeded, tiny_train_overrides

pytestmark = pytest.mark.slow


def tiny(corpus_dir, tmp_path) -> list[str]:
    paths = [f"paths.log_dir={tmp_path}/logs", f"paths.data_dir={tmp_path}/data"]
    return [*tiny_train_overrides(corpus_dir, DEFAULT_MODEL, "test=false"), *paths]


def test_tensorboard_wandb_offline_and_mlflow_at_once(corpus_dir, tmp_path):
    overrides = ["logger=[tensorboard,wandb,mlflow]", *tiny(corpus_dir, tmp_path)]
    result = run_cli("train", *overrides, env={"WANDB_SILENT": "true"})
    assert succeeded(result)
    (run_dir,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))

    (wandb_run,) = (run_dir / "wandb").glob("offline-run-*")  # no account, no network
    (records,) = wandb_run.glob("run-*.wandb")
    written = records.read_bytes()
    assert b"train/loss" in written and b"val/loss" in written

    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path}/logs/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("train").experiment_id])
    assert run.info.status == "FINISHED"
    assert {"train/loss", "val/loss", "val/ppl"} <= set(run.data.metrics)
    assert run.data.params["model/n_layer"] == "1" and any(key.startswith("optimizer/") for key in run.data.params)
    history = client.get_metric_history(run.info.run_id, "val/loss")
    assert [m.step for m in history] == [5, 11]  # validation after steps 6 and 12, counted from 0


def test_optuna_sweep_of_three_trials_reports_the_best(corpus_dir, tmp_path):
    overrides = [
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.sampler.n_startup_trials=2",
        "logger=csv",
        *tiny(corpus_dir, tmp_path),
    ]
    assert succeeded(run_cli("train", *overrides))
    (sweep_dir,) = (tmp_path / "logs" / "train" / "multiruns").iterdir()
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    trials = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in trials] == ["0", "1", "2"]
    final_val_losses = []
    for trial in trials:
        rows = (trial / "csv" / "metrics.csv").read_text().splitlines()
        header = rows[0].split(",")
        column = header.index("val/loss")
        final_val_losses.append([float(r.split(",")[column]) for r in rows[1:] if r.split(",")[column]][-1])
        assert (trial / ".hydra" / "overrides.yaml").is_file()
    assert results["best_value"] == pytest.approx(min(final_val_losses), abs=1e-6)
    # model.dropout is searched too unless the command line fixes it (some tiny models' overrides do)
    assert {"optimizer.lr", "optimizer.weight_decay"} <= set(results["best_params"])
