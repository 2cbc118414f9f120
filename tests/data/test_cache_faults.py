"""The token cache under faults and bad input: unusable tokenizer files, full disks, crashed builds,
unreadable and unwritable files; and what it holds (raw arrays and JSON, nothing to unpickle).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path

import pytest
from helpers import (
    DEFAULT_MODEL,
    assert_one_clear_error,
    assert_untouched,
    compose_config,
    file_states,
    paths_in,
    reported,
    run_cli,
    small_tmpfs,
    tiny_train_overrides,
    write_corpus,
)

from lmforge.cli.prepare import prepare


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


def test_rebuilds_a_cache_that_a_crash_left_half_built(corpus_dir, tmp_path):
    overrides = tiny_train_overrides(corpus_dir, DEFAULT_MODEL)
    cache = Path(prepare(compose_config("prepare", overrides, tmp_path)))
    crashed = cache.with_name(cache.name + ".tmp-crashed")
    cache.rename(crashed)  # the state a process killed while building leaves: only a temporary directory
    (crashed / "meta.json").unlink()
    assert Path(prepare(compose_config("prepare", overrides, tmp_path))) == cache
    assert (cache / "meta.json").is_file() and not crashed.exists()


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
