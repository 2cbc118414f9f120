"""Early checks of a composed config: a bad value fails in a second, before any data is
prepared, any file is written or any training starts.

The checks reuse the constructors' own argument checks (data module, network, optimizer,
schedule) by building those objects cheaply: the data module without touching the corpus,
the network on the ``meta`` device (no memory, no compute). Errors are :class:`ConfigError`
(or the data's :class:`~lmforge.data.DataError`) with a one-line message naming the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from lmforge.checkpoint import check_model_matches, check_tokenizer_matches, read_checkpoint, resolve_checkpoint
from lmforge.config import build_datamodule, to_container
from lmforge.data.tokenizer import MIN_BPE_VOCAB
from lmforge.errors import ConfigError
from lmforge.models.sampling import check_sampling_args

# Stands in for the tokenizer's vocabulary size, which is only known after data preparation.
PLACEHOLDER_VOCAB_SIZE = 256
EVAL_SPLITS = ("val", "test")


def validate_train_config(cfg: DictConfig) -> str | None:
    """Check a ``train`` config; return the checkpoint file to resume from (None: a new run).

    Besides :func:`validate_run_config`, checks that a checkpoint given as ``ckpt_path``
    exists, is readable and holds the network the config describes (the vocabulary is checked
    after data preparation, by :func:`check_resume_tokenizer`).
    """
    validate_run_config(cfg)
    resume_from = resolve_checkpoint(cfg.get("ckpt_path"), cfg.paths.log_dir)
    if resume_from is not None and Path(resume_from).is_file():  # sharded directories: checked on load
        checkpoint = read_checkpoint(resume_from, cfg.get("allow_unsafe_checkpoint", False))
        check_model_matches(checkpoint, to_container(cfg.model), resume_from)
    return resume_from


def validate_run_config(cfg: DictConfig) -> None:
    """Check the data settings, the network, optimizer and schedule arguments and the run length
    of a training config (``train`` or ``fabric``)."""
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
    with torch.device("meta"):
        net = _instantiate("model", cfg.model, vocab_size=PLACEHOLDER_VOCAB_SIZE)
    optimizer = _instantiate("optimizer", cfg.optimizer, model=net)
    if cfg.get("scheduler"):
        _instantiate("scheduler", cfg.scheduler, optimizer=optimizer)


def check_resume_tokenizer(cfg: DictConfig, resume_from: str | None, tokenizer_json: str) -> None:
    """After data preparation: the data's tokenizer must be the one the checkpoint was trained with."""
    if resume_from is not None and Path(resume_from).is_file():
        checkpoint = read_checkpoint(resume_from, cfg.get("allow_unsafe_checkpoint", False))
        check_tokenizer_matches(checkpoint, tokenizer_json, resume_from)


def validate_eval_config(cfg: DictConfig) -> None:
    """Check an ``eval`` config (the checkpoint itself is checked when it is loaded)."""
    unknown = [split for split in cfg.splits if split not in EVAL_SPLITS]
    if unknown or not cfg.splits:
        raise ConfigError(f"splits={list(cfg.splits)} must be a non-empty list of {', '.join(EVAL_SPLITS)}")


def validate_generate_config(cfg: DictConfig) -> None:
    """Check a ``generate`` config's sampling settings."""
    if not cfg.prompt:
        raise ConfigError('prompt is empty; give some text to continue, e.g. prompt="def "')
    for key in ("max_new_tokens", "num_samples"):
        if not cfg[key] >= 1:
            raise ConfigError(f"{key}={cfg[key]} must be >= 1")
    try:
        check_sampling_args(cfg.temperature, cfg.top_k, cfg.top_p)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def _instantiate(group: str, node: DictConfig, **kwargs: Any) -> Any:
    """Instantiate ``node``, turning the target's own ``ValueError`` into a :class:`ConfigError`."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        if not isinstance(cause, ValueError):
            raise
        message = str(cause)
        raise ConfigError(message if f"{group}." in message else f"{group}: {message}") from cause
