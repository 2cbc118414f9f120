"""Hydra plumbing shared by the entry points: where the configs are, and how to build things from them.

The configs live in the repository's top-level ``configs/`` and are installed inside the wheel
as the package ``lmforge.configs``. Run from a checkout (an editable install, or ``src/`` on
the path), the checkout's folder is used, so edits apply at once; otherwise Hydra finds the
installed copy through its package search path (``pkg://lmforge.configs``).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import rich
import rich.syntax
import rich.tree
from hydra import compose, initialize_config_dir, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from lmforge.training.console import quiet_third_party_chatter
from lmforge.training.run_dir import RESOLVERS

PACKAGE_DIR = Path(__file__).resolve().parents[1]
# In a checkout the configs sit at the repository root, next to src/.
CHECKOUT_DIR = PACKAGE_DIR.parents[1]
CONFIG_MODULE = "lmforge.configs"


def in_checkout() -> bool:
    """Whether lmforge runs from a source checkout (its ``configs/`` next to ``src/``) rather than a wheel."""
    return (CHECKOUT_DIR / "pyproject.toml").is_file() and (CHECKOUT_DIR / "configs" / "train.yaml").is_file()


# The `config_path` of every @hydra.main: an absolute folder, or Hydra's package search path.
CONFIG_PATH = str(CHECKOUT_DIR / "configs") if in_checkout() else f"pkg://{CONFIG_MODULE}"


def project_root() -> str:
    """Where runs write by default (``paths.root_dir``): the checkout, else the working directory."""
    return str(CHECKOUT_DIR) if in_checkout() else str(Path.cwd())


for _name, _resolver in (("lmforge_root", project_root), *RESOLVERS.items()):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _resolver, use_cache=_name != "lmforge_root")


def compose_in_process(config_name: str, overrides: list[str], output_dir: str | Path) -> DictConfig:
    """Compose ``configs/<config_name>.yaml`` with ``overrides`` as ``lmforge <command>`` would, without the CLI.

    For tests, benchmarks and notebooks: the run directory (``paths.output_dir``) is
    ``output_dir``, and Hydra's runtime config is set, so the result can go straight to
    ``lmforge.cli.train.train`` or ``lmforge.fabric.loop.fit``.
    """
    GlobalHydra.instance().clear()
    if in_checkout():
        context = initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3")
    else:
        context = initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3")
    with context:
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        del cfg["hydra"]
    return cfg


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


def build_datamodule(data_cfg: DictConfig | dict, **overrides: Any):
    """Instantiate the data module; ``data.path`` is a shorthand that a corpus source reads (task data
    takes it itself), and ``data.global_batch_tokens`` is for the batch plan."""
    node = to_container(data_cfg)
    if "source" in node:
        node.pop("path", None)
    node.pop("global_batch_tokens", None)  # read by the batch plan (lmforge.training.batching)
    return instantiate(node, **overrides)


def model_config(model_cfg: DictConfig, vocab_size: int) -> dict:
    """The network's config with the vocabulary size of the data's tokenizer filled in."""
    node = to_container(model_cfg)
    node["vocab_size"] = vocab_size
    return node


def apply_extras(cfg: DictConfig) -> None:
    """Optional start-up conveniences from the ``extras`` group."""
    extras = cfg.get("extras") or {}
    if extras.get("quiet_lightning", True):
        quiet_third_party_chatter()
    if extras.get("ignore_warnings"):
        warnings.filterwarnings("ignore")
    if extras.get("print_config"):
        print_config(cfg)


def print_config(cfg: DictConfig) -> None:
    """Print the composed config as a rich tree, one branch per top-level group."""
    tree = rich.tree.Tree("config", guide_style="dim")
    for key, value in cfg.items():
        text = OmegaConf.to_yaml(value, resolve=False) if isinstance(value, DictConfig) else str(value)
        tree.add(str(key)).add(rich.syntax.Syntax(text.rstrip(), "yaml"))
    rich.print(tree)
