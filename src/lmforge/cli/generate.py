"""``lmforge generate ckpt_path=<checkpoint> prompt="..."``: sample text from a checkpoint of either loop."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from lmforge.errors import reported_errors
from lmforge.training.checkpoint import read_network, resolve_checkpoint
from lmforge.training.config import CONFIG_PATH
from lmforge.training.generation import generate_sample
from lmforge.training.validation import check_generate_config


def generate(cfg: DictConfig) -> list[str]:
    """Print and return ``num_samples`` continuations of the prompt."""
    check_generate_config(cfg)
    network = read_network(resolve_checkpoint(cfg.ckpt_path, cfg.paths.log_dir), cfg.allow_unsafe_checkpoint)
    net, tokenizer = network.build(cfg.device), network.tokenizer
    samples = []
    for i in range(cfg.num_samples):
        text = generate_sample(net, tokenizer, cfg, cfg.device, seed=cfg.seed + i)
        if cfg.num_samples > 1:
            print(f"----- sample {i + 1}/{cfg.num_samples} -----")
        print(text)
        samples.append(text)
    return samples


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="generate")
def main(cfg: DictConfig) -> None:
    with reported_errors():
        generate(cfg)


if __name__ == "__main__":
    main()
