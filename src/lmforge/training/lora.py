"""LoRA adapters (Hu et al., 2021) on any lmforge network, through ``peft`` (``lora=default``).

``peft``'s ``inject_adapter_in_model`` works on any ``nn.Module``, so the same adapters serve
lmforge's GPT and the Hugging Face wrapper (``model=hf``). By default they go on every linear
layer inside the repeated blocks (the model's ``hidden_matrix_names``: attention and MLP
projections); the embeddings, norms and head stay frozen with everything else, so the optimizer
holds state for the adapters only. A LoRA network still loads plain weights (``init_from``, a
pretrained model): a load hook renames each adapted layer's weights to its ``base_layer`` and
keeps the fresh adapters. :meth:`LoRA.merge` folds the adapters into the weights
(``W + B A * alpha / r``), which ``lmforge export`` and ``lmforge consolidate`` do.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from lmforge.errors import ConfigError
from lmforge.models.base import LanguageModel

ADAPTER_MARK = ".lora_"  # in the names of the adapter parameters


class LoRA:
    """Rank ``r`` adapters scaled by ``alpha / r`` with ``dropout`` on their input, on ``target_modules``
    (module names or suffixes; None: the linear layers of the model's repeated blocks)."""

    def __init__(
        self, r: int = 8, alpha: float = 16.0, dropout: float = 0.0, target_modules: list[str] | None = None
    ) -> None:
        if not (isinstance(r, int) and r >= 1):
            raise ValueError(f"lora.r={r} must be an integer >= 1")
        if not alpha > 0:
            raise ValueError(f"lora.alpha={alpha} must be > 0")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"lora.dropout={dropout} must be in [0, 1)")
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.target_modules = list(target_modules) if target_modules else None

    def targets(self, net: LanguageModel) -> list[str]:
        """The names of the modules that get adapters."""
        if self.target_modules:
            return self.target_modules
        names = sorted({name.rsplit(".", 1)[0] for name in net.hidden_matrix_names() if name.endswith(".weight")})
        if not names:
            raise ConfigError(
                f"{type(net).__name__} has no linear layers in repeated blocks for LoRA; "
                "name the modules to adapt with lora.target_modules=[...]"
            )
        return names

    def apply(self, net: LanguageModel) -> LanguageModel:
        """Add the adapters to ``net`` in place and freeze every other parameter; returns ``net``."""
        config = LoraConfig(
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=self.targets(net)
        )
        try:
            inject_adapter_in_model(config, net)
        except ValueError as exc:  # no module matched, or a module type LoRA does not support
            raise ConfigError(f"lora.target_modules: {str(exc).splitlines()[0]}") from None
        for name, param in net.named_parameters():
            param.requires_grad = ADAPTER_MARK in name
        adapted = [name for name, module in net.named_modules() if isinstance(module, LoraLayer)]
        net.register_load_state_dict_pre_hook(partial(_accept_plain_weights, adapted))
        return net

    def merge(self, net: nn.Module) -> nn.Module:
        """Fold the adapters into the weights and put the plain layers back, in place; returns ``net``."""
        for name, module in list(net.named_modules()):
            if isinstance(module, LoraLayer):
                module.merge()
                parent_name, _, child = name.rpartition(".")
                setattr(net.get_submodule(parent_name), child, module.get_base_layer())
        for param in net.parameters():
            param.requires_grad = True
        return net


def _accept_plain_weights(adapted: list[str], module: nn.Module, state_dict: dict[str, Any], prefix: str, *_) -> None:
    """Load hook: weights saved without adapters go to the adapted layers' ``base_layer``; adapters
    missing from them keep their current (initial) values."""
    for name in adapted:
        for leaf in ("weight", "bias"):
            plain, base = f"{prefix}{name}.{leaf}", f"{prefix}{name}.base_layer.{leaf}"
            if plain in state_dict and base not in state_dict:
                state_dict[base] = state_dict.pop(plain)
    for key, value in module.state_dict().items():
        if ADAPTER_MARK in key and prefix + key not in state_dict:
            state_dict[prefix + key] = value
