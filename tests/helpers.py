"""Helpers shared by the tests: the tiny model and run every end-to-end test can afford, tiny corpora,
configs composed into tmp dirs, the CLI in a subprocess, and the checks of the reliability tests.

``tests/`` is on ``sys.path`` (``pythonpath`` in the pytest settings of pyproject.toml), so a test
in any folder imports them with ``from helpers import ...``; fixtures live in ``conftest.py``.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from lmforge.errors import reported_errors
from lmforge.training.checkpoint import read_network
from lmforge.training.config import compose_in_process
from lmforge.training.loggers import QUANTITY_GROUPS

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTS_DIR = REPO_ROOT / "tests"

# A tiny model and run that every end-to-end test can afford on 2 CPU cores.
# Marker comments name the part of the template a line needs (docs/cookiecutter.md).  # [template]
TINY_MODEL = {
    "gpt": ["model=gpt", "model.n_layer=1", "model.n_head=2", "model.n_embd=32"],  # [gpt]
    "lstm": ["model=lstm", "model.n_layer=1", "model.n_embd=32", "model.hidden_size=32", "model.dropout=0.0"],  # [lstm]
}
# The model of the tests that work with any model: the first one this project has.
DEFAULT_MODEL = next(iter(TINY_MODEL))
# What a config option needs besides its name: model=hf takes its architecture from init_from, or
# written inline (random weights).
OPTION_NEEDS = {
    ("model", "hf"): ["model.hf_config={model_type:gpt_neox,hidden_size:16,num_hidden_layers:1,num_attention_heads:2}"],
    ("data", "streaming"): ["data.chunks_dir=chunks"],  # composes and builds; reading it needs chunks
}
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


def write_task_data(path: Path, examples: int = 240) -> Path:
    """Write a JSONL file of prompt/completion pairs (sums of small numbers) and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [
        json.dumps({"prompt": f"What is {i % 23} plus {i % 7}?\n", "completion": f"{i % 23 + i % 7}"})
        for i in range(examples)
    ]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def compose_config(config_name: str, overrides: list[str], tmp_path: Path) -> DictConfig:
    """Compose a config as the CLI would, with every output under ``tmp_path`` (run dir ``tmp_path/run``)."""
    paths = [f"paths.log_dir={tmp_path}/logs", f"paths.data_dir={tmp_path}/data"]
    return compose_in_process(config_name, [*paths, *overrides], tmp_path / "run")


def tiny_train_overrides(corpus: Path, model: str = DEFAULT_MODEL, *extra: str) -> list[str]:
    """Overrides for a seconds-long training run on ``corpus``."""
    return ["data=text_files", f"data.path={corpus}", *TINY_MODEL[model], *TINY_RUN, *extra]


def global_batch_overrides(corpus: Path, model: str, data_dir: Path, *extra: str) -> list[str]:
    """Overrides for runs compared at one global batch of 512 tokens (2 micro-batches of 8 x 32) for 8 steps."""
    return [
        *tiny_train_overrides(corpus, model, *extra),
        "data.global_batch_tokens=512",
        "trainer.max_steps=8",
        "logger=csv",
        "test=false",
        f"paths.data_dir={data_dir}",
    ]


