"""A global batch in tokens: the derivation of accumulation and steps, its errors, and the same
optimization on 1 or 2 processes when the global batch is equal."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    TINY_MODEL,
    TINY_RUN,
    assert_runs_agree,
    compose_config,
    global_batch_overrides,
    run_cli,
    succeeded,
)
from omegaconf import OmegaConf

from lmforge.data.windows import TrainWindows
from lmforge.errors import ConfigError
from lmforge.training.batching import plan_batches, planned_data_parallel_size, planned_world_size
from lmforge.training.run import check_run


def test_accumulation_is_derived_for_the_number_of_processes():
    plan = plan_batches(
        1024, None, micro_batch_tokens=128, data_parallel_size=2, accumulate_grad_batches=1, max_steps=600
    )
    assert (plan.accumulate_grad_batches, plan.max_steps, plan.global_batch_tokens) == (4, 600, 1024)
    on_one = plan_batches(
        1024, None, micro_batch_tokens=128, data_parallel_size=1, accumulate_grad_batches=1, max_steps=600
    )
    assert on_one.accumulate_grad_batches == 8
    described = "1024 tokens = 128 tokens per micro-batch x 2 data-parallel process(es) x 4 accumulation step(s)"
    assert described in plan.describe()


def test_a_token_budget_sets_the_number_of_steps():
    plan = plan_batches(
        1024, 10_000, micro_batch_tokens=128, data_parallel_size=2, accumulate_grad_batches=1, max_steps=600
    )
    assert plan.max_steps == 9  # 10_000 // 1024
    without_global = plan_batches(
        None, 1000, micro_batch_tokens=100, data_parallel_size=1, accumulate_grad_batches=2, max_steps=5
    )
    assert (without_global.accumulate_grad_batches, without_global.max_steps) == (2, 5)


@pytest.mark.parametrize(
    "args,message",
    [
        ((1000, None, 128, 2, 1), r"global_batch_tokens=1000 is not a multiple of the 256 tokens .* use 768 or 1024"),
        ((100, None, 128, 2, 1), r"use 256 or 512"),
        ((1024, None, 128, 2, 2), r"sets trainer.accumulate_grad_batches itself; remove .*=2"),
        ((1024, 512, 128, 2, 1), r"max_tokens=512 is less than one optimizer step of 1024 tokens"),
    ],
)
def test_plans_that_do_not_divide_are_one_line_with_the_nearest_values(args, message):
    global_tokens, max_tokens, micro, world, accumulate = args
    with pytest.raises(ConfigError, match=message):
        plan_batches(global_tokens, max_tokens, micro, world, accumulate, max_steps=10)


@pytest.mark.parametrize(
    "settings,expected",
    [
        ({"devices": 2, "num_nodes": 3}, 6),
        ({"devices": "4", "num_nodes": 1}, 4),
        ({"devices": [0, 1], "num_nodes": 2}, 4),
        ({"devices": "0,1,2", "num_nodes": 1}, 3),
        ({"devices": "auto", "num_nodes": 1, "accelerator": "cpu"}, 1),
    ],
)
def test_planned_world_size(settings, expected, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert planned_world_size(OmegaConf.create(settings)) == expected
    monkeypatch.setenv("WORLD_SIZE", "8")  # a launched process knows the job's size
    assert planned_world_size(OmegaConf.create(settings)) == 8


@pytest.mark.parametrize(
    "settings,expected",
    [
        ({"devices": 4, "strategy": {"tensor_parallel_size": 2}}, 2),  # 2 x 2 mesh
        ({"devices": 4, "num_nodes": 2, "strategy": {"tensor_parallel_size": "auto"}}, 2),  # one group per node
        ({"devices": 4, "strategy": {"_target_": "DDPStrategy"}}, 4),
        ({"devices": 4, "strategy": "fsdp", "tensor_parallel_size": 4}, 1),  # the own loop: one flat setting
        ({"devices": 4, "strategy": "ddp", "tensor_parallel_size": 4}, 4),  # only fsdp splits layers
    ],
)
def test_a_tensor_parallel_group_counts_once_in_the_global_batch(settings, expected, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert planned_data_parallel_size(OmegaConf.create(settings)) == expected


def test_equal_global_batches_draw_the_same_windows_on_one_or_two_processes():
    tokens = torch.arange(5000).numpy()
    alone = TrainWindows(tokens, 16, 4, seed=3, rank=0, world_size=1)
    pair = [TrainWindows(tokens, 16, 4, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for step in range(3):  # 1 process x 2 accumulation steps == 2 processes x 1
        for rank in (0, 1):
            torch.testing.assert_close(alone[2 * step + rank], pair[rank][step], rtol=0, atol=0)
    assert not torch.equal(pair[0][0][0], pair[1][0][0])  # ranks see different windows


def test_check_run_applies_the_plan_and_prints_it(corpus_dir, tmp_path, capsys):
    overrides = ["data=text_files", f"data.path={corpus_dir}", *TINY_RUN]  # batch 8 x block 32 = 256 tokens
    cfg = compose_config("train", [*overrides, "data.global_batch_tokens=1024", "trainer.max_tokens=5000"], tmp_path)
    check_run(cfg, "train")
    assert (cfg.trainer.accumulate_grad_batches, cfg.trainer.max_steps) == (4, 4)
    assert "max_tokens" not in cfg.trainer
    described = "global batch 1024 tokens = 256 tokens per micro-batch x 1 data-parallel process(es) x 4"
    assert described in capsys.readouterr().out
    bad = compose_config("train", [*overrides, "data.global_batch_tokens=1000"], tmp_path)
    with pytest.raises(ConfigError, match="use 768 or 1024"):
        check_run(bad, "train")


@pytest.mark.slow
@pytest.mark.parametrize("model", list(TINY_MODEL))
def test_one_and_two_processes_give_the_same_losses_and_weights_for_the_same_global_batch(model, corpus_dir, tmp_path):
    """1 process x 2 accumulation steps and 2 DDP processes x 1, fp32: validation losses and the
    final weights agree within 1e-5. (The Trainer counts val_check_interval in micro-batches.) Each
    process computes with one thread, as each DDP rank of 2 does on 2 cores: kernels with another
    thread count sum in another order, and Adam's first steps magnify those last-bit differences."""
    common = global_batch_overrides(corpus_dir, model, tmp_path / "data")
    one = [*common, "trainer.val_check_interval=4", f"paths.log_dir={tmp_path}/one"]
    two = [*common, "trainer=ddp_sim", "trainer.val_check_interval=2", f"paths.log_dir={tmp_path}/two"]
    assert succeeded(run_cli("train", *one, env={"OMP_NUM_THREADS": "1"}))
    assert succeeded(run_cli("train", *two, env={"OMP_NUM_THREADS": "1"}))
    assert_runs_agree(tmp_path / "one", tmp_path / "two", min_validations=4)
