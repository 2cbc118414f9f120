"""Interrupted and killed runs: SIGTERM/SIGINT save a checkpoint that resumes exactly, and a run
SIGKILLed at a random step resumes exactly from its last periodic checkpoint.
"""

from __future__ import annotations

import csv
import os
import random
import signal
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import (
    DEFAULT_MODEL,
    compose_config,
    paths_in,
    run_cli,
    start_cli,
    tiny_train_overrides,
    wait_for,
)

from lmforge.cli.train import train
from lmforge.training.checkpoint import read_checkpoint


def read_losses(run_dir: Path) -> dict[int, float]:
    """step -> train/loss from the CSV log of a run."""
    with open(next(run_dir.rglob("metrics.csv"))) as handle:
        return {int(row["step"]): float(row["train/loss"]) for row in csv.DictReader(handle) if row.get("train/loss")}


def assert_same_weights(checkpoint_a: Path, checkpoint_b: Path) -> None:
    a = torch.load(checkpoint_a, weights_only=True)
    b = torch.load(checkpoint_b, weights_only=True)
    assert a["global_step"] == b["global_step"]
    for name, tensor in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], tensor, rtol=0, atol=1e-6)


def only_run_dir(log_dir: Path) -> Path:
    runs = [path for path in (log_dir / "train" / "runs").iterdir() if (path / "checkpoints").is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


class SignalAtStep(L.Callback):
    """Test helper: sends ``signum`` to this process during optimizer step number ``step`` (1-based)."""

    def __init__(self, signum: int, step: int) -> None:
        self.signum = signum
        self.step = step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == self.step - 1:
            assert signal.getsignal(self.signum) not in (signal.SIG_DFL, None), "unhandled: it would kill pytest"
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_a_checkpoint_that_resumes_exactly(signum, prepared, tmp_path, capsys):
    overrides = [*prepared.overrides, f"paths.data_dir={prepared.root}/data"]
    signal_at_step_3 = [
        f"+callbacks.signal._target_={__name__}.SignalAtStep",
        f"+callbacks.signal.signum={int(signum)}",
        "+callbacks.signal.step=3",
    ]
    stopped = compose_config("train", [*overrides, *signal_at_step_3], tmp_path / "stopped")
    with pytest.raises(SystemExit) as exit_info:
        train(stopped)
    assert exit_info.value.code == 128 + signum
    interrupted = tmp_path / "stopped" / "run" / "checkpoints" / "interrupted-step000003.ckpt"
    stderr = capsys.readouterr().err
    assert f"training stopped by {signum.name} after step 3" in stderr
    assert "resume with: lmforge train" in stderr and f"ckpt_path={interrupted}" in stderr

    resumed = compose_config("train", [*overrides, f"ckpt_path={interrupted}"], tmp_path / "resumed")
    train(resumed)
    reference = read_losses(prepared.checkpoint.parents[1])
    losses = read_losses(tmp_path / "resumed" / "run")
    assert sorted(losses) == [3, 4, 5]
    for step, loss in losses.items():
        assert loss == pytest.approx(reference[step], abs=1e-6), step
    assert_same_weights(prepared.checkpoint, tmp_path / "resumed" / "run" / "checkpoints" / "last.ckpt")


# Wider than the tiny model (slower steps to kill one in), with the sizes each model takes.
WIDER_MODEL = {
    "gpt": ["model.n_embd=64"],  # [gpt]
    "lstm": ["model.n_embd=64", "model.hidden_size=64"],  # [lstm]
}


@pytest.mark.slow
def test_sigkill_at_a_random_step_resumes_exactly_and_writes_only_under_its_paths(corpus_dir, tmp_path):
    """Uninterrupted run vs. a run SIGKILLed at a random step and resumed from its last periodic checkpoint."""
    overrides = tiny_train_overrides(
        corpus_dir,
        DEFAULT_MODEL,
        "logger=csv",
        "test=false",
        "trainer.log_every_n_steps=1",
        "trainer.max_steps=40",
        "trainer.val_check_interval=1000",
        "callbacks.periodic_checkpoint.every_n_train_steps=2",
        *WIDER_MODEL[DEFAULT_MODEL],
        "data.block_size=64",
        "data.batch_size=16",
    )
    data = f"paths.data_dir={tmp_path}/data"
    # The uninterrupted run, from an empty working directory and home: it may write nowhere but
    # paths.log_dir and paths.data_dir.
    cwd, home, tmpdir = (tmp_path / name for name in ("cwd", "home", "tmpdir"))
    for directory in (cwd, home, tmpdir):
        directory.mkdir()
    env = {"HOME": str(home), "TMPDIR": str(tmpdir), "XDG_CACHE_HOME": str(home / ".cache")}
    full = run_cli("train", *overrides, f"paths.log_dir={tmp_path}/full", data, cwd=cwd, env=env)
    assert full.returncode == 0, full.stderr[-3000:]
    outside = [p for d in (cwd, home, tmpdir) for p in d.rglob("*")]
    assert not outside, f"written outside paths.log_dir / paths.data_dir: {outside}"
    assert {p.name for p in tmp_path.iterdir()} == {"cwd", "home", "tmpdir", "full", "data"}

    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    kill_after = rng.randrange(4, 18, 2)
    killed_logs = tmp_path / "killed"
    process = start_cli(tmp_path / "killed.err", "train", *overrides, f"paths.log_dir={killed_logs}", data)
    try:
        wait_for(process, killed_logs, f"train/runs/*/checkpoints/periodic-step{kill_after:06d}.ckpt")
        time.sleep(rng.uniform(0, 0.05))
        process.kill()
    finally:
        process.kill()
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, f"the run ended before it was killed (seed {seed})"
    killed_run = only_run_dir(killed_logs)

    resumed = run_cli("train", *overrides, f"paths.log_dir={killed_logs}", data, f"ckpt_path={killed_run}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    resumed_run = next(p for p in (killed_logs / "train" / "runs").iterdir() if p != killed_run)
    reference, losses = read_losses(only_run_dir(tmp_path / "full")), read_losses(resumed_run)
    start = min(losses)
    assert start >= kill_after and sorted(losses) == list(range(start, 40)), (seed, sorted(losses))
    for step, loss in losses.items():
        assert loss == pytest.approx(reference[step], abs=1e-6), (seed, step)
    full_run = only_run_dir(tmp_path / "full")
    assert_same_weights(full_run / "checkpoints" / "last.ckpt", resumed_run / "checkpoints" / "last.ckpt")


@pytest.mark.slow
def test_cli_sigterm_saves_and_prints_how_to_resume(corpus_dir, tmp_path):
    overrides = tiny_train_overrides(
        corpus_dir,
        DEFAULT_MODEL,
        "trainer.max_steps=100000",
        "trainer.val_check_interval=1000",
        "callbacks.periodic_checkpoint.every_n_train_steps=2",
    )
    stderr_file = tmp_path / "stderr.txt"
    process = start_cli(stderr_file, "train", *overrides, *paths_in(tmp_path))
    try:
        wait_for(process, tmp_path, "logs/train/runs/*/checkpoints/periodic-*.ckpt")
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    finally:
        process.kill()
    stderr = stderr_file.read_text()
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Traceback" not in stderr
    saved = list(tmp_path.glob("logs/train/runs/*/checkpoints/interrupted-step*.ckpt"))
    assert len(saved) == 1 and f"saved a resumable checkpoint: {saved[0]}" in stderr
    assert f"resume with: lmforge train data=text_files data.path={corpus_dir}" in stderr
    assert read_checkpoint(saved[0])["global_step"] >= 2
