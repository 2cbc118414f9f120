"""Surviving faults: atomic checkpoint files, a resumable checkpoint on SIGTERM or Ctrl-C,
and a guard against non-finite losses.

* :func:`atomic_save` / :class:`AtomicCheckpointIO` write a checkpoint to a hidden temporary
  file in the same directory, fsync it and rename it over the target: a crash at any moment
  leaves the old file or the new one, never a torn one. (Lightning's own writer stages the file
  in the system temp directory and moves it, which is a copy, not a rename, when that is
  another file system, and does not fsync.)
* :class:`StopSignals` turns SIGTERM and a first Ctrl-C into a stop at the next step boundary
  that all ranks agree on; :class:`InterruptCheckpoint` (the Trainer) and the Fabric loop then
  save a resumable checkpoint and say how to resume.
* :class:`NonFiniteLossPolicy` stops training (or skips the update) when the loss is NaN or
  infinite, before the optimizer step, so the weights and the last checkpoint stay good;
  :class:`NonFiniteLossGuard` applies it in the Trainer, the Fabric loop calls it directly.
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
from lightning.pytorch.utilities import rank_zero_warn
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


def resume_command(ckpt_path: str | Path, command: str = "train") -> str:
    """The command line that resumes this run from ``ckpt_path`` (its overrides plus ``ckpt_path``)."""
    overrides = []
    if HydraConfig.initialized():
        overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("ckpt_path=")]
    return shlex.join(["lmforge", command, *overrides, f"ckpt_path={ckpt_path}"])


def report_interruption(signum: int, step: int, path: Path, command: str) -> None:
    """Say on stderr which signal stopped training, where the checkpoint is and how to resume."""
    print(
        f"training stopped by {signal.Signals(signum).name} after step {step}; "
        f"saved a resumable checkpoint: {path}\nresume with: {resume_command(path, command)}",
        file=sys.stderr,
        flush=True,
    )


class StopSignals:
    """SIGTERM and a first Ctrl-C, turned into a request to stop at the next step boundary.

    The handlers only record the signal: the training loop calls :meth:`stop_now` after each
    optimizer step, and there the ranks agree (a signal on any rank stops all of them at the
    same step), so that every rank takes part in saving the checkpoint. Nothing runs a
    collective inside a signal handler. A second Ctrl-C raises ``KeyboardInterrupt`` at once.
    Used by :class:`InterruptCheckpoint` and by the Fabric loop.
    """

    HANDLED = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """Handle the signals in this process (a no-op outside the main thread, where Python cannot)."""
        if threading.current_thread() is not threading.main_thread() or self._previous:
            return
        self.signum = None
        for signum in self.HANDLED:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def uninstall(self) -> None:
        """Put back the handlers that were there before :meth:`install`."""
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) == self._on_signal:
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT:
            # The next Ctrl-C goes to the previous handler (KeyboardInterrupt): stop at once.
            previous = self._previous.get(signal.SIGINT)
            signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
            print("\nCtrl-C: stopping after this step to save a checkpoint (Ctrl-C again: stop now)", file=sys.stderr)
        if self.signum is None:
            self.signum = signum

    def stop_now(self, any_rank: Callable[[bool], bool]) -> bool:
        """Whether a signal reached any rank; ``any_rank(flag)`` is the collective that tells (all ranks call it)."""
        stop = any_rank(self.signum is not None)
        if stop and self.signum is None:
            self.signum = signal.SIGTERM  # another rank received it: exit as if this one had
        return stop


class InterruptCheckpoint(L.Callback):
    """On SIGTERM or a first Ctrl-C: stop after the current optimizer step, save a resumable checkpoint
    ``dirpath/filename.ckpt``, print the command that resumes, and exit with 128 + the signal number.

    SIGTERM is what SLURM sends at preemption or time-out and what ``kill`` sends. While training
    runs, :class:`StopSignals` replaces Lightning's SIGTERM handler, which broadcasts from inside
    the handler and lets ranks stop at different steps (a hang until the process-group timeout
    under DDP). ``filename`` may use ``{step}``.
    """

    def __init__(self, dirpath: str, filename: str = "interrupted-step{step:06d}") -> None:
        self.dirpath = dirpath
        self.filename = filename
        self.signals = StopSignals()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.signals.install()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches != 0:
            return  # between the micro-batches of one optimizer step

        def any_rank(flag: bool) -> bool:
            return trainer.strategy.reduce_boolean_decision(flag, all=False) if trainer.world_size > 1 else flag

        if self.signals.stop_now(any_rank):
            raise SIGTERMException  # Lightning's way out of the loops; on_exception saves the checkpoint

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.signals.uninstall()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.signals.uninstall()
        if not isinstance(exception, SIGTERMException) or self.signals.signum is None:
            return
        path = Path(self.dirpath, self.filename.format(step=trainer.global_step) + ".ckpt")
        trainer.save_checkpoint(path, weights_only=False)  # all ranks take part: they stopped at the same step
        exception.code = 128 + self.signals.signum  # SIGTERMException is a SystemExit: this is the exit status
        if trainer.is_global_zero:
            report_interruption(self.signals.signum, trainer.global_step, path, "train")


def newest_saved_checkpoint(trainer: L.Trainer) -> Path | None:
    """The newest checkpoint file saved by the trainer's checkpoint callbacks in this run."""
    paths = []
    for callback in trainer.checkpoint_callbacks:
        paths += [getattr(callback, "last_model_path", ""), *getattr(callback, "best_k_models", {})]
    existing = [Path(p) for p in paths if p and Path(p).is_file()]
    return max(existing, key=lambda p: p.stat().st_mtime) if existing else None