def write_task_pairs(path: Path, pairs: int = 200) -> Path:
    """Write tab-separated English-French pairs with a credit column, as Tatoeba's are, and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"I see {i} cats.\tJe vois {i} chats.\tCC-BY 2.0 (France) Attribution: tatoeba.org" for i in range(pairs)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# The fine-tuning experiments, each with its data (qa_arithmetic ships its own) and a run of seconds.
FINE_TUNING_EXPERIMENTS = {
    "qa_arithmetic": lambda tmp_path: [],
    "translate_en_fr": lambda tmp_path: [
        f"data.path={write_task_pairs(tmp_path / 'pairs.tsv')}",
        "data.val_size=20",
        "data.test_size=20",
    ],
}
SHORT_FINE_TUNING = [
    "model.n_layer=1",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "scheduler.warmup_steps=1",
    "data.metric_examples=4",
    "data.max_answer_tokens=8",
    "sample.max_new_tokens=8",
    "extras.print_config=false",
]


def tiny_sft_overrides(task_file: Path, model: str = DEFAULT_MODEL, *extra: str) -> list[str]:
    """Overrides for a seconds-long fine-tuning run on a task file (``data=sft``)."""
    eval_windows = "data.eval_windows=32"
    run = [option for option in TINY_RUN if option != eval_windows]
    return ["data=sft", f"data.path={task_file}", *TINY_MODEL[model], *run, "data.eval_examples=32", *extra]


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


def succeeded(result: subprocess.CompletedProcess) -> bool:
    """True when the process exited with 0; shows the end of its output otherwise."""
    if result.returncode != 0:
        print(result.stdout[-3000:], result.stderr[-5000:], sep="\n")
    return result.returncode == 0


def start_cli(stderr_file: Path, *args: str, threads: int = 2) -> subprocess.Popen:
    """Start ``lmforge <args>`` in the background, its stderr going to ``stderr_file``."""
    with open(stderr_file, "w") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "lmforge", *args],
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)},
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )


def wait_for(process: subprocess.Popen, root: Path, pattern: str, timeout: float = 180, poll: float = 0.01) -> None:
    """Wait until a file matching ``pattern`` exists below ``root`` while ``process`` runs."""
    deadline = time.monotonic() + timeout
    while not list(root.glob(pattern)):
        assert process.poll() is None, f"the run ended (exit code {process.returncode}) before {pattern} appeared"
        assert time.monotonic() < deadline, f"no {pattern} after {timeout} s"
        time.sleep(poll)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_csv_metric(run_dir: Path, key: str) -> dict[int, float]:
    """step -> value of ``key`` from the CSV logger of a run."""
    values = {}
    with open(run_dir / "csv" / "metrics.csv") as handle:
        for row in csv.DictReader(handle):
            if row.get(key):
                values[int(row["step"])] = float(row[key])
    return values


def metric_name(tag: str) -> str:
    """The logged metric behind a TensorBoard tag (the inverse of ``tensorboard_tag``: ``loss/val`` -> ``val/loss``)."""
    group, _, rest = tag.partition("/")
    quantity = {group_name: name for name, group_name in QUANTITY_GROUPS.items()}.get(group)
    if quantity is not None:
        return f"{rest}/{quantity}"
    return rest if group == "train" and rest.startswith("lr") else tag


def scalars(tensorboard_dir: Path) -> dict[str, dict[int, float]]:
    """metric -> {step: value} of every scalar in the TensorBoard events under ``tensorboard_dir``,
    by the metric names the loops log (``val/loss``), not the tags TensorBoard shows (``loss/val``)."""
    accumulator = EventAccumulator(str(tensorboard_dir))
    accumulator.Reload()
    return {
        metric_name(tag): {event.step: event.value for event in accumulator.Scalars(tag)}
        for tag in accumulator.Tags()["scalars"]
    }


def tensorboard_cards_and_hparams(tensorboard_dir: Path) -> tuple[list[str], dict, list[str]]:
    """What TensorBoard shows of a run: its card groups in display order (tags sorted), its
    hyperparameters in the HParams tab, and the metrics that tab lists for it."""
    accumulator = EventAccumulator(str(tensorboard_dir))
    accumulator.Reload()
    groups = sorted({tag.split("/")[0] for tag in accumulator.Tags()["scalars"]})
    content = accumulator.PluginTagToContent("hparams")
    start = HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info.hparams
    experiment = HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    return (
        groups,
        {key: value.WhichOneof("kind") for key, value in start.items()},
        [info.name.tag for info in experiment.metric_infos],
    )


def csv_values(log_dir: Path, key: str = "val/loss") -> dict[int, float]:
    """step -> value of ``key`` in the CSV log of the one training run under ``log_dir``."""
    (metrics,) = log_dir.glob("train/runs/*/csv/metrics.csv")
    with open(metrics) as handle:
        return {int(row["step"]): float(row[key]) for row in csv.DictReader(handle) if row.get(key)}


def assert_runs_agree(one: Path, two: Path, min_validations: int = 1, atol: float = 1e-5) -> None:
    """The training runs under log dirs ``one`` and ``two`` validated at the same steps with losses within
    ``atol``, and ended with weights within ``atol``."""
    losses_one, losses_two = csv_values(one), csv_values(two)
    assert sorted(losses_one) == sorted(losses_two) and len(losses_one) >= min_validations
    for step in losses_one:
        assert abs(losses_one[step] - losses_two[step]) <= atol, (step, losses_one[step], losses_two[step])
    (last_one,) = one.glob("train/runs/*/checkpoints/last.ckpt")
    (last_two,) = two.glob("train/runs/*/checkpoints/last.ckpt")
    weights_one, weights_two = read_network(last_one).weights, read_network(last_two).weights
    for name, tensor in weights_one.items():
        torch.testing.assert_close(tensor, weights_two[name], rtol=0, atol=atol, msg=name)


# ----------------------------------------------------------------------------------------------
# The reliability tests: a finished tiny run that bad input must not touch, one clear error

# A few optimizer steps with a periodic checkpoint every 2 of them and a CSV log of every step.
SHORT_RUN = [
    "logger=csv",
    "test=false",
    "trainer.log_every_n_steps=1",
    "trainer.max_steps=6",
    "trainer.val_check_interval=6",
    "callbacks.periodic_checkpoint.every_n_train_steps=2",
    "callbacks.periodic_checkpoint.save_top_k=-1",
]


@dataclass
class Prepared:
    """A finished tiny run: its checkpoint, token cache and logs, which bad input must not touch."""

    root: Path
    overrides: list[str]
    checkpoint: Path
    cache: Path

    @property
    def paths(self) -> list[str]:
        return paths_in(self.root)


def paths_in(root: Path) -> list[str]:
    """Overrides that put a run's logs and data cache under ``root``."""
    return [f"paths.log_dir={root}/logs", f"paths.data_dir={root}/data"]


