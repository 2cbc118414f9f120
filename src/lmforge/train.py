"""Train a language model: ``lmforge train [overrides]`` or ``python -m lmforge.train``.

Composes the config, builds data, model, callbacks, loggers and Trainer, fits, tests
the best checkpoint and prints a summary.
"""

from __future__ import annotations

import time

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig

from lmforge.callbacks import LMThroughputMonitor, generate_sample
from lmforge.checkpoint import checkpoint_tokenizer
from lmforge.config import (
    CONFIG_DIR,
    apply_extras,
    build_datamodule,
    instantiate_all,
    model_config,
    to_container,
)
from lmforge.errors import reported_errors
from lmforge.lm_module import LMModule
from lmforge.parallel import check_precision, is_sharded
from lmforge.report import print_run_summary
from lmforge.validation import check_resume_tokenizer, validate_train_config


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit and test the configured experiment; returns the final metrics."""
    apply_extras(cfg)
    check_precision(cfg.trainer.precision, cfg.trainer.accelerator, cfg.trainer.get("strategy"))
    resume_from = validate_train_config(cfg)  # before any data is prepared or any file is written
    L.seed_everything(cfg.seed, workers=True)

    datamodule = build_datamodule(cfg.data)
    datamodule.prepare_data()  # before the model: the tokenizer decides the vocabulary size
    check_resume_tokenizer(cfg, resume_from, datamodule.tokenizer_json)
    module = LMModule(
        model=model_config(cfg.model, datamodule.vocab_size),
        optimizer=to_container(cfg.optimizer),
        scheduler=to_container(cfg.get("scheduler")),
        ignore_index=cfg.ignore_index,
        activation_checkpointing=cfg.activation_checkpointing,
        compile_blocks=cfg.compile_blocks,
    )
    module.tokenizer_json = datamodule.tokenizer_json
    module.data_config = to_container(cfg.data)

    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=instantiate_all(cfg.get("callbacks")), logger=instantiate_all(cfg.get("logger"))
    )
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=not cfg.allow_unsafe_checkpoint)
    fit_seconds = time.perf_counter() - started
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}

    checkpoint = trainer.checkpoint_callback
    best = checkpoint.best_model_path if checkpoint is not None else ""
    if cfg.test:
        trainer.test(module, datamodule=datamodule, ckpt_path=best or None, verbose=False, weights_only=True)
        metrics.update({key: float(value) for key, value in trainer.callback_metrics.items()})

    # A sharded (FSDP) network runs only with every rank taking part; rank 0 prints.
    sample = (
        generate_sample(module.net, checkpoint_tokenizer(module), cfg.sample, module.device)
        if trainer.is_global_zero or is_sharded(module.net)
        else None
    )
    if trainer.is_global_zero:
        _print_summary(trainer, metrics, best, fit_seconds, sample)
    return metrics


def _print_summary(trainer: L.Trainer, metrics: dict, best: str, fit_seconds: float, sample: str) -> None:
    monitor = next((cb for cb in trainer.callbacks if isinstance(cb, LMThroughputMonitor)), None)
    rates = monitor.training_rates() if monitor else {}
    tokens_per_sec = rates.get("items_per_sec", rates.get("device/items_per_sec"))
    if tokens_per_sec is None and trainer.global_step:
        tokens_per_sec = trainer.global_step * trainer.lightning_module.tokens_per_step / fit_seconds or None
    tensorboard = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
    checkpoint = trainer.checkpoint_callback
    print_run_summary(
        metrics,
        tokens_per_sec,
        best_checkpoint=best or None,
        last_checkpoint=(checkpoint.last_model_path or None) if checkpoint is not None else None,
        tensorboard_dir=tensorboard.log_dir if tensorboard else None,
        sample=sample,
    )


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    with reported_errors():
        metrics = train(cfg)
    return metrics.get("val/loss")


if __name__ == "__main__":
    main()
