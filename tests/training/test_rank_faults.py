"""Distributed faults: the process-group timeout, a rank that dies or hangs, a signal to one rank."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from datetime import timedelta
from pathlib import Path

import pytest
from helpers import (
    DEFAULT_MODEL,
    assert_one_clear_error,
    compose_config,
    paths_in,
    start_cli,
    tiny_train_overrides,
    wait_for,
)
from hydra.utils import instantiate

from lmforge.training.batching import trainer_settings
from lmforge.training.checkpoint import read_checkpoint
from lmforge.training.safety import AtomicCheckpointIO


@pytest.mark.parametrize("strategy", ["ddp_sim", "fsdp"])
def test_process_group_timeout_comes_from_the_config(strategy, tmp_path):
    cfg = compose_config("train", [f"trainer={strategy}", "trainer.strategy.timeout.seconds=42"], tmp_path)
    trainer = instantiate(trainer_settings(cfg.trainer), logger=False, accelerator="cpu", devices=2)
    assert trainer.strategy._timeout == timedelta(seconds=42)
    if strategy == "ddp_sim":  # FSDP2 writes its sharded checkpoints through torch.distributed.checkpoint
        assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def child_pids(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def environ(pid: int) -> bytes:
    return Path(f"/proc/{pid}/environ").read_bytes()


def ddp_run_overrides(corpus_dir: Path, timeout_seconds: int) -> list[str]:
    """A long 2-process DDP run that checkpoints every 2 steps."""
    return tiny_train_overrides(
        corpus_dir,
        DEFAULT_MODEL,
        "trainer=ddp_sim",
        f"trainer.strategy.timeout.seconds={timeout_seconds}",
        "logger=csv",
        "trainer.max_steps=100000",
        "trainer.val_check_interval=1000",
        "callbacks.periodic_checkpoint.every_n_train_steps=2",
    )


def kill_process_tree(process: subprocess.Popen, known_children: tuple[int, ...] = ()) -> None:
    """Kill ``process``, its children, and ``known_children`` (a child whose parent has exited is
    no longer listed as its child, e.g. a stopped rank left behind by rank 0's timeout)."""
    children = set(known_children)
    if process.poll() is None:
        children.update(child_pids(process.pid))
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # also ends a stopped process
    process.kill()
    process.wait()


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["dies", "hangs"])
def test_a_rank_that_dies_or_hangs_ends_the_job_in_bounded_time(fault, corpus_dir, tmp_path):
    timeout = 20
    stderr_file = tmp_path / "stderr.txt"
    process = start_cli(stderr_file, "train", *ddp_run_overrides(corpus_dir, timeout), *paths_in(tmp_path), threads=1)
    rank1 = None
    try:
        wait_for(process, tmp_path, "logs/train/runs/*/checkpoints/periodic-*.ckpt", poll=0.1)  # both ranks train
        (rank1,) = [pid for pid in child_pids(process.pid) if b"\0LOCAL_RANK=1\0" in b"\0" + environ(pid)]
        os.kill(rank1, signal.SIGKILL if fault == "dies" else signal.SIGSTOP)
        faulted_at = time.monotonic()
        process.wait(timeout=timeout + 60)
        elapsed = time.monotonic() - faulted_at
    finally:
        kill_process_tree(process, known_children=(rank1,) if rank1 else ())
    stderr = stderr_file.read_text()
    assert process.returncode != 0, stderr[-3000:]
    assert elapsed < timeout + 30, elapsed
    if fault == "hangs":  # rank 0 waits for the process-group timeout, then says what happened in one line
        assert elapsed > timeout - 2, elapsed
        assert_one_clear_error(process.returncode, stderr, "rank 0: a collective operation failed (")


@pytest.mark.slow
def test_sigterm_to_one_rank_under_ddp_stops_every_rank_at_the_same_step(corpus_dir, tmp_path):
    """SIGTERM reaching rank 0 only (``kill``) stops both ranks after one step and saves one checkpoint."""
    stderr_file = tmp_path / "stderr.txt"
    process = start_cli(stderr_file, "train", *ddp_run_overrides(corpus_dir, 30), *paths_in(tmp_path), threads=1)
    try:
        wait_for(process, tmp_path, "logs/train/runs/*/checkpoints/periodic-*.ckpt", poll=0.1)
        process.send_signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        process.wait(timeout=60)
        elapsed = time.monotonic() - stopped_at
    finally:
        kill_process_tree(process)
    stderr = stderr_file.read_text()
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert elapsed < 20, f"the ranks did not agree on the step to stop at (waited {elapsed:.0f} s)"
    assert "Traceback" not in stderr
    [saved] = tmp_path.glob("logs/train/runs/*/checkpoints/interrupted-step*.ckpt")
    step = read_checkpoint(saved)["global_step"]
    assert f"training stopped by SIGTERM after step {step}; saved a resumable checkpoint: {saved}" in stderr
    assert stderr.count("training stopped by SIGTERM") == 1  # rank 0 reports
