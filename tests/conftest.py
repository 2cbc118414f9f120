"""Shared fixtures: tiny corpora made on the fly and composed configs pointing into tmp dirs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import DictConfig

from lmforge.config import compose_in_process

REPO_ROOT = Path(__file__).resolve().parents[1]

# A tiny model and run that every end-to-end test can afford on 2 CPU cores.
# Marker comments name the part of the template a line needs (docs/cookiecutter.md).  # [template]
TINY_MODEL = {
    "gpt": ["model=gpt", "model.n_layer=1", "model.n_head=2", "model.n_embd=32"],  # [gpt]
    "lstm": ["model=lstm", "model.n_layer=1", "model.n_embd=32", "model.hidden_size=32", "model.dropout=0.0"],  # [lstm]
}
# The model of the tests that work with any model: the first one this project has.
DEFAULT_MODEL = next(iter(TINY_MODEL))
TINY_RUN = [
    "data.block_size=32",
    "data.batch_size=8",
    "data.eval_batch_size=16",
    "data.eval_windows=32",
    "data.tokenizer=char",
    "trainer.max_steps=12",
    "trainer.val_check_interval=6",
    "trainer.log_every_n_steps=2",
    "trainer.accelerator=cpu",
    "scheduler.warmup_steps=2",
    "sample.max_new_tokens=16",
    "callbacks.text_samples.max_new_tokens=16",
    "callbacks.throughput.window_size=3",
    "extras.print_config=false",
]

CORPUS_LINES = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "for i in range(10):\n    print(i * i)\n",
    "import math\nprint(math.pi)  # pi\n",
    "while True:\n    break\n",
]


def write_corpus(directory: Path, n_files: int = 12, repeats: int = 30) -> Path:
    """Write ``n_files`` small Python-like documents and return the directory."""
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        lines = [CORPUS_LINES[(i + j) % len(CORPUS_LINES)] for j in range(repeats)]
        (directory / f"doc_{i:03d}.py").write_text(f"# document {i}\n" + "".join(lines), encoding="utf-8")
    return directory


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def compose_config(config_name: str, overrides: list[str], tmp_path: Path) -> DictConfig:
    """Compose a config as the CLI would, with every output under ``tmp_path`` (run dir ``tmp_path/run``)."""
    paths = [f"paths.log_dir={tmp_path}/logs", f"paths.data_dir={tmp_path}/data"]
    return compose_in_process(config_name, [*paths, *overrides], tmp_path / "run")


def tiny_train_overrides(corpus: Path, model: str = DEFAULT_MODEL, *extra: str) -> list[str]:
    """Overrides for a seconds-long training run on ``corpus``."""
    return ["data=text_files", f"data.path={corpus}", *TINY_MODEL[model], *TINY_RUN, *extra]


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 300):
    """Run ``lmforge <args>`` in a subprocess and return the CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "lmforge", *args],
        cwd=cwd or REPO_ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
