"""Early checks of a composed config: a bad value fails in a second, before any data is
prepared, any file is written or any training starts.

The checks reuse the constructors' own argument checks (data module, network, optimizer,
schedule) by building those objects cheaply: the data module without touching the corpus,
the network on the ``meta`` device (no memory, no compute). Errors are :class:`ConfigError`
(or :class:`~lmforge.errors.DataError`, :class:`~lmforge.errors.PrecisionError`) with a
one-line message naming the key.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lmforge.data.tokenizer import MIN_BPE_VOCAB
from lmforge.errors import ConfigError
from lmforge.models.sampling import check_sampling_args
from lmforge.training.config import build_datamodule
from lmforge.training.network import build_network
from lmforge.training.precision import check_precision
from lmforge.training.safety import check_nonfinite_action

# Stands in for the tokenizer's vocabulary size, which is only known after data preparation.
PLACEHOLDER_VOCAB_SIZE = 256
EVAL_SPLITS = ("val", "test")


def check_run_config(cfg: DictConfig) -> None:
    """Check a training config (``train`` or ``fabric``): data settings, run length, the network,
    optimizer and schedule arguments, the precision on this hardware, and the shared run settings."""
    build_datamodule(cfg.data)  # its constructor checks every data value; the corpus is not read
    if cfg.data.get("tokenizer") == "bpe" and cfg.data.vocab_size < MIN_BPE_VOCAB:
        raise ConfigError(
            f"data.vocab_size={cfg.data.vocab_size} is too small for byte-level BPE, which needs the 256 byte "
            f"values plus an end-of-text token; set data.vocab_size >= {MIN_BPE_VOCAB}"
        )
    if not cfg.trainer.get("fast_dev_run") and not (cfg.trainer.get("max_steps") or 0) >= 1:
        raise ConfigError(
            f"trainer.max_steps={cfg.trainer.get('max_steps')}: training is counted in optimizer steps over an "
            "endless stream of windows; set trainer.max_steps >= 1"
        )
    if not cfg.process_group_timeout > 0:
        raise ConfigError(f"process_group_timeout={cfg.process_group_timeout} must be > 0 (seconds)")
    check_nonfinite_action(cfg.nonfinite_loss)
    if OmegaConf.is_missing(cfg.model, "hf_config"):  # model=hf without init_from
        raise ConfigError(
            "model=hf wraps a pretrained Hugging Face model: set init_from=<model directory or Hub id> "
            "(or model.hf_config={model_type:...,...} to train that architecture from random weights)"
        )
    with torch.device("meta"):
        net = _instantiate("model", cfg.model, build=build_network, vocab_size=PLACEHOLDER_VOCAB_SIZE)
    optimizer = _instantiate("optimizer", cfg.optimizer, model=net)
    if cfg.get("scheduler"):
        _instantiate("scheduler", cfg.scheduler, optimizer=optimizer)
    check_precision(cfg.trainer.precision, cfg.trainer.accelerator, cfg.trainer.get("strategy"), net)


def check_eval_config(cfg: DictConfig) -> None:
    """Check an ``eval`` config (the checkpoint itself is checked when it is read)."""
    unknown = [split for split in cfg.splits if split not in EVAL_SPLITS]
    if unknown or not cfg.splits:
        raise ConfigError(f"splits={list(cfg.splits)} must be a non-empty list of {', '.join(EVAL_SPLITS)}")


def check_generate_config(cfg: DictConfig) -> None:
    """Check a ``generate`` config's sampling settings."""
    if not cfg.prompt:
        raise ConfigError('prompt is empty; give some text to continue, e.g. prompt="def "')
    for key in ("max_new_tokens", "num_samples", "batch_size"):
        if not cfg[key] >= 1:
            raise ConfigError(f"{key}={cfg[key]} must be >= 1")
    try:
        check_sampling_args(cfg.temperature, cfg.top_k, cfg.top_p)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def _instantiate(group: str, node: DictConfig, build: Callable[..., Any] = instantiate, **kwargs: Any) -> Any:
    """Build ``node`` (with ``build``: Hydra's ``instantiate`` or :func:`build_network`), turning the
    target's own ``ValueError`` into a :class:`ConfigError`."""
    try:
        return build(node, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        if not isinstance(cause, ValueError):
            raise
        message = str(cause)
        raise ConfigError(message if f"{group}." in message else f"{group}: {message}") from cause