def file_states(root: Path) -> dict[str, tuple[int, int, str]]:
    """Size, modification time and SHA-256 of every file below ``root``."""
    states = {}
    for path in root.rglob("*"):
        if path.is_file():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            states[str(path.relative_to(root))] = (path.stat().st_size, path.stat().st_mtime_ns, digest)
    return states


def assert_untouched(before: dict, root: Path) -> None:
    after = file_states(root)
    changed = sorted(name for name, state in before.items() if after.get(name) != state)
    assert not changed, f"modified or deleted: {changed}"


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def assert_one_clear_error(code: int, stderr: str, fragment: str) -> None:
    """Exit code 1 and exactly one ``error: ...`` line containing ``fragment``, no traceback."""
    assert code == 1, stderr[-3000:]
    lines = error_lines(stderr)
    assert len(lines) == 1 and fragment in lines[0], stderr[-3000:]
    assert "Traceback" not in stderr


def reported(function, cfg, capsys) -> tuple[int, str]:
    """Run ``function(cfg)`` with the CLI's error reporting; return the exit code and stderr."""
    with pytest.raises(SystemExit) as exit_info:
        with reported_errors():
            function(cfg)
    return exit_info.value.code, capsys.readouterr().err


@contextlib.contextmanager
def small_tmpfs(path: Path, size_bytes: int, read_only: bool = False):
    """A real file system of ``size_bytes`` (or read-only) at ``path``; needs root to mount."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size_bytes}" + (",ro" if read_only else "")
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)]).returncode:
        pytest.skip("mounting a small tmpfs needs root (CAP_SYS_ADMIN)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
