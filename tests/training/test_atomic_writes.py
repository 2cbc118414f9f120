"""Checkpoints are written atomically: a full disk or a kill mid-write keeps the previous one."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from helpers import (
    assert_one_clear_error,
    assert_untouched,
    file_states,
    run_cli,
    small_tmpfs,
)

from lmforge.errors import CheckpointError
from lmforge.training.checkpoint import read_checkpoint, resolve_checkpoint
from lmforge.training.safety import AtomicCheckpointIO


def test_full_disk_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device.*previous checkpoints are unchanged"):
        AtomicCheckpointIO().save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"], "a temporary file was left behind"


@pytest.mark.slow
def test_cli_full_disk_while_checkpointing_keeps_the_previous_checkpoint(prepared, tmp_path):
    size = prepared.checkpoint.stat().st_size
    with small_tmpfs(tmp_path / "disk", size + (96 << 10)) as disk:
        old = disk / "train" / "runs" / "old" / "checkpoints" / "last.ckpt"
        old.parent.mkdir(parents=True)
        shutil.copy2(prepared.checkpoint, old)
        before = file_states(disk)
        result = run_cli(
            "train",
            *prepared.overrides,
            f"paths.log_dir={disk}",
            f"paths.data_dir={prepared.root}/data",
            "trainer.max_steps=10",
            "ckpt_path=last",
        )
        assert_one_clear_error(result.returncode, result.stderr, "No space left on device")
        assert "the previous checkpoints are unchanged" in result.stderr
        assert_untouched(before, disk)
        assert read_checkpoint(old)["global_step"] == 6
        assert not [p for p in disk.rglob("*.tmp")], "a temporary file was left behind"


ATOMIC_WRITER = """
import io, sys, time, torch
import lmforge.training.safety as safety
path = sys.argv[1]
safety.AtomicCheckpointIO().save_checkpoint({"version": "old", "w": torch.zeros(1000)}, path)
real_atomic_write = safety.atomic_write
def slow_atomic_write(path, write):  # writes half of the new checkpoint, then hangs until killed
    def write_half(handle):
        data = io.BytesIO()
        write(data)
        handle.write(data.getvalue()[: len(data.getvalue()) // 2])
        handle.flush()
        print("writing", flush=True)
        time.sleep(120)
    real_atomic_write(path, write_half)
safety.atomic_write = slow_atomic_write
safety.AtomicCheckpointIO().save_checkpoint({"version": "new", "w": torch.ones(1000)}, path)
"""


@pytest.mark.slow
def test_kill_during_a_checkpoint_write_keeps_the_old_checkpoint(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    writer = subprocess.Popen([sys.executable, "-c", ATOMIC_WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "writing"
        temporary = [p for p in path.parent.iterdir() if p != path]
        assert len(temporary) == 1 and temporary[0].stat().st_size > 0  # the half-written new file
    finally:
        writer.kill()
        writer.wait(timeout=30)
    assert writer.returncode == -signal.SIGKILL
    assert torch.load(path, weights_only=True)["version"] == "old"
    assert resolve_checkpoint("last", path.parent) == str(path), "the torn temporary file must never be picked"
