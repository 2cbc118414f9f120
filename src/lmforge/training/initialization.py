"""``init_from``: the weights a run starts from, kept apart from ``ckpt_path`` (exact resume).

``init_from`` names a Hugging Face model directory or Hub id (GPT-2 and Llama-family
layouts, :mod:`lmforge.training.pretrained`) or an lmforge checkpoint of either loop (a file, a
sharded directory or a run directory). The run takes the source's architecture (``model.*``
but ``dropout``), its tokenizer (the token cache is built with it) and its weights, then trains
from step 0 with a fresh optimizer and schedule. A run that also resumes (``ckpt_path``) takes
the weights from the resume checkpoint and only the architecture and tokenizer from the source.
"""

from __future__ import annotations

import re  # [gpt]
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import CheckpointError
from lmforge.models.gpt import shorten_context  # [gpt]
from lmforge.training.checkpoint import read_network, resolve_checkpoint
from lmforge.training.pretrained import GPT_TARGET, model_directory, read_pretrained  # [gpt]

_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")  # a Hub id: gpt2, Qwen/Qwen2-0.5B  # [gpt]


@dataclass
class InitialWeights:
    """The network a run starts from: its config (context set to the run's), weights and tokenizer."""

    source: str
    net_config: dict[str, Any]
    weights: dict[str, torch.Tensor]
    tokenizer_json: str | None


# [gpt]
def is_hugging_face_source(source: str) -> bool:
    """A directory with a ``config.json``, or a Hub id (``name`` or ``org/name``) that is no local path,
    no ``*.ckpt`` name and not ``last`` (the newest lmforge checkpoint)."""
    path = Path(source).expanduser()
    if (path / "config.json").is_file():
        return True
    looks_like_checkpoint = source == "last" or source.endswith(".ckpt")
    return not path.exists() and not looks_like_checkpoint and bool(_HUB_ID.fullmatch(source))


# [/gpt]


def read_initial_weights(source: str, block_size: int, log_dir: str | Path, allow_unsafe: bool) -> InitialWeights:
    """The network of ``source`` for a context of ``block_size`` tokens."""
    # [gpt]
    if is_hugging_face_source(source):
        model = read_pretrained(source, block_size)
        return InitialWeights(str(model.path), model.net_config, model.weights, model.tokenizer_json)
    # [/gpt]
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
    (``lmforge prepare``); None when a Hugging Face directory has no ``tokenizer.json``."""
    # [gpt]
    if is_hugging_face_source(source):
        tokenizer_file = model_directory(source) / "tokenizer.json"
        return tokenizer_file.read_text(encoding="utf-8") if tokenizer_file.is_file() else None
    # [/gpt]
    return read_network(resolve_checkpoint(source, log_dir), allow_unsafe).tokenizer_json
