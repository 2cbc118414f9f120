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

from lmforge.callbacks import LMThroughputMonitor, generate_text
from lmforge.checkpoint import checkpoint_tokenizer, resolve_checkpoint
from lmforge.config import (
    CONFIG_DIR,
    apply_extras,
    build_datamodule,
    instantiate_all,
    model_config,
    to_container,
)
from lmforge.lm_module import LMModule
from lmforge.report import print_run_summary


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit and test the configured experiment; returns the final metrics."""
    apply_extras(cfg)
    L.seed_everything(cfg.seed, workers=True)

    datamodule = build_datamodule(cfg.data)
    datamodule.prepare_data()  # before the model: the tokenizer decides the vocabulary size
    module = LMModule(
        model=model_config(cfg.model, datamodule.vocab_size),
        optimizer=to_container(cfg.optimizer),
        scheduler=to_container(cfg.get("scheduler")),
        ignore_index=cfg.ignore_index,
    )
    module.tokenizer_json = datamodule.tokenizer_json
    module.data_config = to_container(cfg.data)

    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=instantiate_all(cfg.get("callbacks")), logger=instantiate_all(cfg.get("logger"))
    )
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=resolve_checkpoint(cfg.ckpt_path, cfg.paths.log_dir))
    fit_seconds = time.perf_counter() - started
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}

    checkpoint = trainer.checkpoint_callback
    best = checkpoint.best_model_path if checkpoint is not None else ""
    if cfg.test:
        trainer.test(module, datamodule=datamodule, ckpt_path=best or None, verbose=False)
        metrics.update({key: float(value) for key, value in trainer.callback_metrics.items()})

    if trainer.is_global_zero:
        _print_summary(cfg, trainer, module, metrics, best, fit_seconds)
    return metrics


def _print_summary(
    cfg: DictConfig, trainer: L.Trainer, module: LMModule, metrics: dict, best: str, fit_seconds: float
) -> None:
    monitor = next((cb for cb in trainer.callbacks if isinstance(cb, LMThroughputMonitor)), None)
    rates = monitor.training_rates() if monitor else {}
    tokens_per_sec = rates.get("items_per_sec", rates.get("device/items_per_sec"))
    if tokens_per_sec is None and trainer.global_step:
        tokens_per_sec = metrics.get("train/tokens", 0.0) / fit_seconds or None
    tensorboard = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
    checkpoint = trainer.checkpoint_callback
    sample = generate_text(
        module.net,
        checkpoint_tokenizer(module),
        cfg.sample.prompt,
        cfg.sample.max_new_tokens,
        temperature=cfg.sample.temperature,
        top_k=cfg.sample.top_k,
        seed=cfg.sample.seed,
        device=module.device,
    )
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
    metrics = train(cfg)
    return metrics.get("val/loss")


if __name__ == "__main__":
    main()
