"""Reliability: bad input gets one clear error and loses nothing; interrupted and killed runs
resume exactly; checkpoints are written atomically and loaded without running code.

CLI tests run the real ``lmforge`` command in a subprocess (about 5 s of imports each), so the
many config-value checks run in-process through the same error reporting as the CLI
(:func:`lmforge.errors.reported_errors`), and a few representative ones through the CLI.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from lmforge.checkpoint import CheckpointError, read_checkpoint, resolve_checkpoint
from lmforge.errors import ConfigError, reported_errors
from lmforge.eval import evaluate
from lmforge.generate import generate
from lmforge.lm_module import LMModule
from lmforge.prepare import prepare
from lmforge.safety import AtomicCheckpointIO, NonFiniteLossGuard
from lmforge.train import train

from conftest import DEFAULT_MODEL, REPO_ROOT, TINY_MODEL, compose_config, run_cli, tiny_train_overrides, write_corpus

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


# ----------------------------------------------------------------------------------------------
# Helpers


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


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, corpus_dir) -> Prepared:
    root = tmp_path_factory.mktemp("prepared")
    overrides = tiny_train_overrides(corpus_dir, DEFAULT_MODEL, *SHORT_RUN)
    cfg = compose_config("train", overrides, root)
    run_dir = Path(cfg.paths.log_dir) / "train" / "runs" / "first"
    cfg.paths.output_dir = str(run_dir)  # inside paths.log_dir, where ckpt_path=last looks
    train(cfg)
    (cache,) = (root / "data" / "cache").glob("*/meta.json")
    return Prepared(root, overrides, run_dir / "checkpoints" / "last.ckpt", cache.parent)


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


def read_losses(run_dir: Path) -> dict[int, float]:
    """step -> train/loss from the CSV log of a run."""
    with open(next(run_dir.rglob("metrics.csv"))) as handle:
        return {int(row["step"]): float(row["train/loss"]) for row in csv.DictReader(handle) if row.get("train/loss")}


def assert_same_weights(checkpoint_a: Path, checkpoint_b: Path) -> None:
    a = torch.load(checkpoint_a, weights_only=True)
    b = torch.load(checkpoint_b, weights_only=True)
    assert a["global_step"] == b["global_step"]
    for name, tensor in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], tensor, rtol=0, atol=1e-6)


def only_run_dir(log_dir: Path) -> Path:
    runs = [path for path in (log_dir / "train" / "runs").iterdir() if (path / "checkpoints").is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


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


class SignalAtStep(L.Callback):
    """Test helper: sends ``signum`` to this process during optimizer step number ``step`` (1-based)."""

    def __init__(self, signum: int, step: int) -> None:
        self.signum = signum
        self.step = step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == self.step - 1:
            assert signal.getsignal(self.signum) not in (signal.SIG_DFL, None), "unhandled: it would kill pytest"
            os.kill(os.getpid(), self.signum)


# ----------------------------------------------------------------------------------------------
# Bad input, in-process through the CLI's error reporting: one line, exit code 1, nothing written


@pytest.mark.parametrize(
    "overrides,fragment",
    [
        (["data.block_size=0"], "data.block_size=0 must be >= 1"),
        (["data.batch_size=0"], "data.batch_size=0 must be >= 1"),
        (["optimizer.lr=0"], "optimizer.lr=0 must be > 0"),
        (["optimizer.lr=-0.001"], "optimizer.lr=-0.001 must be > 0"),
        (["trainer.max_steps=10", "scheduler.warmup_steps=20"], "warmup_steps=20 is larger than trainer.max_steps=10"),
        (["trainer.max_steps=-1"], "trainer.max_steps=-1"),
        (["model.dropout=1.0"], "dropout must be in [0, 1)"),
        (["model.dropout=-0.1"], "dropout must be in [0, 1)"),
        (["model.n_embd=30", "model.n_head=4"], "n_embd (30) must be divisible by n_head (4)"),  # [gpt]
        (["data.tokenizer=bpe", "data.vocab_size=100"], "data.vocab_size=100 is too small for byte-level BPE"),
        (["ckpt_path=/nonexistent/x.ckpt"], "checkpoint /nonexistent/x.ckpt does not exist"),
        (["data.path=???"], "data.path is required"),
    ],
    ids=lambda value: value if isinstance(value, str) else " ".join(value),
)
def test_bad_config_value_fails_before_anything_is_written(overrides, fragment, prepared, capsys):
    before = file_states(prepared.root)
    cfg = compose_config("train", [*prepared.overrides, *prepared.paths, *overrides], prepared.root / "bad")
    code, stderr = reported(train, cfg, capsys)
    assert_one_clear_error(code, stderr, fragment)
    assert_untouched(before, prepared.root)
    assert set(file_states(prepared.root)) == set(before), "something was written (validation came too late)"


@pytest.mark.parametrize(
    "config_name,overrides,fragment",
    [
        ("generate", ['prompt=""'], "prompt is empty"),
        ("generate", ["temperature=-1"], "temperature must be >= 0"),
        ("generate", ["max_new_tokens=0"], "max_new_tokens=0 must be >= 1"),
        ("eval", ["splits=[val,tset]"], "splits=['val', 'tset']"),
    ],
)
def test_bad_eval_and_generate_settings(config_name, overrides, fragment, prepared, tmp_path, capsys):
    cfg = compose_config(config_name, [f"ckpt_path={prepared.checkpoint}", *overrides], tmp_path)
    code, stderr = reported(generate if config_name == "generate" else evaluate, cfg, capsys)
    assert_one_clear_error(code, stderr, fragment)


def bad_corpus(kind: str, tmp_path: Path) -> Path:
    """A corpus path of the given kind of trouble (data.block_size=32: a window is 33 tokens)."""
    path = tmp_path / "corpus"
    if kind == "empty dir":
        path.mkdir()
    elif kind == "0-byte file":
        path.touch()
    elif kind == "glob matching nothing":
        path = tmp_path / "*.nothing"
    elif kind == "smaller than one window":
        path.write_text("hi\n" * 5)
    elif kind == "val split without a full window":  # 10% of 280 characters
        path.write_text("def f(x):\n    return x + 1\n" * 10)
    return path


@pytest.mark.parametrize(
    "kind,fragment",
    [
        ("empty dir", "contains no files"),
        ("0-byte file", "are empty (0 bytes)"),
        ("glob matching nothing", "matches no files"),
        ("smaller than one window", "fewer than one window of block_size+1=33"),
        ("val split without a full window", "the val split has"),
    ],
)
def test_unusable_corpus(kind, fragment, prepared, tmp_path, capsys):
    before = file_states(prepared.root)
    overrides = tiny_train_overrides(bad_corpus(kind, tmp_path), DEFAULT_MODEL, *SHORT_RUN)
    cfg = compose_config("train", [*overrides, *prepared.paths], tmp_path)
    code, stderr = reported(train, cfg, capsys)
    assert_one_clear_error(code, stderr, fragment)
    assert_untouched(before, prepared.root)


def test_vocab_size_larger_than_the_corpus_supports_warns_and_uses_the_real_size(corpus_dir, tmp_path, caplog):
    overrides = tiny_train_overrides(corpus_dir, DEFAULT_MODEL, "data.tokenizer=bpe", "data.vocab_size=60000")
    cache_dir = prepare(compose_config("prepare", overrides, tmp_path))
    assert "the corpus supports only" in caplog.text
    vocab_size = json.loads((Path(cache_dir) / "meta.json").read_text())["vocab_size"]
    assert 257 <= vocab_size < 60000


@pytest.mark.parametrize(
    "damage,fragment", [("missing", "cannot read"), ("other", "does not match the cached token files")]
)
def test_tokenizer_file_missing_or_not_matching_the_cache(damage, fragment, prepared, tmp_path, capsys):
    data_dir = shutil.copytree(prepared.root / "data", tmp_path / "data")
    tokenizer_file = data_dir / "cache" / prepared.cache.name / "tokenizer.json"
    if damage == "missing":
        tokenizer_file.unlink()
    else:
        from lmforge.data import save_tokenizer, train_tokenizer

        save_tokenizer(train_tokenizer("bytes", []), tokenizer_file)
    before = file_states(data_dir)
    cfg = compose_config("prepare", [*prepared.overrides, f"paths.data_dir={data_dir}"], tmp_path)
    code, stderr = reported(prepare, cfg, capsys)
    assert_one_clear_error(code, stderr, fragment)
    assert_untouched(before, data_dir)


def test_checkpoint_of_another_vocabulary_is_refused(prepared, tmp_path, capsys):
    other_corpus = tmp_path / "other"
    other_corpus.mkdir()
    (other_corpus / "text.txt").write_text("ZYXWVUTSRQ zyxwvutsrq 0123456789 !?\n" * 200)
    before = file_states(prepared.root)
    overrides = tiny_train_overrides(other_corpus, DEFAULT_MODEL, *SHORT_RUN, f"ckpt_path={prepared.checkpoint}")
    cfg = compose_config("train", overrides, tmp_path)
    code, stderr = reported(train, cfg, capsys)
    assert_one_clear_error(code, stderr, "was trained with another vocabulary")
    assert_untouched(before, prepared.root)


def test_full_traceback_on_request(prepared, tmp_path, monkeypatch):
    bad = [*prepared.overrides, *prepared.paths, "optimizer.lr=0"]
    with pytest.raises(ConfigError):
        with reported_errors():
            train(compose_config("train", [*bad, "debug=fdr"], tmp_path))
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(ConfigError):
        with reported_errors():
            train(compose_config("train", bad, tmp_path))


def test_valid_configs_pass_validation(tmp_path, corpus_dir):
    """Every model/optimizer/scheduler option is accepted (the checks build them on the meta device)."""
    from lmforge.validation import validate_train_config

    for group in ("model", "optimizer", "scheduler"):
        for option in sorted((REPO_ROOT / "configs" / group).glob("*.yaml")):
            overrides = ["data=text_files", f"data.path={corpus_dir}", f"{group}={option.stem}"]
            assert validate_train_config(compose_config("train", overrides, tmp_path)) is None


def test_full_disk_while_writing_token_files_keeps_the_previous_cache(prepared, tmp_path, monkeypatch, capsys):
    data_dir = shutil.copytree(prepared.root / "data", tmp_path / "data")
    before = file_states(data_dir)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(data_dir / "cache" / "tokenizer.json"))

    monkeypatch.setattr("lmforge.data.cache.save_tokenizer", disk_full)
    overrides = [*prepared.overrides, f"paths.data_dir={data_dir}", "data.tokenizer=bytes"]  # a new cache
    code, stderr = reported(prepare, compose_config("prepare", overrides, tmp_path), capsys)
    assert_one_clear_error(code, stderr, "No space left on device")
    assert_untouched(before, data_dir)
    left = set(file_states(data_dir)) - set(before)
    assert all(name.endswith(".lock") for name in left), f"a half-built cache was left behind: {left}"


def test_full_disk_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device.*previous checkpoints are unchanged"):
        AtomicCheckpointIO().save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"], "a temporary file was left behind"


def test_rebuilds_a_cache_that_a_crash_left_half_built(corpus_dir, tmp_path):
    overrides = tiny_train_overrides(corpus_dir, DEFAULT_MODEL)
    cache = Path(prepare(compose_config("prepare", overrides, tmp_path)))
    crashed = cache.with_name(cache.name + ".tmp-crashed")
    cache.rename(crashed)  # the state a process killed while building leaves: only a temporary directory
    (crashed / "meta.json").unlink()
    assert Path(prepare(compose_config("prepare", overrides, tmp_path))) == cache
    assert (cache / "meta.json").is_file() and not crashed.exists()


# ----------------------------------------------------------------------------------------------
# Bad input through the real CLI


@pytest.mark.slow
def test_cli_missing_corpus(prepared, tmp_path):
    before = file_states(prepared.root)
    result = run_cli("train", *tiny_train_overrides(tmp_path / "nope", DEFAULT_MODEL), *prepared.paths)
    assert_one_clear_error(result.returncode, result.stderr, f"the data path {tmp_path / 'nope'} does not exist")
    assert_untouched(before, prepared.root)


@pytest.mark.slow
@pytest.mark.parametrize(
    "override,fragments",
    [
        ("model=transformerxl", ["Could not find 'model/transformerxl'", "Available options in 'model'", *TINY_MODEL]),
        ("learning_rate=0.1", ["Could not override 'learning_rate'", "Key 'learning_rate' is not in struct"]),
    ],
)
def test_cli_unknown_option_names_the_choices(override, fragments, prepared):
    result = run_cli("train", *prepared.paths, override)
    assert result.returncode == 1
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr[-2000:]


@pytest.mark.slow
def test_cli_checkpoint_of_another_architecture(prepared):
    before = file_states(prepared.root)
    result = run_cli("train", *prepared.overrides, *prepared.paths, "model.n_layer=2", "ckpt_path=last")
    assert_one_clear_error(result.returncode, result.stderr, "model.n_layer=1 in the checkpoint but 2 in the config")
    assert_untouched(before, prepared.root)


@pytest.mark.slow
def test_cli_truncated_checkpoint(prepared, tmp_path):
    truncated = tmp_path / "truncated.ckpt"
    data = prepared.checkpoint.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    result = run_cli("eval", f"ckpt_path={truncated}", *prepared.paths)
    assert_one_clear_error(result.returncode, result.stderr, "is truncated, corrupt or not a PyTorch checkpoint")


@pytest.mark.slow
def test_cli_refuses_unsafe_checkpoint_unless_allowed(prepared, tmp_path):
    checkpoint = torch.load(prepared.checkpoint, weights_only=True)
    checkpoint["note"] = argparse.Namespace(written_by="someone else")  # needs full unpickling
    unsafe = tmp_path / "unsafe.ckpt"
    torch.save(checkpoint, unsafe)
    args = [f"ckpt_path={unsafe}", "max_new_tokens=5", "prompt=def"]
    refused = run_cli("generate", *args, *prepared.paths)
    assert_one_clear_error(refused.returncode, refused.stderr, "holds pickled Python objects (argparse.Namespace)")
    assert "allow_unsafe_checkpoint=true" in refused.stderr
    (sample,) = generate(compose_config("generate", [*args, "allow_unsafe_checkpoint=true"], tmp_path))
    assert sample.startswith("def")


@pytest.mark.slow
def test_cli_skips_binary_and_invalid_utf8_files_with_a_count(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", n_files=4)
    (corpus / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0IHDR" * 20)
    (corpus / "latin1.txt").write_bytes("café, naïve\n".encode("latin-1") * 20)
    result = run_cli("prepare", *tiny_train_overrides(corpus), *paths_in(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "skipped 2 binary or non-UTF-8 file(s)" in result.stdout + result.stderr


@pytest.mark.slow
def test_cli_cache_dir_not_writable(corpus_dir, tmp_path):
    read_only = tmp_path / "read_only"
    with contextlib.ExitStack() as stack:
        if os.geteuid() == 0:  # root writes anywhere: only a read-only file system stops it
            stack.enter_context(small_tmpfs(read_only, 1 << 20, read_only=True))
        else:
            read_only.mkdir()
            read_only.chmod(0o555)
        result = run_cli(
            "prepare", *tiny_train_overrides(corpus_dir), *paths_in(tmp_path), f"data.cache_dir={read_only}/cache"
        )
    assert_one_clear_error(result.returncode, result.stderr, f"cannot write the token cache to {read_only}/cache")


@pytest.mark.slow
def test_cli_full_disk_while_checkpointing_keeps_the_previous_checkpoint(prepared, tmp_path):
    size = prepared.checkpoint.stat().st_size
    with small_tmpfs(tmp_path / "disk", size + (96 << 10)) as disk:
        old = disk / "train" / "runs" / "old" / "checkpoints" / "last.ckpt"
        old.parent.mkdir(parents=True)
        shutil.copy2(prepared.checkpoint, old)
        before = file_states(disk)
        result = run_cli(
            "train", *prepared.overrides, f"paths.log_dir={disk}", f"paths.data_dir={prepared.root}/data",
            "trainer.max_steps=10", "ckpt_path=last",
        )
        assert_one_clear_error(result.returncode, result.stderr, "No space left on device")
        assert "the previous checkpoints are unchanged" in result.stderr
        assert_untouched(before, disk)
        assert read_checkpoint(old)["global_step"] == 6
        assert not [p for p in disk.rglob("*.tmp")], "a temporary file was left behind"


# ----------------------------------------------------------------------------------------------
# Faults: interrupted, killed and diverging runs


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_a_checkpoint_that_resumes_exactly(signum, prepared, tmp_path, capsys):
    overrides = [*prepared.overrides, f"paths.data_dir={prepared.root}/data"]
    signal_at_step_3 = [
        f"+callbacks.signal._target_={__name__}.SignalAtStep", f"+callbacks.signal.signum={int(signum)}",
        "+callbacks.signal.step=3",
    ]
    stopped = compose_config("train", [*overrides, *signal_at_step_3], tmp_path / "stopped")
    with pytest.raises(SystemExit) as exit_info:
        train(stopped)
    assert exit_info.value.code == 128 + signum
    interrupted = tmp_path / "stopped" / "run" / "checkpoints" / "interrupted-step000003.ckpt"
    stderr = capsys.readouterr().err
    assert f"training stopped by {signum.name} after step 3" in stderr
    assert "resume with: lmforge train" in stderr and f"ckpt_path={interrupted}" in stderr

    resumed = compose_config("train", [*overrides, f"ckpt_path={interrupted}"], tmp_path / "resumed")
    train(resumed)
    reference = read_losses(prepared.checkpoint.parents[1])
    losses = read_losses(tmp_path / "resumed" / "run")
    assert sorted(losses) == [3, 4, 5]
    for step, loss in losses.items():
        assert loss == pytest.approx(reference[step], abs=1e-6), step
    assert_same_weights(prepared.checkpoint, tmp_path / "resumed" / "run" / "checkpoints" / "last.ckpt")


def test_periodic_checkpoints_and_ckpt_path_last(prepared, tmp_path):
    checkpoints = prepared.checkpoint.parent
    periodic = sorted(p.name for p in checkpoints.glob("periodic-*.ckpt"))
    assert periodic == ["periodic-step000002.ckpt", "periodic-step000004.ckpt", "periodic-step000006.ckpt"]
    assert [read_checkpoint(checkpoints / name)["global_step"] for name in periodic] == [2, 4, 6]

    log_dir = tmp_path / "logs"
    old, new = log_dir / "a" / "old.ckpt", log_dir / "b" / "new.ckpt"
    for path in (old, new):
        path.parent.mkdir(parents=True)
        shutil.copy(prepared.checkpoint, path)
    os.utime(old, (1, 1))
    (new.parent / ".half-written.ckpt.1234.tmp").write_bytes(b"torn")
    assert resolve_checkpoint("last", log_dir) == str(new)
    assert resolve_checkpoint(str(old.parent), log_dir) == str(old)


def test_nonfinite_loss_stops_before_the_update_or_skips_it(corpus_dir, tmp_path, monkeypatch, capsys):
    original = LMModule.training_step

    def nan_at_step_3(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        return loss * float("nan") if self.global_step == 3 else loss

    monkeypatch.setattr(LMModule, "training_step", nan_at_step_3)
    every_step = [*SHORT_RUN, "callbacks.periodic_checkpoint.every_n_train_steps=1"]

    stop = compose_config("train", tiny_train_overrides(corpus_dir, DEFAULT_MODEL, *every_step), tmp_path / "stop")
    code, stderr = reported(train, stop, capsys)
    checkpoints = tmp_path / "stop" / "run" / "checkpoints"
    assert_one_clear_error(code, stderr, "the training loss is NaN or infinite at step 3")
    assert f"the last good checkpoint is {checkpoints / 'periodic-step000003.ckpt'}" in stderr
    assert sorted(p.name for p in checkpoints.glob("*.ckpt"))[-1] == "periodic-step000003.ckpt"
    last_good = read_checkpoint(checkpoints / "periodic-step000003.ckpt")
    assert all(torch.isfinite(t).all() for t in last_good["state_dict"].values())

    skip = compose_config(
        "train", tiny_train_overrides(corpus_dir, DEFAULT_MODEL, *every_step, "callbacks.nonfinite_loss.action=skip"),
        tmp_path / "skip",
    )
    train(skip)
    checkpoints = tmp_path / "skip" / "run" / "checkpoints"
    before, after = (read_checkpoint(checkpoints / f"periodic-step{step:06d}.ckpt") for step in (3, 4))
    for name, tensor in before["state_dict"].items():  # step 3's update was skipped ...
        assert torch.equal(after["state_dict"][name], tensor), name
    final = read_checkpoint(checkpoints / "last.ckpt")  # ... and training went on from good weights
    assert final["global_step"] == 6
    assert all(torch.isfinite(t).all() for t in final["state_dict"].values())
    guard_state = next(v for k, v in final["callbacks"].items() if k.startswith("NonFiniteLossGuard"))
    assert guard_state == {"skipped_steps": 1}
    with pytest.raises(ConfigError, match="must be one of stop, skip"):
        NonFiniteLossGuard(action="ignore")


@pytest.mark.parametrize("strategy", ["ddp_sim", "fsdp"])
def test_process_group_timeout_comes_from_the_config(strategy, tmp_path):
    cfg = compose_config("train", [f"trainer={strategy}", "trainer.strategy.timeout.seconds=42"], tmp_path)
    trainer = instantiate(cfg.trainer, logger=False, accelerator="cpu", devices=2)
    assert trainer.strategy._timeout == timedelta(seconds=42)
    if strategy == "ddp_sim":  # FSDP2 writes its sharded checkpoints through torch.distributed.checkpoint
        assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


ATOMIC_WRITER = """
import io, sys, time, torch
import lmforge.safety as safety
path = sys.argv[1]
safety.AtomicCheckpointIO().save_checkpoint({"version": "old", "w": torch.zeros(1000)}, path)
real_atomic_write = safety.atomic_write
def slow_atomic_write(path, write):  # writes half of the new checkpoint, then hangs until killed
    def write_half(handle):
        data = io.BytesIO()
        write(data)
        handle.write(data.getvalue()[: len(data.getvalue()) // 2])
        handle.flush()
        print("writing", flush=True)
        time.sleep(120)
    real_atomic_write(path, write_half)
safety.atomic_write = slow_atomic_write
safety.AtomicCheckpointIO().save_checkpoint({"version": "new", "w": torch.ones(1000)}, path)
"""


@pytest.mark.slow
def test_kill_during_a_checkpoint_write_keeps_the_old_checkpoint(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    writer = subprocess.Popen([sys.executable, "-c", ATOMIC_WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "writing"
        temporary = [p for p in path.parent.iterdir() if p != path]
        assert len(temporary) == 1 and temporary[0].stat().st_size > 0  # the half-written new file
    finally:
        writer.kill()
        writer.wait(timeout=30)
    assert writer.returncode == -signal.SIGKILL
    assert torch.load(path, weights_only=True)["version"] == "old"
    assert resolve_checkpoint("last", path.parent) == str(path), "the torn temporary file must never be picked"


@pytest.mark.slow
def test_sigkill_at_a_random_step_resumes_exactly_and_writes_only_under_its_paths(corpus_dir, tmp_path):
    """Uninterrupted run vs. a run SIGKILLed at a random step and resumed from its last periodic checkpoint."""
    overrides = tiny_train_overrides(
        corpus_dir, DEFAULT_MODEL, "logger=csv", "test=false", "trainer.log_every_n_steps=1", "trainer.max_steps=40",
        "trainer.val_check_interval=1000", "callbacks.periodic_checkpoint.every_n_train_steps=2",
        "model.n_embd=64", "data.block_size=64", "data.batch_size=16",
    )
    data = f"paths.data_dir={tmp_path}/data"
    # The uninterrupted run, from an empty working directory and home: it may write nowhere but
    # paths.log_dir and paths.data_dir.
    cwd, home, tmpdir = (tmp_path / name for name in ("cwd", "home", "tmpdir"))
    for directory in (cwd, home, tmpdir):
        directory.mkdir()
    env = {"HOME": str(home), "TMPDIR": str(tmpdir), "XDG_CACHE_HOME": str(home / ".cache")}
    full = run_cli("train", *overrides, f"paths.log_dir={tmp_path}/full", data, cwd=cwd, env=env)
    assert full.returncode == 0, full.stderr[-3000:]
    outside = [p for d in (cwd, home, tmpdir) for p in d.rglob("*")]
    assert not outside, f"written outside paths.log_dir / paths.data_dir: {outside}"
    assert {p.name for p in tmp_path.iterdir()} == {"cwd", "home", "tmpdir", "full", "data"}

    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    kill_after = rng.randrange(4, 18, 2)
    killed_logs = tmp_path / "killed"
    process = start_cli(tmp_path / "killed.err", "train", *overrides, f"paths.log_dir={killed_logs}", data)
    try:
        wait_for(process, killed_logs, f"train/runs/*/checkpoints/periodic-step{kill_after:06d}.ckpt")
        time.sleep(rng.uniform(0, 0.05))
        process.kill()
    finally:
        process.kill()
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, f"the run ended before it was killed (seed {seed})"
    killed_run = only_run_dir(killed_logs)

    resumed = run_cli("train", *overrides, f"paths.log_dir={killed_logs}", data, f"ckpt_path={killed_run}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    resumed_run = next(p for p in (killed_logs / "train" / "runs").iterdir() if p != killed_run)
    reference, losses = read_losses(only_run_dir(tmp_path / "full")), read_losses(resumed_run)
    start = min(losses)
    assert start >= kill_after and sorted(losses) == list(range(start, 40)), (seed, sorted(losses))
    for step, loss in losses.items():
        assert loss == pytest.approx(reference[step], abs=1e-6), (seed, step)
    full_run = only_run_dir(tmp_path / "full")
    assert_same_weights(full_run / "checkpoints" / "last.ckpt", resumed_run / "checkpoints" / "last.ckpt")


@pytest.mark.slow
def test_cli_sigterm_saves_and_prints_how_to_resume(corpus_dir, tmp_path):
    overrides = tiny_train_overrides(
        corpus_dir, DEFAULT_MODEL, "trainer.max_steps=100000", "trainer.val_check_interval=1000",
        "callbacks.periodic_checkpoint.every_n_train_steps=2",
    )
    stderr_file = tmp_path / "stderr.txt"
    process = start_cli(stderr_file, "train", *overrides, *paths_in(tmp_path))
    try:
        wait_for(process, tmp_path, "logs/train/runs/*/checkpoints/periodic-*.ckpt")
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    finally:
        process.kill()
    stderr = stderr_file.read_text()
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Traceback" not in stderr
    saved = list(tmp_path.glob("logs/train/runs/*/checkpoints/interrupted-step*.ckpt"))
    assert len(saved) == 1 and f"saved a resumable checkpoint: {saved[0]}" in stderr
    assert f"resume with: lmforge train data=text_files data.path={corpus_dir}" in stderr
    assert read_checkpoint(saved[0])["global_step"] >= 2


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


def child_pids(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def environ(pid: int) -> bytes:
    return Path(f"/proc/{pid}/environ").read_bytes()


def ddp_run_overrides(corpus_dir: Path, timeout_seconds: int) -> list[str]:
    """A long 2-process DDP run that checkpoints every 2 steps."""
    return tiny_train_overrides(
        corpus_dir, DEFAULT_MODEL, "trainer=ddp_sim", f"trainer.strategy.timeout.seconds={timeout_seconds}",
        "logger=csv", "trainer.max_steps=100000", "trainer.val_check_interval=1000",
        "callbacks.periodic_checkpoint.every_n_train_steps=2",
    )


def kill_process_tree(process: subprocess.Popen, known_children: tuple[int, ...] = ()) -> None:
    """Kill ``process``, its children, and ``known_children`` (a child whose parent has exited is
    no longer listed as its child, e.g. a stopped rank left behind by rank 0's timeout)."""
    children = set(known_children)
    if process.poll() is None:
        children.update(child_pids(process.pid))
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # also ends a stopped process
    process.kill()
    process.wait()


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["dies", "hangs"])
def test_a_rank_that_dies_or_hangs_ends_the_job_in_bounded_time(fault, corpus_dir, tmp_path):
    timeout = 20
    stderr_file = tmp_path / "stderr.txt"
    process = start_cli(stderr_file, "train", *ddp_run_overrides(corpus_dir, timeout), *paths_in(tmp_path), threads=1)
    rank1 = None
    try:
        wait_for(process, tmp_path, "logs/train/runs/*/checkpoints/periodic-*.ckpt", poll=0.1)  # both ranks train
        (rank1,) = [pid for pid in child_pids(process.pid) if b"\0LOCAL_RANK=1\0" in b"\0" + environ(pid)]
        os.kill(rank1, signal.SIGKILL if fault == "dies" else signal.SIGSTOP)
        faulted_at = time.monotonic()
        process.wait(timeout=timeout + 60)
        elapsed = time.monotonic() - faulted_at
    finally:
        kill_process_tree(process, known_children=(rank1,) if rank1 else ())
    stderr = stderr_file.read_text()
    assert process.returncode != 0, stderr[-3000:]
    assert elapsed < timeout + 30, elapsed
    if fault == "hangs":  # rank 0 waits for the process-group timeout, then says what happened in one line
        assert elapsed > timeout - 2, elapsed
        assert_one_clear_error(process.returncode, stderr, "rank 0: a collective operation failed (Timed out waiting")


@pytest.mark.slow
def test_sigterm_to_one_rank_under_ddp_stops_every_rank_at_the_same_step(corpus_dir, tmp_path):
    """SIGTERM reaching rank 0 only (``kill``) stops both ranks after one step and saves one checkpoint."""
    stderr_file = tmp_path / "stderr.txt"
    process = start_cli(stderr_file, "train", *ddp_run_overrides(corpus_dir, 30), *paths_in(tmp_path), threads=1)
    try:
        wait_for(process, tmp_path, "logs/train/runs/*/checkpoints/periodic-*.ckpt", poll=0.1)
        process.send_signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        process.wait(timeout=60)
        elapsed = time.monotonic() - stopped_at
    finally:
        kill_process_tree(process)
    stderr = stderr_file.read_text()
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert elapsed < 20, f"the ranks did not agree on the step to stop at (waited {elapsed:.0f} s)"
    assert "Traceback" not in stderr
    [saved] = tmp_path.glob("logs/train/runs/*/checkpoints/interrupted-step*.ckpt")
    step = read_checkpoint(saved)["global_step"]
    assert f"training stopped by SIGTERM after step {step}; saved a resumable checkpoint: {saved}" in stderr
    assert stderr.count("training stopped by SIGTERM") == 1  # rank 0 reports


# ----------------------------------------------------------------------------------------------
# Security


def test_checkpoints_hold_only_tensors_and_plain_containers(prepared):
    checkpoint = torch.load(prepared.checkpoint, weights_only=True)  # raises if anything needs unpickling

    def assert_plain(value, where):
        if isinstance(value, dict):
            for key, item in value.items():
                assert isinstance(key, (str, int)), where
                assert_plain(item, f"{where}.{key}")
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                assert_plain(item, f"{where}[{i}]")
        else:
            assert value is None or isinstance(value, (str, int, float, bool)), (where, type(value))

    assert_plain(checkpoint["hyper_parameters"], "hyper_parameters")
    assert_plain(checkpoint["lmforge"], "lmforge")
    assert isinstance(checkpoint["lmforge"]["tokenizer"], str)  # tokenizer.json text


def test_token_cache_is_raw_arrays_and_json(prepared):
    import numpy as np

    cache = prepared.cache
    meta = json.loads((cache / "meta.json").read_text())
    json.loads((cache / "tokenizer.json").read_text())
    assert {p.name for p in cache.iterdir()} == {"meta.json", "tokenizer.json", "train.bin", "val.bin", "test.bin"}
    for split, info in meta["splits"].items():
        raw = np.fromfile(cache / f"{split}.bin", dtype=meta["dtype"])
        assert len(raw) == info["tokens"]  # headerless: nothing but the token ids
        assert raw.max(initial=0) < meta["vocab_size"]


def test_tensorboard_binds_localhost():
    recipe = (REPO_ROOT / "Makefile").read_text().split("\ntensorboard:")[1].split("\n\n")[0]
    assert "--host 127.0.0.1" in recipe
