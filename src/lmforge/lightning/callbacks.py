"""Trainer callbacks: text samples, throughput, learning rate, progress bar, and the safety callbacks
(a checkpoint on SIGTERM/Ctrl-C, the non-finite loss guard) around :mod:`lmforge.training.safety`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch import callbacks as pl_callbacks
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lmforge.training.generation import generate_sample
from lmforge.training.parallel import count_groups_as_devices, is_sharded, is_tensor_parallel
from lmforge.training.report import describe_network
from lmforge.training.run import is_logging_step
from lmforge.training.safety import NonFiniteLossPolicy, StopSignals, report_interruption


class TextSamples(L.Callback):
    """Logs a sample continuation of a fixed prompt to TensorBoard after each validation."""

    def __init__(
        self,
        prompt: str = "\n",
        max_new_tokens: int = 128,
        temperature: float = 0.8,
        top_k: int | None = 50,
        seed: int = 0,
    ) -> None:
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_k = top_k
        self.seed = seed
        self.last_sample: str | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        tokenizer = pl_module.tokenizer
        if trainer.sanity_checking or tokenizer is None:
            return
        # Rank 0 samples alone, except that a sharded (FSDP) network runs only with every rank; a
        # tensor-parallel one cannot split a prompt over its processes (lmforge generate can, on the checkpoint).
        if not (trainer.is_global_zero or is_sharded(pl_module.net)) or is_tensor_parallel(pl_module.net):
            return
        self.last_sample = generate_sample(pl_module.net, tokenizer, self, pl_module.device)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                # Markdown code block keeps whitespace and newlines intact in the Text tab.
                text = "```\n" + self.last_sample.replace("```", "ʼʼʼ") + "\n```"
                logger.experiment.add_text("samples", text, global_step=trainer.global_step)


class LMThroughputMonitor(ThroughputMonitor):
    """Lightning's ``ThroughputMonitor`` for ``(inputs, targets)`` token batches.

    Logs batches, samples and tokens ("items") per second, and FLOPs/MFU from the
    model's ``flops_per_token``. ``peak_flops`` (FLOP/s of one device) overrides
    Lightning's lookup table, which does not know every device (nor any CPU).
    """

    def __init__(self, window_size: int = 50, peak_flops: float | None = None, **kwargs: Any) -> None:
        super().__init__(batch_size_fn=_batch_size, length_fn=_batch_tokens, window_size=window_size, **kwargs)
        self.peak_flops = peak_flops

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.peak_flops:
            self.available_flops = self.peak_flops
        for throughput in self._throughputs.values():
            if self.peak_flops:
                throughput.available_flops = self.peak_flops
            count_groups_as_devices(throughput, trainer.strategy, trainer.world_size)

    def training_rates(self) -> dict[str, float]:
        """Latest training rates on rank 0 (tokens/s is ``items_per_sec``); empty before any."""
        throughput = self._throughputs.get(RunningStage.TRAINING)
        return throughput.compute() if throughput is not None else {}


def _batch_size(batch: tuple[torch.Tensor, torch.Tensor]) -> int:
    return batch[0].size(0)


def _batch_tokens(batch: tuple[torch.Tensor, torch.Tensor]) -> int:
    return batch[0].numel()


class LearningRateMonitor(pl_callbacks.LearningRateMonitor):
    """Lightning's learning-rate monitor, idle (instead of an error) in a run without a logger."""

    def on_train_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_epoch_start(trainer, *args, **kwargs)


class ModelSummary(pl_callbacks.ModelSummary):
    """One line on the network at the start of fitting (:func:`~lmforge.training.report.describe_network`).

    Replaces Lightning's layer table, which at depth 1 lists only ``net`` and the metrics, and shows
    FLOPs as 0 unless the module has an example input, whose forward pass rank 0 would then run
    alone (a hang under FSDP, where a forward needs every rank).
    """

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._max_depth and trainer.is_global_zero:
            print(describe_network(pl_module.net, trainer.datamodule.block_size))


class ProgressBar(pl_callbacks.RichProgressBar):
    """Lightning's rich progress bar, re-reading the logged values only after the steps that log them.

    Lightning's bar collects every logged metric after each training batch (~0.2 ms of Python on
    a CPU, several % of a small model's step); the training values change only on the logging
    steps, and the validation values at the end of validation.
    """

    # Lightning's private hook; its extra arguments differ between releases (2.6.0 has two more).
    def _update_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        logging_step = is_logging_step(trainer.global_step, trainer.log_every_n_steps, trainer.max_steps)
        if trainer.training and not logging_step:
            return
        super()._update_metrics(trainer, pl_module, *args, **kwargs)


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
