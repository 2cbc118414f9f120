"""Shared fixtures: a tiny corpus made on the fly and a finished tiny run (helpers are in ``helpers.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import (
    DEFAULT_MODEL,
    SHORT_RUN,
    Prepared,
    compose_config,
    tiny_train_overrides,
    write_corpus,
)

from lmforge.cli.train import train


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, corpus_dir) -> Prepared:
    root = tmp_path_factory.mktemp("prepared")
    overrides = tiny_train_overrides(corpus_dir, DEFAULT_MODEL, *SHORT_RUN)
    cfg = compose_config("train", overrides, root)
    run_dir = Path(cfg.paths.log_dir) / "train" / "runs" / "first"
    cfg.paths.output_dir = str(run_dir)  # inside paths.log_dir, where ckpt_path=last looks
    train(cfg)
    (cache,) = (root / "data" / "cache").glob("*/meta.json")
    return Prepared(root, overrides, run_dir / "checkpoints" / "last.ckpt", cache.parent)
