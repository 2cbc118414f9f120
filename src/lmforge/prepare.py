"""Tokenize the configured corpus into the token cache: ``lmforge prepare [overrides]``."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from lmforge.config import CONFIG_DIR, apply_extras, build_datamodule
from lmforge.errors import reported_errors


def prepare(cfg: DictConfig) -> str:
    """Build (or reuse) the token cache; returns its directory."""
    apply_extras(cfg)
    datamodule = build_datamodule(cfg.data)
    datamodule.prepare_data()
    print(f"token cache: {datamodule.cache_path} (vocabulary size {datamodule.vocab_size})")
    return str(datamodule.cache_path)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="prepare")
def main(cfg: DictConfig) -> None:
    with reported_errors():
        prepare(cfg)


if __name__ == "__main__":
    main()
