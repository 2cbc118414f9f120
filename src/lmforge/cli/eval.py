"""``lmforge eval ckpt_path=<checkpoint>``: val/test loss and perplexity of a checkpoint of either loop."""

from __future__ import annotations

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from lmforge.errors import ConfigError, reported_errors
from lmforge.lightning.module import LMModule
from lmforge.training.batching import trainer_settings
from lmforge.training.checkpoint import read_network, resolve_checkpoint
from lmforge.training.config import CONFIG_PATH, apply_extras, build_datamodule
from lmforge.training.validation import check_eval_config


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Loss and perplexity of the checkpoint on the requested splits."""
    apply_extras(cfg)
    check_eval_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    network = read_network(resolve_checkpoint(cfg.ckpt_path, cfg.paths.log_dir), cfg.allow_unsafe_checkpoint)
    module = LMModule.from_network(network)
    # Whatever the corpus, it is tokenized with the checkpoint's own tokenizer.
    datamodule = build_datamodule(cfg.get("data") or network.data_config, tokenizer_json=network.tokenizer_json)
    context = module.net.context_limit
    if context is not None and datamodule.block_size > context:
        raise ConfigError(
            f"data.block_size={datamodule.block_size} is longer than the checkpoint's context of {context} tokens; "
            f"set data.block_size={context} (or fewer)"
        )
    trainer: L.Trainer = instantiate(trainer_settings(cfg.trainer), logger=False, enable_checkpointing=False)
    metrics: dict[str, float] = {}
    for split in cfg.splits:
        run = trainer.validate if split == "val" else trainer.test
        results = run(module, datamodule=datamodule, verbose=False)
        metrics.update({key: float(value) for key, value in results[0].items()})
    if trainer.is_global_zero:
        table = Table(title=f"lmforge eval: {network.path}")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key, value in sorted(metrics.items()):
            table.add_row(key, f"{value:.4f}")
        Console().print(table)
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
def main(cfg: DictConfig) -> None:
    with reported_errors():
        evaluate(cfg)


if __name__ == "__main__":
    main()
