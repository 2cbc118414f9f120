"""Surviving faults: atomic checkpoint files, a resumable checkpoint on SIGTERM or Ctrl-C,
and a guard against non-finite losses.

* :func:`atomic_save` / :class:`AtomicCheckpointIO` write a checkpoint to a hidden temporary
  file in the same directory, fsync it and rename it over the target: a crash at any moment
  leaves the old file or the new one, never a torn one. (Lightning's own writer stages the file
  in the system temp directory and moves it, which is a copy, not a rename, when that is
  another file system, and does not fsync.)
* :class:`StopSignals` turns SIGTERM and a first Ctrl-C into a stop at the next step boundary
  that all ranks agree on; the Trainer's ``InterruptCheckpoint`` callback and the Fabric loop
  then save a resumable checkpoint and say how to resume.
* :class:`NonFiniteLossPolicy` stops training (or skips the update) when the loss is NaN or
  infinite, before the optimizer step, so the weights and the last checkpoint stay good; the
  Trainer's ``NonFiniteLossGuard`` callback applies it, the Fabric loop calls it directly.
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

import torch
from hydra.core.hydra_config import HydraConfig
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities import rank_zero_warn

from lmforge.errors import CheckpointError, ConfigError, NonFiniteLossError

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
    Used by the Trainer's ``InterruptCheckpoint`` callback and by the Fabric loop.
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


def check_nonfinite_action(action: str) -> None:
    """Raise :class:`~lmforge.errors.ConfigError` unless ``action`` (the ``nonfinite_loss`` setting) is stop or skip."""
    if action not in NONFINITE_ACTIONS:
        raise ConfigError(f"nonfinite_loss={action!r} must be one of {', '.join(NONFINITE_ACTIONS)}")


class NonFiniteLossPolicy:
    """What a training loop does when a step's loss is NaN or infinite, before the optimizer step.

    ``action="stop"``: :meth:`handle` raises :class:`~lmforge.errors.NonFiniteLossError` naming
    the step and the last good checkpoint. ``action="skip"``: it counts the step and returns; the
    loop then drops the step's gradients so the weights stay as they were. Shared by the
    Trainer's ``NonFiniteLossGuard`` callback and the Fabric loop (the ``nonfinite_loss`` setting).
    """

    def __init__(self, action: str = "stop") -> None:
        check_nonfinite_action(action)
        self.action = action
        self.skipped_steps = 0

    def handle(self, step: int, last_good: Path | None) -> None:
        """Act on a non-finite loss at ``step`` (stop: raise; skip: count and warn)."""
        if self.action == "stop":
            fix = (
                f"the last good checkpoint is {last_good}: resume from it (ckpt_path=...) with e.g. a lower "
                "optimizer.lr"
                if last_good
                else "no checkpoint was saved yet: try e.g. a lower optimizer.lr"
            )
            raise NonFiniteLossError(
                f"the training loss is NaN or infinite at step {step}, so training stopped before that step's update; "
                f"{fix}, or set nonfinite_loss=skip to skip such steps"
            )
        self.skipped_steps += 1
        rank_zero_warn(f"the training loss is NaN or inf at step {step}: update skipped ({self.skipped_steps} so far)")
