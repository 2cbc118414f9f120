"""``lmforge fabric [overrides]``: train with the Fabric loop (:mod:`lmforge.fabric.loop`).

``trainer.devices=N`` launches N processes; or use Lightning's launcher, whose flags replace
the ``trainer`` hardware settings:
``fabric run src/lmforge/cli/fabric.py --accelerator=cpu --devices=2 --strategy=ddp [overrides]``.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from lmforge.errors import reported_errors
from lmforge.fabric.loop import fit
from lmforge.training.config import CONFIG_PATH


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="fabric")
def main(cfg: DictConfig) -> float | None:
    with reported_errors():
        metrics = fit(cfg)
    return metrics.get("val/loss")


if __name__ == "__main__":
    main()
