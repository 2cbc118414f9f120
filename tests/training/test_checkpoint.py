"""Checkpoints: periodic ones and ``ckpt_path=last``, refused when they do not fit the run or are
damaged, loaded without running code.
"""

from __future__ import annotations

import argparse
import os
import shutil

import pytest
import torch
from helpers import (
    DEFAULT_MODEL,
    SHORT_RUN,
    assert_one_clear_error,
    assert_untouched,
    compose_config,
    file_states,
    reported,
    run_cli,
    tiny_train_overrides,
)

from lmforge.cli.generate import generate
from lmforge.cli.train import train
from lmforge.errors import CheckpointError
from lmforge.training.checkpoint import read_checkpoint, resolve_checkpoint


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


def test_a_checkpoint_behind_a_url_is_fetched_once_and_used(prepared, tmp_path, monkeypatch):
    """ckpt_path (and init_from) may be an fsspec URL: the file is downloaded once into the user's cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    url = f"file://{prepared.checkpoint}"
    local = resolve_checkpoint(url, tmp_path)
    assert local.startswith(str(tmp_path / "cache" / "lmforge" / "checkpoints"))
    assert read_checkpoint(local)["global_step"] == read_checkpoint(prepared.checkpoint)["global_step"]
    assert resolve_checkpoint(url, tmp_path) == local  # cached
    texts = generate(compose_config("generate", [f"ckpt_path={url}", "max_new_tokens=4"], tmp_path))
    assert len(texts) == 1
    with pytest.raises(CheckpointError, match="does not exist; check the URL"):
        resolve_checkpoint(f"file://{tmp_path}/missing.ckpt", tmp_path)
