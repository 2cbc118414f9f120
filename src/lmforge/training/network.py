"""Networks from their configs, one way for every command: the model, and LoRA adapters on it
when its config has a ``lora`` entry (``lora=default``, :mod:`lmforge.training.lora`).

The ``lora`` entry travels inside the network's config (checkpoints, ``ckpt_path=last``
matching, ``eval``/``generate``); it is instantiated by its ``_target_`` only when present, so
runs without adapters never import ``peft``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from hydra.utils import instantiate

from lmforge.models.base import LanguageModel

LORA_KEY = "lora"


def build_network(net_config: Mapping[str, Any], **overrides: Any) -> LanguageModel:
    """Instantiate the model of ``net_config`` (``overrides`` replace its arguments), with its LoRA adapters."""
    node = {key: value for key, value in net_config.items() if key != LORA_KEY}
    net = instantiate(node, **overrides)
    lora = net_config.get(LORA_KEY)
    return instantiate(lora).apply(net) if lora else net


def merged_network(
    net_config: Mapping[str, Any], weights: Mapping[str, torch.Tensor]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config and weights of the network with its LoRA adapters merged into the weights: the plain
    model, which any tool reads (``export``, ``consolidate``); unchanged without adapters."""
    lora = net_config.get(LORA_KEY)
    if not lora:
        return dict(net_config), dict(weights)
    net = build_network(net_config)
    net.load_state_dict(weights)
    instantiate(lora).merge(net)
    return {key: value for key, value in net_config.items() if key != LORA_KEY}, net.state_dict()
