"""Corpora streamed from LitData chunks (data=streaming): the chunks read back as the token cache,
training from them equals training from the cache, and runs resume exactly."""

from __future__ import annotations

import pickle
import signal

import numpy as np
import pytest
from helpers import compose_config, csv_values, run_cli, succeeded, tiny_train_overrides, write_corpus

from lmforge.data import TextFilesSource, TrainWindows, prepare_corpus
from lmforge.data.streaming import ITEM_TOKENS, ChunkedCorpus, StreamingDataModule, read_chunks_meta, write_token_chunks
from lmforge.errors import DataError
from lmforge.training.config import build_datamodule


@pytest.fixture(scope="module")
def chunked(tmp_path_factory):
    """A corpus tokenized into the cache and written as chunks of 2 items (so windows cross chunk files)."""
    root = tmp_path_factory.mktemp("streaming")
    corpus = prepare_corpus(
        TextFilesSource(str(write_corpus(root / "corpus", n_files=40))), tokenizer_kind="char", cache_root=root
    )
    write_token_chunks(corpus, str(root / "chunks"), chunk_tokens=2 * ITEM_TOKENS)
    meta = read_chunks_meta(str(root / "chunks"))
    return corpus, ChunkedCorpus(str(root / "chunks"), meta, corpus.tokenizer, None, "1GB")


def test_chunks_read_back_the_token_cache_slice_by_slice(chunked):
    cache, chunks = chunked
    assert chunks.token_counts["train"] == cache.token_counts["train"] > 5 * ITEM_TOKENS
    cached, streamed = cache.tokens("train"), chunks.tokens("train")
    assert len(streamed) == len(cached)
    edges = [
        (0, 5),
        (ITEM_TOKENS - 3, ITEM_TOKENS + 3),
        (2 * ITEM_TOKENS - 1, 4 * ITEM_TOKENS + 7),
        (len(cached) - 9, len(cached)),
    ]
    for start, stop in edges:  # inside an item, across items, across chunk files, the padded end
        assert np.array_equal(streamed[start:stop], cached[start:stop]), (start, stop)
    windows = TrainWindows(cached, 48, 8, seed=3, rank=1, world_size=2)
    streamed_windows = TrainWindows(streamed, 48, 8, seed=3, rank=1, world_size=2)
    for k in (0, 7):
        for a, b in zip(windows[k], streamed_windows[k]):
            assert (a == b).all()
    copy = pickle.loads(pickle.dumps(streamed))  # as DataLoader workers receive it: without an open reader
    assert np.array_equal(copy[100:300], cached[100:300])


def test_missing_chunks_without_a_corpus_are_one_line(tmp_path):
    cfg = compose_config("train", ["data=streaming", f"data.chunks_dir={tmp_path}/none"], tmp_path)
    datamodule = build_datamodule(cfg.data)
    assert isinstance(datamodule, StreamingDataModule) and datamodule.source is None
    with pytest.raises(DataError, match=r"no LitData chunks at data.chunks_dir=.*none; write them once with"):
        datamodule.prepare_data()


def test_chunk_size_must_hold_whole_items(chunked, tmp_path):
    with pytest.raises(DataError, match=f"must be a multiple of {ITEM_TOKENS}"):
        write_token_chunks(chunked[0], str(tmp_path), chunk_tokens=1000)


def test_writing_chunks_keeps_the_sigint_handler(chunked, tmp_path):
    """LitData's optimize swaps in a handler that exits 0 on Ctrl-C; the writer must put the old one back."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        write_token_chunks(chunked[0], str(tmp_path / "chunks"), chunk_tokens=2 * ITEM_TOKENS)
        assert signal.getsignal(signal.SIGINT) is handler
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.slow
def test_training_from_chunks_equals_training_from_the_cache_and_resumes_exactly(corpus_dir, tmp_path):
    """`lmforge prepare` writes the chunks; 100 steps from them (two DataLoader workers) log the same
    losses as from the token cache; a run resumed from step 50 logs the same losses after it."""
    common = [
        *tiny_train_overrides(corpus_dir),
        "trainer.max_steps=100",
        "trainer.val_check_interval=50",
        "trainer.log_every_n_steps=10",
        "callbacks.periodic_checkpoint.every_n_train_steps=50",
        "callbacks.periodic_checkpoint.save_top_k=-1",
        "logger=csv",
        "test=false",
        f"paths.data_dir={tmp_path}/data",
    ]
    chunks = tmp_path / "chunks"
    streaming = [*common, "data=streaming", f"data.chunks_dir={chunks}", "data.num_workers=2"]
    assert succeeded(run_cli("prepare", *streaming, f"data.path={corpus_dir}"))
    assert (chunks / "lmforge-chunks.json").exists() and list((chunks / "train").glob("chunk-*.bin"))
    assert succeeded(run_cli("train", *common, f"paths.log_dir={tmp_path}/cache"))
    assert succeeded(run_cli("train", *streaming, f"paths.log_dir={tmp_path}/chunks-run"))
    for key in ("train/loss", "val/loss"):
        from_cache, from_chunks = csv_values(tmp_path / "cache", key), csv_values(tmp_path / "chunks-run", key)
        assert sorted(from_cache) == sorted(from_chunks) and len(from_cache) >= 2
        for step, loss in from_cache.items():
            assert from_chunks[step] == pytest.approx(loss, abs=1e-6), (key, step)

    (step50,) = (tmp_path / "chunks-run").glob("train/runs/*/checkpoints/periodic-step000050.ckpt")
    assert succeeded(run_cli("train", *streaming, f"paths.log_dir={tmp_path}/resumed", f"ckpt_path={step50}"))
    resumed, full = csv_values(tmp_path / "resumed", "train/loss"), csv_values(tmp_path / "chunks-run", "train/loss")
    assert sorted(resumed) == [step for step in sorted(full) if step >= 50]
    for step, loss in resumed.items():
        assert loss == pytest.approx(full[step], abs=1e-6), step
