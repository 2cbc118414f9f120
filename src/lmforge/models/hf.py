"""Any Hugging Face ``AutoModelForCausalLM`` as an lmforge language model (``model=hf``).

lmforge's own GPT imports GPT-2 and Llama-family weights exactly (``gpt_hf.py``); this wrapper
is for every other architecture ``transformers`` implements (GPT-NeoX, Phi, OPT, Gemma, ...).
It holds the Hugging Face model as ``self.hf`` and is built from its ``config.json`` contents
(``hf_config``), so a checkpoint rebuilds it offline, without the original directory; the
weights come from ``init_from`` (:mod:`lmforge.training.hf_models`) or a checkpoint.

What lmforge needs from a model maps onto Hugging Face's conventions: the logits of
``forward(input_ids)``; generation through its ``DynamicCache``; and the repeated decoder layers
(FSDP2 units, activation checkpointing, ``torch.compile``) are the modules the model names in
``_no_split_modules``, the list ``transformers`` keeps for exactly this purpose.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lmforge.models.base import LanguageModel

try:  # the [hf] extra
    from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache
except ImportError:  # pragma: no cover - depends on the installation
    AutoConfig = AutoModelForCausalLM = DynamicCache = None

HF_CAUSAL_LM_TARGET = f"{__name__}.HFCausalLM"  # its Hydra ``_target_``
# The dropout settings of Hugging Face configs (names differ by architecture); ``dropout=`` sets
# every one the model's config has.
DROPOUT_KEYS = (
    "dropout",
    "attention_dropout",
    "hidden_dropout",
    "activation_dropout",
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
)
# Settings of a ``config.json`` that say where and when it was written, not what the model is.
_PROVENANCE_KEYS = ("_name_or_path", "transformers_version")
# The context of a config: the first of these that it sets.
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def architecture_config(config: Any) -> dict[str, Any]:
    """The settings of a ``transformers`` config that differ from its class's defaults (plus
    ``model_type``): what :class:`HFCausalLM` needs to rebuild the model, small enough for a run's config."""
    settings = config.to_diff_dict()
    for key in _PROVENANCE_KEYS:
        settings.pop(key, None)
    settings["model_type"] = config.model_type
    return settings


def _plain(value: Any) -> Any:
    """``value`` with every mapping a ``dict`` and every sequence a ``list`` (config systems hand over
    their own containers, which ``transformers``' config validation rejects)."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_plain(item) for item in value]
    return value


def longest_context(config: Any) -> int | None:
    """The most positions a model config allows, or None if it sets no limit."""
    for key in _CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class HFCausalLM(LanguageModel):
    """A ``transformers`` causal language model behind lmforge's :class:`LanguageModel` interface.

    ``hf_config`` holds the model's ``config.json`` settings (``model_type`` included);
    ``vocab_size`` and ``dropout``, when given, replace the config's; ``block_size`` is the
    context lmforge trains and generates with (at most the config's own limit);
    ``attn_implementation`` picks the attention kernel (``sdpa`` by default, ``eager`` always works).
    The weights start random (seeded like every lmforge model); ``init_from`` loads the pretrained ones.
    """

    def __init__(
        self,
        hf_config: dict[str, Any],
        block_size: int,
        vocab_size: int | None = None,
        dropout: float | None = None,
        attn_implementation: str = "sdpa",
    ):
        super().__init__()
        if AutoConfig is None:
            raise ModuleNotFoundError("model=hf needs transformers: pip install 'lmforge[hf]'")
        settings = _plain(hf_config)
        model_type = settings.pop("model_type", None)
        if not model_type:
            raise ValueError("model.hf_config has no model_type; it must hold a config.json of transformers")
        overrides: dict[str, Any] = {} if vocab_size is None else {"vocab_size": vocab_size}
        config = AutoConfig.for_model(model_type, **{**settings, **overrides})
        if dropout is not None:
            if not 0.0 <= dropout < 1.0:
                raise ValueError(f"model.dropout={dropout} must be in [0, 1)")
            for key in DROPOUT_KEYS:
                if isinstance(getattr(config, key, None), float):
                    setattr(config, key, dropout)
        limit = longest_context(config)
        if block_size < 1 or (limit is not None and block_size > limit):
            raise ValueError(
                f"block_size={block_size} must be between 1 and the {limit} positions of this {model_type} model; "
                f"set data.block_size <= {limit}"
            )
        self.block_size = block_size
        self.hf = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)

    @property
    def context_limit(self) -> int:
        return self.block_size

    def repeated_blocks(self) -> list[nn.Module]:
        """The decoder layers: the modules of the classes the model lists in ``_no_split_modules``."""
        layer_classes = set(getattr(self.hf, "_no_split_modules", None) or ())
        return [module for module in self.hf.modules() if type(module).__name__ in layer_classes]

    def hidden_matrix_names(self) -> set[str]:
        """The 2-D weights inside the decoder layers."""
        layers = {id(module) for module in self.repeated_blocks()}
        return {
            f"{prefix}.{name}"
            for prefix, module in self.named_modules()
            if id(module) in layers
            for name, p in module.named_parameters()
            if p.ndim == 2
        }

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) for token ids ``idx`` (B, T), T <= block_size."""
        if idx.size(1) > self.block_size:
            raise ValueError(f"sequence length T={idx.size(1)} exceeds block_size={self.block_size}")
        return self.hf(input_ids=idx, use_cache=False).logits

    def init_state(self, batch_size: int, device: torch.device | str) -> Any:
        """An empty ``DynamicCache`` (it grows with the tokens fed; batch and device come from them)."""
        return DynamicCache(config=self.hf.config)

    def forward_step(self, idx: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        """Logits (B, T_new, V) for ``idx`` following the tokens in the cache ``state``; the cache grows in place."""
        output = self.hf(input_ids=idx, past_key_values=state, use_cache=True)
        return output.logits, output.past_key_values