def check_nonfinite_action(action: str, setting: str) -> None:
    """Raise :class:`~lmforge.errors.ConfigError` unless ``action`` (the value of ``setting``) is stop or skip."""
    if action not in NONFINITE_ACTIONS:
        raise ConfigError(f"{setting}={action!r} must be one of {', '.join(NONFINITE_ACTIONS)}")


class NonFiniteLossPolicy:
    """What a training loop does when a step's loss is NaN or infinite, before the optimizer step.

    ``action="stop"``: :meth:`handle` raises :class:`~lmforge.errors.NonFiniteLossError` naming
    the step and the last good checkpoint. ``action="skip"``: it counts the step and returns; the
    loop then drops the step's gradients so the weights stay as they were. ``setting`` is the
    config key of ``action``, for the messages. Shared by :class:`NonFiniteLossGuard` and the
    Fabric loop.
    """

    def __init__(self, action: str = "stop", setting: str = "callbacks.nonfinite_loss.action") -> None:
        check_nonfinite_action(action, setting)
        self.action = action
        self.setting = setting
        self.skipped_steps = 0

    def handle(self, step: int, last_good: Path | None) -> None:
        """Act on a non-finite loss at ``step`` (stop: raise; skip: count and warn)."""
        if self.action == "stop":
            fix = (
                f"the last good checkpoint is {last_good}: resume from it (ckpt_path=...) with e.g. a lower optimizer.lr"
                if last_good
                else "no checkpoint was saved yet: try e.g. a lower optimizer.lr"
            )
            raise NonFiniteLossError(
                f"the training loss is NaN or infinite at step {step}, so training stopped before that step's update; "
                f"{fix}, or set {self.setting}=skip to skip such steps"
            )
        self.skipped_steps += 1
        rank_zero_warn(f"the training loss is NaN or inf at step {step}: update skipped ({self.skipped_steps} so far)")


class NonFiniteLossGuard(L.Callback):
    """Acts when a training loss is NaN or infinite, before the optimizer step that would use it.

    ``action="stop"`` stops training with an error naming the step and the last good checkpoint
    (the weights were not updated, and no checkpoint of this step is written). ``action="skip"``
    drops that step's gradients, so the optimizer leaves the weights alone (the step still
    counts, like the schedule and the data), and counts the skipped steps (logged as
    ``train/skipped_steps``, kept in checkpoints). Under data parallelism the ranks agree: a
    non-finite loss on any rank acts on all. See :class:`NonFiniteLossPolicy`.
    """

    def __init__(self, action: str = "stop") -> None:
        self.policy = NonFiniteLossPolicy(action)
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
        last_good = newest_saved_checkpoint(trainer) if self.policy.action == "stop" else None
        self.policy.handle(trainer.global_step, last_good)
        for param in pl_module.parameters():
            param.grad = None
        pl_module.log("train/skipped_steps", float(self.policy.skipped_steps), on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.policy.skipped_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.policy.skipped_steps = state_dict.get("skipped_steps", 0)
