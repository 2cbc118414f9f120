"""``lmforge train [overrides]``: train with the Lightning Trainer, then test the best checkpoint.

The run lifecycle (checks, data, resume, summary) is :mod:`lmforge.training.run`; this module
instantiates the LightningModule, callbacks, loggers and Trainer around it.
"""

from __future__ import annotations

import time

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig

from lmforge.errors import reported_errors
from lmforge.lightning.callbacks import LMThroughputMonitor
from lmforge.lightning.module import LMModule
from lmforge.training.config import CONFIG_PATH, instantiate_all, to_container
from lmforge.training.run import RunResult, check_run, finish_run, load_initial_weights, prepare_run


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit and test the configured experiment; returns the final metrics."""
    run = prepare_run(cfg, check_run(cfg, "train"), "train")
    module = LMModule(
        model=run.net_config,
        optimizer=to_container(cfg.optimizer),
        scheduler=to_container(cfg.get("scheduler")),
        ignore_index=cfg.ignore_index,
        activation_checkpointing=cfg.activation_checkpointing,
        compile_blocks=cfg.compile_blocks,
    )
    load_initial_weights(run, module.net)
    module.run_metadata = run.metadata
    module.run_hyperparameters = run.hyperparameters
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=instantiate_all(cfg.get("callbacks")), logger=instantiate_all(cfg.get("logger"))
    )
    started = time.perf_counter()
    trainer.fit(
        module, datamodule=run.datamodule, ckpt_path=run.resume_from, weights_only=not cfg.allow_unsafe_checkpoint
    )
    fit_seconds = time.perf_counter() - started
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}

    checkpoint = trainer.checkpoint_callback
    best = checkpoint.best_model_path if checkpoint is not None else ""
    if cfg.test:
        trainer.test(module, datamodule=run.datamodule, ckpt_path=best or None, verbose=False, weights_only=True)
        metrics.update({key: float(value) for key, value in trainer.callback_metrics.items()})
    finish_run(run, module.net, module.device, trainer.is_global_zero, _result(trainer, metrics, best, fit_seconds))
    return metrics


def _result(trainer: L.Trainer, metrics: dict[str, float], best: str, fit_seconds: float) -> RunResult:
    """The summary's figures from the Trainer: tokens/s from the throughput monitor when it has a window."""
    monitor = next((cb for cb in trainer.callbacks if isinstance(cb, LMThroughputMonitor)), None)
    rates = monitor.training_rates() if monitor and trainer.is_global_zero else {}  # rank 0 measures
    tokens_per_sec = rates.get("items_per_sec", rates.get("device/items_per_sec"))
    if tokens_per_sec is None and trainer.global_step:
        tokens_per_sec = trainer.global_step * trainer.lightning_module.tokens_per_step / fit_seconds or None
    tensorboard = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
    checkpoint = trainer.checkpoint_callback
    return RunResult(
        metrics=metrics,
        tokens_per_sec=tokens_per_sec,
        best_checkpoint=best or None,
        last_checkpoint=(checkpoint.last_model_path or None) if checkpoint is not None else None,
        tensorboard_dir=tensorboard.log_dir if tensorboard else None,
    )


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def main(cfg: DictConfig) -> float | None:
    with reported_errors():
        metrics = train(cfg)
    return metrics.get("val/loss")


if __name__ == "__main__":
    main()
