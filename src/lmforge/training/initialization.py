"""``init_from``: the weights a run starts from, kept apart from ``ckpt_path`` (exact resume).

``init_from`` names a Hugging Face model directory or Hub id, or an lmforge checkpoint of either
loop (a file, a sharded directory or a run directory). A Hugging Face model becomes lmforge's own
GPT when the run's model is the GPT (GPT-2 and Llama-family layouts,
:mod:`lmforge.training.pretrained`), and otherwise (``model=hf``) is read by ``transformers``
into the generic wrapper :class:`lmforge.models.hf.HFCausalLM`, whatever its architecture.
The run takes the source's architecture (``model.*`` but the run settings :data:`RUN_SETTINGS`),
its tokenizer (the token cache is built with it) and its weights, then trains from step 0 with a
fresh optimizer and schedule. A run that also resumes (``ckpt_path``) takes the weights from the
resume checkpoint and only the architecture and tokenizer from the source.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import cached_file

from lmforge.errors import CheckpointError, ConversionError
from lmforge.models.gpt import shorten_context  # [gpt]
from lmforge.models.hf import HF_CAUSAL_LM_TARGET, architecture_config
from lmforge.training.checkpoint import read_network, resolve_checkpoint
from lmforge.training.pretrained import GPT_TARGET, read_pretrained  # [gpt]

_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")  # a Hub id: gpt2, Qwen/Qwen2-0.5B
# Model settings that belong to the run, not to the architecture: kept from the run's model config.
RUN_SETTINGS = ("dropout", "attn_implementation")


@dataclass
class InitialWeights:
    """The network a run starts from: its config (context set to the run's), weights and tokenizer."""

    source: str
    net_config: dict[str, Any]
    weights: dict[str, torch.Tensor]
    tokenizer_json: str | None


def is_hugging_face_source(source: str) -> bool:
    """A directory with a ``config.json``, or a Hub id (``name`` or ``org/name``) that is no local path,
    no ``*.ckpt`` name and not ``last`` (the newest lmforge checkpoint)."""
    path = Path(source).expanduser()
    if (path / "config.json").is_file():
        return True
    looks_like_checkpoint = source == "last" or source.endswith(".ckpt")
    return not path.exists() and not looks_like_checkpoint and bool(_HUB_ID.fullmatch(source))


def read_initial_weights(
    source: str, block_size: int, log_dir: str | Path, allow_unsafe: bool, model_target: str | None = None
) -> InitialWeights:
    """The network of ``source`` for a context of ``block_size`` tokens; a Hugging Face model becomes
    lmforge's GPT when ``model_target`` (the run's ``model._target_``) is the GPT, else the wrapper."""
    if is_hugging_face_source(source):
        # [gpt]
        if model_target == GPT_TARGET:
            model = read_pretrained(source, block_size)
            return InitialWeights(str(model.path), model.net_config, model.weights, model.tokenizer_json)
        # [/gpt]
        return read_causal_lm(source, block_size)
    network = read_network(resolve_checkpoint(source, log_dir), allow_unsafe)
    weights = network.weights
    # [gpt]
    if network.net_config.get("_target_") == GPT_TARGET:
        try:
            weights = shorten_context(weights, block_size)
        except ValueError as exc:
            raise CheckpointError(f"init_from={source}: {exc}; set data.block_size to at most that") from None
    # [/gpt]
    return InitialWeights(
        str(network.path), {**network.net_config, "block_size": block_size}, weights, network.tokenizer_json
    )


def read_initial_tokenizer(source: str, log_dir: str | Path, allow_unsafe: bool) -> str | None:
    """The tokenizer (JSON) that ``init_from=source`` brings, without building the network
    (``lmforge prepare``); None when a Hugging Face model has no fast tokenizer."""
    if is_hugging_face_source(source):
        return read_hf_tokenizer(source)
    return read_network(resolve_checkpoint(source, log_dir), allow_unsafe).tokenizer_json


def read_causal_lm(source: str, block_size: int) -> InitialWeights:
    """Any ``AutoModelForCausalLM`` (a directory or Hub id) as the wrapper ``model=hf``: its config,
    weights (read by ``transformers``, so every format and sharding it reads) and tokenizer."""
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    except OSError as exc:  # missing files, offline, unknown Hub id
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"init_from={source}: transformers cannot load it ({reason})") from None
    except ValueError as exc:  # an architecture transformers does not know (custom code)
        raise ConversionError(
            f"init_from={source}: {str(exc).strip().splitlines()[0]}; lmforge runs only architectures that "
            "transformers implements (no trust_remote_code)"
        ) from None
    net_config = {
        "_target_": HF_CAUSAL_LM_TARGET,
        "hf_config": architecture_config(model.config),
        "block_size": block_size,
        "vocab_size": model.config.vocab_size,
    }
    weights = {f"hf.{name}": tensor for name, tensor in model.state_dict().items()}
    return InitialWeights(str(source), net_config, weights, read_hf_tokenizer(source))


def read_hf_tokenizer(source: str) -> str | None:
    """A Hugging Face model's tokenizer as ``tokenizers`` JSON: its ``tokenizer.json`` as shipped, else
    the fast tokenizer ``transformers`` builds from its other tokenizer files; None if it has none."""
    tokenizer_file = cached_file(source, "tokenizer.json", _raise_exceptions_for_missing_entries=False)
    if tokenizer_file is not None:
        return Path(tokenizer_file).read_text(encoding="utf-8")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError):
        return None
    return tokenizer.backend_tokenizer.to_str() if tokenizer.is_fast else None
