"""``lmforge prepare [overrides]``: tokenize the configured corpus into the token cache only.

With ``init_from``, the corpus is tokenized with the source's tokenizer, as the run will do."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from lmforge.errors import reported_errors
from lmforge.training.config import CONFIG_PATH, apply_extras, build_datamodule
from lmforge.training.initialization import read_initial_tokenizer
from lmforge.training.mirror import local_log_dir


def prepare(cfg: DictConfig) -> str:
    """Build (or reuse) the token cache; returns its directory."""
    apply_extras(cfg)
    tokenizer_json = None
    if cfg.get("init_from"):
        log_dir = local_log_dir(cfg.paths.log_dir) / "train"  # where `lmforge train` looks for init_from=last
        tokenizer_json = read_initial_tokenizer(str(cfg.init_from), log_dir, cfg.allow_unsafe_checkpoint)
    datamodule = build_datamodule(cfg.data, tokenizer_json=tokenizer_json)
    datamodule.prepare_data()
    print(f"token cache: {datamodule.cache_path} (vocabulary size {datamodule.vocab_size})")
    return str(datamodule.cache_path)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="prepare")
def main(cfg: DictConfig) -> None:
    with reported_errors():
        prepare(cfg)


if __name__ == "__main__":
    main()
