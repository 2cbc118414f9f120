"""The LightningModule: a language model, its loss, its metrics and its optimizer."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from tokenizers import Tokenizer
from torchmetrics import MeanMetric

from lmforge.models.base import LanguageModel
from lmforge.training.checkpoint import NetworkCheckpoint
from lmforge.training.loggers import log_final_hparams
from lmforge.training.loss import batch_loss, loss_and_perplexity
from lmforge.training.network import build_network
from lmforge.training.optim import build_optimizer, gradient_norm
from lmforge.training.parallel import apply_block_options, data_parallel_rank, limit_cpu_threads, shard_model
from lmforge.training.precision import mixed_precision_dtypes
from lmforge.training.run import is_logging_step
from lmforge.training.task_eval import TaskScores, log_answers, validate_task


class LMModule(L.LightningModule):
    """Trains a :class:`~lmforge.models.base.LanguageModel` by maximum likelihood.

    Args:
        model: config of the network (a dict with ``_target_``), so that a checkpoint
            alone rebuilds it.
        optimizer: config of an optimizer factory called with ``model=<network>``
            (None for a module that only evaluates).
        scheduler: config of an LR-scheduler factory called with ``optimizer=<optimizer>``,
            stepped once per optimizer step; ``None`` keeps the learning rate constant.
        ignore_index: target id excluded from the loss.
        activation_checkpointing: recompute each transformer block's activations in the
            backward pass (less memory, about a third more compute).
        compile_blocks: ``torch.compile`` each transformer block.

    Besides the weights, checkpoints carry :attr:`run_metadata` (the network config, the
    tokenizer and the data settings: :func:`lmforge.training.checkpoint.checkpoint_metadata`)
    under ``checkpoint["lmforge"]``, so that eval and generate need nothing but the checkpoint.
    """

    def __init__(
        self,
        model: dict,
        optimizer: dict | None = None,
        scheduler: dict | None = None,
        ignore_index: int = -100,
        activation_checkpointing: bool = False,
        compile_blocks: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net: LanguageModel = build_network(model)
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        self.task_scores = TaskScores()
        self.run_metadata: dict | None = None
        self.run_hyperparameters: dict | None = None  # what the HParams tab lists (Run.hyperparameters)
        self.flops_per_batch: float | None = None  # read by the throughput monitor
        self._tokens_per_micro_batch = 0
        self._net_prepared = False

    def configure_model(self) -> None:
        """Set up the network in each process once the processes exist (Lightning calls this per stage).

        Caps CPU threads at this process's share of the cores, then, once: under
        ``trainer=fsdp`` or ``trainer=tp`` (a device mesh exists) splits and shards the network, else applies
        the block options (activation checkpointing, compile) alone. Does nothing outside a
        Trainer (``load_from_checkpoint`` calls it too).
        """
        if self._trainer is None:
            return
        limit_cpu_threads(self.trainer.num_devices)
        if self._net_prepared:
            return
        self._net_prepared = True
        options = {
            "activation_checkpointing": self.hparams.activation_checkpointing,
            "compile_blocks": self.hparams.compile_blocks,
        }
        if self.device_mesh is None:
            apply_block_options(self.net, **options)
            return
        param_dtype, reduce_dtype = mixed_precision_dtypes(self.trainer.precision)
        shard_model(self.net, self.device_mesh, param_dtype=param_dtype, reduce_dtype=reduce_dtype, **options)

    @classmethod
    def from_network(cls, network: NetworkCheckpoint) -> LMModule:
        """A module that evaluates the network of a checkpoint of either loop (no optimizer)."""
        module = cls(model=network.net_config)
        module.net.load_state_dict(network.weights)
        module.run_metadata = {"tokenizer": network.tokenizer_json, "data": network.data_config}
        return module.eval()

    @property
    def tokenizer(self) -> Tokenizer | None:
        """The run's tokenizer (from :attr:`run_metadata`), None before it is known."""
        text = (self.run_metadata or {}).get("tokenizer")
        return Tokenizer.from_str(text) if text else None

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.net(idx)

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return batch_loss(self.net, batch, self.hparams.ignore_index)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _ = self._loss(batch)
        inputs = batch[0]
        self._tokens_per_micro_batch = inputs.numel()
        self.flops_per_batch = self.net.flops_per_token(inputs.size(1)) * inputs.numel()
        if self._logs_this_step():  # each self.log costs ~1 ms of Lightning bookkeeping
            self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def on_fit_end(self) -> None:
        """Each TensorBoard logger records the run's hyperparameters; the HParams tab shows them with
        the run's last validation loss and perplexity (it compares runs, e.g. of a sweep, by them)."""
        if self.run_hyperparameters is not None:
            log_final_hparams(self.loggers, self.run_hyperparameters)

    def _logs_this_step(self) -> bool:
        """Whether the training values of the optimizer step in progress are logged."""
        return is_logging_step(self.global_step + 1, self.trainer.log_every_n_steps, self.trainer.max_steps)

    @property
    def tokens_per_step(self) -> int:
        """Training tokens per optimizer step, over all micro-batches and data-parallel groups."""
        groups = data_parallel_rank(self.trainer.strategy)[1]
        return self._tokens_per_micro_batch * self.trainer.accumulate_grad_batches * groups

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Runs before gradient clipping, so the logged norm is the raw one. Only on
        # logging steps: the norm costs a pass over all gradients.
        if not self._logs_this_step():
            return
        values = {"train/tokens": float((self.global_step + 1) * self.tokens_per_step)}
        norm = gradient_norm(self.parameters())
        if norm is not None:
            values["train/grad_norm"] = norm.item()
        # Both are the same on every rank and need none of self.log's reductions, which cost
        # ~1 ms per value: they go straight to the loggers, at the step Lightning logs train/loss.
        for logger in self.loggers:
            logger.log_metrics(values, step=self.global_step)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss, count = self._loss(batch)
        self.val_loss.update(loss, weight=count)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss, count = self._loss(batch)
        self.test_loss.update(loss, weight=count)

    def on_validation_epoch_end(self) -> None:
        self._log_loss_and_perplexity("val", self.val_loss)
        if not self.trainer.sanity_checking:
            self._log_task_scores("val")

    def on_test_epoch_end(self) -> None:
        self._log_loss_and_perplexity("test", self.test_loss)
        self._log_task_scores("test")

    def _log_task_scores(self, split: str) -> None:
        """On task data: exact match, chrF and BLEU of greedy answers, and a few of them as text."""
        datamodule = getattr(self.trainer, "datamodule", None)
        trainer = self.trainer
        result = validate_task(
            self.net, datamodule, split, self.task_scores, trainer.global_rank, trainer.world_size, self.device
        )
        if result is None:
            return
        values, answered = result
        for key, value in values.items():  # already reduced over all ranks
            self.log(f"{split}/{key}", value, sync_dist=True)
        if trainer.is_global_zero:
            log_answers(self.loggers, f"{split}/answers", answered, self.global_step)

    def _log_loss_and_perplexity(self, stage: str, metric: MeanMetric) -> None:
        loss, perplexity = loss_and_perplexity(metric)  # the metric has reduced over all ranks already
        # sync_dist averages values that are equal on every rank: a no-op but for Lightning's
        # "use sync_dist=True" warning under DDP.
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=True)
        self.log(f"{stage}/ppl", perplexity, prog_bar=stage == "val", sync_dist=True)

    def configure_optimizers(self) -> Any:
        optimizer = build_optimizer(self.hparams.optimizer, self.net, self.trainer.precision)
        if self.hparams.scheduler is None:
            return optimizer
        scheduler = instantiate(self.hparams.scheduler, optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["lmforge"] = self.run_metadata
