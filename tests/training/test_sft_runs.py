"""Fine-tuning runs on task data (data=sft): the Trainer resumes exactly, and DDP matches one process."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    DEFAULT_MODEL,
    FINE_TUNING_EXPERIMENTS,  # [gpt]
    SHORT_FINE_TUNING,  # [gpt]
    assert_runs_agree,
    compose_config,
    csv_values,
    read_csv_metric,
    run_cli,
    succeeded,
    tiny_sft_overrides,
    write_task_data,
)

from lmforge.cli.train import train
from lmforge.training.checkpoint import read_network

RESUMABLE = [
    "trainer.max_steps=8",
    "trainer.accumulate_grad_batches=2",
    "trainer.log_every_n_steps=1",
    "test=false",
]


@pytest.fixture(scope="module")
def task_file(tmp_path_factory):
    return write_task_data(tmp_path_factory.mktemp("tasks") / "qa.jsonl")


def test_trainer_resumes_exactly_on_task_data(tmp_path, task_file):
    common = [
        *tiny_sft_overrides(task_file, DEFAULT_MODEL, *RESUMABLE),
        "logger=csv",
        "callbacks.periodic_checkpoint.every_n_train_steps=4",
        "callbacks.periodic_checkpoint.save_top_k=-1",
    ]
    train(compose_config("train", common, tmp_path / "full"))
    step4 = tmp_path / "full" / "run" / "checkpoints" / "periodic-step000004.ckpt"
    train(compose_config("train", [*common, f"ckpt_path={step4}"], tmp_path / "resumed"))
    full = read_csv_metric(tmp_path / "full" / "run", "train/loss")
    resumed = read_csv_metric(tmp_path / "resumed" / "run", "train/loss")
    assert sorted(resumed) == list(range(4, 8))
    for step in resumed:
        assert resumed[step] == pytest.approx(full[step], abs=1e-6), step
    weights = [
        read_network(d / "run" / "checkpoints" / "last.ckpt").weights for d in (tmp_path / "full", tmp_path / "resumed")
    ]
    for name, tensor in weights[0].items():
        torch.testing.assert_close(weights[1][name], tensor, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_one_and_two_processes_fine_tune_alike_for_the_same_global_batch(task_file, tmp_path):
    """1 process x 2 accumulation steps and 2 DDP processes x 1 give the same validation losses and
    weights within 1e-5 (fp32, one thread each: see test_batching's test of the same for corpora),
    though their micro-batches hold different numbers of answer tokens, and the same task scores."""
    common = [
        *tiny_sft_overrides(task_file, DEFAULT_MODEL),
        "data.global_batch_tokens=512",  # 2 micro-batches of 8 examples x block 32
        "trainer.max_steps=6",
        "logger=csv",
        "test=false",
        f"paths.data_dir={tmp_path}/data",
    ]
    one = [*common, "trainer.val_check_interval=6", f"paths.log_dir={tmp_path}/one"]
    two = [*common, "trainer=ddp_sim", "trainer.val_check_interval=3", f"paths.log_dir={tmp_path}/two"]
    assert succeeded(run_cli("train", *one, env={"OMP_NUM_THREADS": "1"}))
    assert succeeded(run_cli("train", *two, env={"OMP_NUM_THREADS": "1"}))
    assert_runs_agree(tmp_path / "one", tmp_path / "two")
    # the task scores gather every process's answers: the same sample scored as one process does
    assert csv_values(tmp_path / "one", "val/chrf") == csv_values(tmp_path / "two", "val/chrf")


# [gpt]
@pytest.mark.slow
@pytest.mark.parametrize("experiment", list(FINE_TUNING_EXPERIMENTS))
def test_fine_tuning_experiments_train_under_ddp(experiment, tmp_path):
    overrides = [f"experiment={experiment}", *FINE_TUNING_EXPERIMENTS[experiment](tmp_path), *SHORT_FINE_TUNING]
    paths = [f"paths.log_dir={tmp_path}/logs", f"paths.data_dir={tmp_path}/data"]
    result = run_cli("train", *overrides, *paths, "trainer=ddp_sim")
    assert succeeded(result)
    assert "test/chrf" in result.stdout and "test/exact_match" in result.stdout


# [/gpt]
