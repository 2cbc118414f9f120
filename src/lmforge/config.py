"""Hydra plumbing shared by the entry points: where configs live and how to build things from them."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("lmforge")

PACKAGE_DIR = Path(__file__).resolve().parent
# In a checkout (editable install) the configs sit at the repository root, next to src/.
CHECKOUT_DIR = PACKAGE_DIR.parents[1]
CONFIG_DIR = str(CHECKOUT_DIR / "configs")


def project_root() -> str:
    """The checkout when lmforge runs from one, else the current working directory."""
    if (CHECKOUT_DIR / "pyproject.toml").is_file() and (CHECKOUT_DIR / "configs").is_dir():
        return str(CHECKOUT_DIR)
    return str(Path.cwd())


if not OmegaConf.has_resolver("lmforge_root"):
    OmegaConf.register_new_resolver("lmforge_root", project_root)


def to_container(cfg: DictConfig | dict | None) -> dict | None:
    """A resolved plain ``dict`` (safe to store in checkpoints) of a config node."""
    if cfg is None:
        return None
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)


def instantiate_all(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a group like ``callbacks`` or ``logger``."""
    if not cfg:
        return []
    return [instantiate(node) for node in cfg.values() if isinstance(node, DictConfig) and "_target_" in node]


def build_datamodule(data_cfg: DictConfig, **overrides: Any):
    """Instantiate the data module; ``data.path`` is a shorthand that the source reads."""
    node = OmegaConf.to_container(data_cfg, resolve=True)
    node.pop("path", None)
    return instantiate(node, **overrides)


def model_config(model_cfg: DictConfig, vocab_size: int) -> dict:
    """The network's config with the vocabulary size of the data's tokenizer filled in."""
    node = to_container(model_cfg)
    node["vocab_size"] = vocab_size
    return node


def apply_extras(cfg: DictConfig) -> None:
    """Optional start-up conveniences from the ``extras`` group."""
    extras = cfg.get("extras") or {}
    if extras.get("ignore_warnings"):
        warnings.filterwarnings("ignore")
    if extras.get("print_config"):
        print_config(cfg)


def print_config(cfg: DictConfig) -> None:
    """Print the composed config as a rich tree, one branch per top-level group."""
    import rich
    import rich.syntax
    import rich.tree

    tree = rich.tree.Tree("config", guide_style="dim")
    for key, value in cfg.items():
        text = OmegaConf.to_yaml(value, resolve=False) if isinstance(value, DictConfig) else str(value)
        tree.add(str(key)).add(rich.syntax.Syntax(text.rstrip(), "yaml"))
    rich.print(tree)
