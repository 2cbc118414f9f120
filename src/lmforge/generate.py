"""Sample text from a checkpoint: ``lmforge generate ckpt_path=<file> prompt="..."``."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from lmforge.callbacks import generate_text
from lmforge.checkpoint import checkpoint_tokenizer, load_module, resolve_checkpoint
from lmforge.config import CONFIG_DIR
from lmforge.errors import reported_errors
from lmforge.validation import validate_generate_config


def generate(cfg: DictConfig) -> list[str]:
    """Print and return ``num_samples`` continuations of the prompt."""
    validate_generate_config(cfg)
    module = load_module(
        resolve_checkpoint(cfg.ckpt_path, cfg.paths.log_dir),
        map_location=cfg.device,
        allow_unsafe=cfg.allow_unsafe_checkpoint,
    )
    tokenizer = checkpoint_tokenizer(module)
    samples = []
    for i in range(cfg.num_samples):
        text = generate_text(
            module.net,
            tokenizer,
            cfg.prompt,
            cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            seed=cfg.seed + i,
            device=cfg.device,
        )
        if cfg.num_samples > 1:
            print(f"----- sample {i + 1}/{cfg.num_samples} -----")
        print(text)
        samples.append(text)
    return samples


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="generate")
def main(cfg: DictConfig) -> None:
    with reported_errors():
        generate(cfg)


if __name__ == "__main__":
    main()
