"""Bad input gets one clear error (exit code 1, no traceback) and writes nothing.

CLI tests run the real ``lmforge`` command in a subprocess (about 5 s of imports each), so the
many config-value checks run in-process through the same error reporting as the CLI
(:func:`lmforge.errors.reported_errors`), and a few representative ones through the CLI.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import (
    DEFAULT_MODEL,
    OPTION_NEEDS,
    REPO_ROOT,
    SHORT_RUN,
    TINY_MODEL,
    assert_one_clear_error,
    assert_untouched,
    compose_config,
    file_states,
    reported,
    run_cli,
    tiny_train_overrides,
)

from lmforge.cli.eval import evaluate
from lmforge.cli.generate import generate
from lmforge.cli.train import train
from lmforge.errors import ConfigError, reported_errors
from lmforge.training.run import check_run


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
        ("eval", ["data=stdlib"], "data.block_size=128 is longer than the checkpoint's context of 32 tokens"),  # [gpt]
    ],
)
def test_bad_eval_and_generate_settings(config_name, overrides, fragment, prepared, tmp_path, capsys):
    cfg = compose_config(config_name, [f"ckpt_path={prepared.checkpoint}", *overrides, *prepared.paths], tmp_path)
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
    for group in ("model", "optimizer", "scheduler"):
        for option in sorted((REPO_ROOT / "configs" / group).glob("*.yaml")):
            overrides = ["data=text_files", f"data.path={corpus_dir}", f"{group}={option.stem}"]
            overrides += OPTION_NEEDS.get((group, option.stem), [])
            start = check_run(compose_config("train", overrides, tmp_path), "train")
            assert start.resume is None and start.init is None


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
