"""Surviving faults: atomic checkpoint files, a resumable checkpoint on SIGTERM or Ctrl-C,
and a guard against non-finite losses.

* :func:`atomic_save` / :class:`AtomicCheckpointIO` write a checkpoint to a hidden temporary
  file in the same directory, fsync it and rename it over the target: a crash at any moment
  leaves the old file or the new one, never a torn one. (Lightning's own writer stages the file
  in the system temp directory and moves it, which is a copy, not a rename, when that is
  another file system, and does not fsync.)
* :class:`InterruptCheckpoint` builds on Lightning's signal handling: on SIGTERM Lightning sets
  ``trainer.received_sigterm`` and its loops stop after the current batch by raising
  ``SIGTERMException``; this callback then saves a resumable checkpoint and says how to resume.
  A first Ctrl-C is turned into that same SIGTERM path.
* :class:`NonFiniteLossGuard` stops training (or skips the update) when the loss is NaN or
  infinite, before the optimizer step, so the weights and the last checkpoint stay good.
"""

from __future__ import annotations

import io
import os
import secrets
import shlex
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lmforge.checkpoint import CheckpointError
from lmforge.errors import ConfigError, NonFiniteLossError

NONFINITE_ACTIONS = ("stop", "skip")


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` with ``write(file)`` so that a crash leaves the old file or the new one.

    The data goes to a hidden ``.<name>.<random>.tmp`` file in the same directory (so the
    rename cannot cross file systems, and ``*.ckpt`` globs never see it), which is fsynced,
    renamed over ``path``, and the directory fsynced. On failure the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)`` through :func:`atomic_write`; a failed write raises :class:`CheckpointError`.

    The object is serialized in memory first (as Lightning's own writer does): written by
    ``torch.save`` directly, a full disk surfaces as an opaque ``RuntimeError``.
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    try:
        atomic_write(path, lambda handle: handle.write(buffer.getbuffer()))
    except OSError as exc:
        raise CheckpointError(
            f"could not write the checkpoint {path} ({exc.strerror or exc}); the previous checkpoints are unchanged; "
            "free disk space, or point paths.log_dir at a disk with room"
        ) from exc


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with crash-safe writes (:func:`atomic_save`) of local files.

    Use as a Trainer or Fabric plugin: ``plugins=[AtomicCheckpointIO()]``. Remote paths
    (``s3://...``) keep Lightning's writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_save(checkpoint, path)


def resume_command(ckpt_path: str | Path) -> str:
    """The command line that resumes this run from ``ckpt_path`` (its overrides plus ``ckpt_path``)."""
    overrides = []
    if HydraConfig.initialized():
        overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("ckpt_path=")]
    return shlex.join(["lmforge", "train", *overrides, f"ckpt_path={ckpt_path}"])


class InterruptCheckpoint(L.Callback):
    """On SIGTERM or a first Ctrl-C: stop after the current step, save a resumable checkpoint
    ``dirpath/filename.ckpt``, print the command that resumes, and exit with 128 + the signal number.

    SIGTERM is what SLURM sends at preemption or time-out and what ``kill`` sends. Lightning
    handles it (see the module docstring); this callback adds the checkpoint and the message.
    A second Ctrl-C stops at once, through Lightning's KeyboardInterrupt handling, without a
    checkpoint. ``filename`` may use ``{step}``.
    """

    def __init__(self, dirpath: str, filename: str = "interrupted-step{step:06d}") -> None:
        self.dirpath = dirpath
        self.filename = filename
        self.signal = signal.SIGTERM
        self._previous_sigint_handler: Any = signal.default_int_handler

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGINT, self._on_first_sigint)
            self._previous_sigint_handler = previous if previous is not None else signal.default_int_handler

    def _on_first_sigint(self, signum: int, frame: Any) -> None:
        self.signal = signal.SIGINT
        self._restore_sigint_handler()
        print("\nCtrl-C: stopping after this step to save a checkpoint (Ctrl-C again: stop now)", file=sys.stderr)
        os.kill(os.getpid(), signal.SIGTERM)  # Lightning's SIGTERM path: stop after the current batch

    def _restore_sigint_handler(self) -> None:
        if signal.getsignal(signal.SIGINT) == self._on_first_sigint:
            signal.signal(signal.SIGINT, self._previous_sigint_handler)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_sigint_handler()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_sigint_handler()
        if not isinstance(exception, SIGTERMException):
            return
        path = Path(self.dirpath, self.filename.format(step=trainer.global_step) + ".ckpt")
        trainer.save_checkpoint(path, weights_only=False)  # all ranks take part: they stopped at the same step
        exception.code = 128 + self.signal  # SIGTERMException is a SystemExit: this is the exit status
        self._report(trainer.global_step, path)

    @rank_zero_only
    def _report(self, step: int, path: Path) -> None:
        print(
            f"training stopped by {signal.Signals(self.signal).name} after step {step}; "
            f"saved a resumable checkpoint: {path}\nresume with: {resume_command(path)}",
            file=sys.stderr,
            flush=True,
        )


def newest_saved_checkpoint(trainer: L.Trainer) -> Path | None:
    """The newest checkpoint file saved by the trainer's checkpoint callbacks in this run."""
    paths = []
    for callback in trainer.checkpoint_callbacks:
        paths += [getattr(callback, "last_model_path", ""), *getattr(callback, "best_k_models", {})]
    existing = [Path(p) for p in paths if p and Path(p).is_file()]
    return max(existing, key=lambda p: p.stat().st_mtime) if existing else None


class NonFiniteLossGuard(L.Callback):
    """Acts when a training loss is NaN or infinite, before the optimizer step that would use it.

    ``action="stop"`` raises :class:`~lmforge.errors.NonFiniteLossError` naming the step and the
    last good checkpoint (the weights were not updated, and no checkpoint of this step is written).
    ``action="skip"`` drops that step's gradients, so the optimizer leaves the weights alone
    (the step still counts, like the schedule and the data), and counts the skipped steps
    (logged as ``train/skipped_steps``, kept in checkpoints). Under data parallelism the ranks
    agree: a non-finite loss on any rank acts on all.
    """

    def __init__(self, action: str = "stop") -> None:
        if action not in NONFINITE_ACTIONS:
            choices = ", ".join(NONFINITE_ACTIONS)
            raise ConfigError(f"callbacks.nonfinite_loss.action={action!r} must be one of {choices}")
        self.action = action
        self.skipped_steps = 0
        self._nonfinite: torch.Tensor | None = None  # any non-finite loss since the last optimizer step

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        nonfinite = ~torch.isfinite(loss.detach())  # stays on the device: no sync per micro-batch
        self._nonfinite = nonfinite if self._nonfinite is None else self._nonfinite | nonfinite

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        nonfinite = self._nonfinite is not None and bool(self._nonfinite)
        self._nonfinite = None
        if trainer.world_size > 1:
            nonfinite = trainer.strategy.reduce_boolean_decision(nonfinite, all=False)
        if not nonfinite:
            return
        step = trainer.global_step
        if self.action == "stop":
            last_good = newest_saved_checkpoint(trainer)
            fix = (
                f"the last good checkpoint is {last_good}: resume from it (ckpt_path=...) with e.g. a lower optimizer.lr"
                if last_good
                else "no checkpoint was saved yet: try e.g. a lower optimizer.lr"
            )
            raise NonFiniteLossError(
                f"the training loss is NaN or infinite at step {step}, so training stopped before that step's update; "
                f"{fix}, or set callbacks.nonfinite_loss.action=skip to skip such steps"
            )
        for param in pl_module.parameters():
            param.grad = None
        self.skipped_steps += 1
        rank_zero_warn(f"the training loss is NaN or inf at step {step}: update skipped ({self.skipped_steps} so far)")
        pl_module.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = state_dict.get("skipped_steps", 0)
