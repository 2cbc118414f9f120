import functools
import hashlib
import http.server
import json
import logging
import multiprocessing
import pickle
import random
import socket
import threading
from pathlib import Path
from types import SimpleNamespace

import fsspec
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers import compose_config

from lmforge.cli.prepare import prepare as run_prepare
from lmforge.data import (
    DataError,
    DownloadedTextSource,
    EvalWindows,
    LMDataModule,
    MicroBatchSampler,
    StdlibSource,
    TextFilesSource,
    TrainWindows,
    prepare_corpus,
)
from lmforge.data import cache as cache_module
from lmforge.data.tokenizer import encode_documents, train_tokenizer
from lmforge.errors import reported_errors

WORDS = "alpha beta gamma delta lorem ipsum dolor sit amet the quick brown fox jumps over a lazy dog".split()


def make_text(seed: int, lines: int) -> str:
    rng = random.Random(seed)
    return "".join(" ".join(rng.choices(WORDS, k=8)) + "\n" for _ in range(lines))


@pytest.fixture
def docs_dir(tmp_path) -> Path:
    """40 small documents, each starting with its own name so splits can be told apart."""
    root = tmp_path / "corpus"
    for i in range(40):
        path = root / f"part{i % 3}" / f"doc{i:02d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"doc{i:02d}\n" + make_text(i, 20))
    return root


def prepare(source, tmp_path, **kwargs):
    kwargs = {"tokenizer_kind": "bytes", "vocab_size": None, "cache_root": tmp_path / "cache", **kwargs}
    return prepare_corpus(source, **kwargs)


def decode_split(corpus, split: str) -> list[str]:
    """The documents of a split, cut at EOT."""
    ids = np.asarray(corpus.tokens(split)).tolist()
    eot = corpus.meta["eot_id"]
    docs, start = [], 0
    for i, token in enumerate(ids):
        if token == eot:
            docs.append(corpus.tokenizer.decode(ids[start:i]))
            start = i + 1
    assert start == len(ids), "every split ends with EOT"
    return docs


# --- sources -------------------------------------------------------------------------------


def test_stdlib_source_is_deterministic_and_bounded():
    source = StdlibSource(max_bytes=300_000)
    files = source.files()
    assert files == StdlibSource(max_bytes=300_000).files()
    assert [rel for rel, _ in files] == sorted(rel for rel, _ in files)
    assert 0 < sum(path.stat().st_size for _, path in files) <= 300_000
    for rel, _ in files:
        parts = set(rel.split("/")[:-1])
        assert rel.endswith(".py")
        assert not parts & {"test", "tests", "idle_test", "site-packages"}, rel
    doc_ids = [doc_id for doc_id, _ in source.documents()]
    assert doc_ids == [rel for rel, path in files if path.stat().st_size > 0]  # empty files are skipped
    assert source.fingerprint() == StdlibSource(max_bytes=300_000).fingerprint()
    assert source.fingerprint() != StdlibSource(max_bytes=200_000).fingerprint()


def test_text_files_directory_glob_and_extensions(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.txt").write_text("b")
    (tmp_path / "d" / "sub" / "a.md").write_text("a")
    (tmp_path / "d" / ".hidden.txt").write_text("hidden")
    (tmp_path / "one.txt").write_text("one")
    source = TextFilesSource(["d", "one.txt"])
    assert [doc_id for doc_id, _ in source.documents()] == ["d/b.txt", "d/sub/a.md", "one.txt"]
    assert [t for _, t in TextFilesSource("d/**/*.md").documents()] == ["a"]
    assert [t for _, t in TextFilesSource("d", extensions=["txt"]).documents()] == ["b"]


@pytest.mark.parametrize(
    ("setup", "path", "message"),
    [
        (lambda root: None, "missing.txt", "the data path missing.txt does not exist"),
        (lambda root: (root / "empty").mkdir(), "empty", "the directory empty contains no files"),
        (lambda root: None, "nothing/*.txt", "the pattern 'nothing/\\*.txt' matches no files"),
        (lambda root: (root / "zero.txt").write_text(""), "zero.txt", r"are empty \(0 bytes\)"),
    ],
)
def test_text_files_errors(tmp_path, monkeypatch, setup, path, message):
    monkeypatch.chdir(tmp_path)
    setup(tmp_path)
    with pytest.raises(DataError, match=message):
        TextFilesSource(path).fingerprint()


def test_text_files_skip_binary_and_invalid_utf8(tmp_path, caplog):
    (tmp_path / "good.txt").write_text("good text\n")
    (tmp_path / "image.bin").write_bytes(b"\x89PNG\x00\x01\x02")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    source = TextFilesSource(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="lmforge.data"):
        assert [t for _, t in source.documents()] == ["good text\n"]
        list(source.documents())
    warnings = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(warnings) == 1  # once per source, not once per pass
    assert "skipped 2 binary or non-UTF-8 file(s)" in warnings[0]
    assert "image.bin" in warnings[0]

    (tmp_path / "good.txt").unlink()
    with pytest.raises(DataError, match="no usable text"):
        list(TextFilesSource(str(tmp_path)).documents())


# --- downloads -----------------------------------------------------------------------------

SHAKESPEARE = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 50


@pytest.fixture
def served_file(tmp_path):
    """A text file, its SHA-256 and a local http:// URL for it."""
    directory = tmp_path / "www"
    directory.mkdir()
    path = directory / "input.txt"
    path.write_text(SHAKESPEARE)

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield path, hashlib.sha256(path.read_bytes()).hexdigest(), f"http://127.0.0.1:{server.server_port}/input.txt"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


def test_download_file_url_and_reuse(tmp_path, served_file):
    path, sha, _ = served_file
    source = DownloadedTextSource(path.as_uri(), sha, "shakespeare.txt", str(tmp_path / "dl"))
    assert source.name == "shakespeare"
    assert list(source.documents()) == [("shakespeare.txt", SHAKESPEARE)]
    path.unlink()  # the cached copy is used from now on
    fingerprint = source.fingerprint()
    assert list(source.documents()) == [("shakespeare.txt", SHAKESPEARE)]
    same = DownloadedTextSource(path.as_uri(), sha, "shakespeare.txt", str(tmp_path / "dl"))
    assert same.fingerprint() == fingerprint
    (tmp_path / "dl" / "shakespeare.txt").write_text("tampered")
    with pytest.raises(DataError, match="has SHA-256 .* expected .*; delete it to download it again"):
        source.fingerprint()


def test_download_http(tmp_path, served_file):
    _, sha, url = served_file
    corpus = prepare(DownloadedTextSource(url, sha, "input.txt", str(tmp_path / "dl")), tmp_path)
    assert corpus.meta["split"]["mode"] == "contiguous"
    assert "".join(decode_split(corpus, "val")).endswith("hear me speak.\n")


def test_download_checksum_mismatch(tmp_path, served_file):
    _, _, url = served_file
    source = DownloadedTextSource(url, "0" * 64, "input.txt", str(tmp_path / "dl"))
    with pytest.raises(DataError, match=f"the download of {url} has SHA-256 [0-9a-f]{{64}}, expected 0{{64}}"):
        source.fingerprint()
    assert list((tmp_path / "dl").iterdir()) == [tmp_path / "dl" / "input.txt.lock"]  # temp file removed


def test_download_unreachable(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/input.txt"
    target = tmp_path / "dl" / "input.txt"
    source = DownloadedTextSource(url, None, "input.txt", str(tmp_path / "dl"))
    with pytest.raises(DataError) as info:
        list(source.documents())
    message = str(info.value)
    assert message.startswith(f"could not download {url} (")
    assert f"save it as {target}, or use data=text_files data.path=<file>" in message
    assert "\n" not in message


# --- token cache ---------------------------------------------------------------------------


def test_cache_reuse_and_invalidation(tmp_path, docs_dir):
    source = TextFilesSource(str(docs_dir))
    first = prepare(source, tmp_path, tokenizer_kind="bpe", vocab_size=300)
    assert first.built
    assert first.path.name.startswith("text_files-")
    second = prepare(source, tmp_path, tokenizer_kind="bpe", vocab_size=300)
    assert not second.built
    assert second.path == first.path
    assert second.meta["built_at"] == first.meta["built_at"]
    assert second.tokenizer.to_str() == first.tokenizer.to_str()

    other_vocab = prepare(source, tmp_path, tokenizer_kind="bpe", vocab_size=320)
    assert other_vocab.built and other_vocab.path != first.path
    other_sample = prepare(source, tmp_path, tokenizer_kind="bpe", vocab_size=300, tokenizer_train_bytes=10_000)
    assert other_sample.built and other_sample.path not in (first.path, other_vocab.path)
    assert other_sample.meta["tokenizer_train_bytes"] == 10_000

    (docs_dir / "part0" / "doc00.txt").write_text("changed\n")
    changed = prepare(source, tmp_path, tokenizer_kind="bpe", vocab_size=300)
    assert changed.built and changed.path != first.path


def test_cache_meta_and_dtype(tmp_path, docs_dir):
    corpus = prepare(TextFilesSource(str(docs_dir)), tmp_path)
    meta = json.loads((corpus.path / "meta.json").read_text())
    assert meta == corpus.meta
    assert meta["dtype"] == "uint16" and corpus.dtype == np.uint16
    assert meta["vocab_size"] == corpus.tokenizer.get_vocab_size() == 257
    assert meta["documents"] == 40
    assert sum(s["documents"] for s in meta["splits"].values()) == 40
    total_bytes = sum(p.stat().st_size for p in docs_dir.rglob("*.txt"))
    assert meta["bytes"] == total_bytes
    assert sum(corpus.token_counts.values()) == total_bytes + 40  # one token per byte + EOTs
    assert (corpus.path / "tokenizer.json").is_file()
    assert corpus.tokens("train").dtype == np.uint16


def test_uint32_when_vocab_is_large(tmp_path, docs_dir, monkeypatch):
    monkeypatch.setattr(cache_module, "token_dtype", lambda vocab_size: np.dtype(np.uint32))
    corpus = prepare(TextFilesSource(str(docs_dir)), tmp_path, tokenizer_kind="char")
    assert corpus.meta["dtype"] == "uint32"
    train = corpus.tokens("train")
    assert train.dtype == np.uint32
    assert (corpus.path / "train.bin").stat().st_size == 4 * len(train)
    assert cache_module.token_dtype.__name__ == "<lambda>"
    monkeypatch.undo()
    assert cache_module.token_dtype(65536) == np.uint16
    assert cache_module.token_dtype(65537) == np.uint32


def test_document_split_is_deterministic_and_disjoint(tmp_path, docs_dir):
    source = TextFilesSource(str(docs_dir))
    corpus = prepare(source, tmp_path, val_fraction=0.2, test_fraction=0.2)
    assert corpus.meta["split"]["mode"] == "documents"
    splits = {split: decode_split(corpus, split) for split in ("train", "val", "test")}
    names = {split: {doc.split("\n", 1)[0] for doc in docs} for split, docs in splits.items()}
    assert all(names.values())
    assert sum(len(n) for n in names.values()) == 40
    assert set.union(*names.values()) == {f"doc{i:02d}" for i in range(40)}

    again = prepare(source, tmp_path / "elsewhere", val_fraction=0.2, test_fraction=0.2)
    for split in ("train", "val", "test"):
        assert np.array_equal(again.tokens(split), corpus.tokens(split))
    reseeded = prepare(source, tmp_path, val_fraction=0.2, test_fraction=0.2, seed=7)
    assert {doc.split("\n", 1)[0] for doc in decode_split(reseeded, "val")} != names["val"]


def test_contiguous_split_of_a_single_document(tmp_path):
    text = make_text(0, 500)
    (tmp_path / "input.txt").write_text(text)
    corpus = prepare(TextFilesSource(str(tmp_path / "input.txt")), tmp_path)
    assert corpus.meta["split"]["mode"] == "contiguous"
    train = corpus.tokenizer.decode(np.asarray(corpus.tokens("train")).tolist())
    val = decode_split(corpus, "val")
    assert train + "".join(val) == text
    assert train.endswith("\n")
    assert abs(len(train) - 0.9 * len(text)) < 100  # cut at the line end after 90 %
    assert corpus.token_counts["test"] == 0


def test_long_documents_are_encoded_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_module, "CHUNK_CHARS", 100)
    monkeypatch.setattr(cache_module, "BATCH_BYTES", 1000)
    text = make_text(1, 100) + "x" * 350 + "\n"  # the last line is longer than a chunk
    (tmp_path / "input.txt").write_text(text)
    corpus = prepare(TextFilesSource(str(tmp_path / "input.txt")), tmp_path)
    ids = np.concatenate([corpus.tokens("train"), corpus.tokens("val")]).tolist()
    assert ids.count(corpus.meta["eot_id"]) == 1 and ids[-1] == corpus.meta["eot_id"]
    assert corpus.tokenizer.decode(ids) == text


def test_chunks_give_the_tokens_and_tokenizer_of_whole_documents(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_module, "CHUNK_CHARS", 40)
    rng = random.Random(0)
    lines = [
        "def f(x):\n",
        "    return x  \n",
        "\n",
        "\n\n",
        "class A:\n",
        "\tpass\n",
        "   \n",
        "y = [1,  2]\n",
        " ".join(rng.choices(WORDS, k=12)) + "\n",
    ]  # a line longer than a chunk
    text = "".join(rng.choices(lines, k=400))
    (tmp_path / "input.txt").write_text(text)
    assert len(list(cache_module._chunks(text, 0, len(text)))) > 100
    corpus = prepare(TextFilesSource(str(tmp_path / "input.txt")), tmp_path, tokenizer_kind="bpe", vocab_size=300)
    train_ids = np.asarray(corpus.tokens("train")).tolist()
    train_text = corpus.tokenizer.decode(train_ids)
    assert train_ids == encode_documents(corpus.tokenizer, [train_text])[0]
    assert corpus.tokenizer.to_str() == train_tokenizer("bpe", [train_text], 300).to_str()


def test_explicit_document_split_needs_documents(tmp_path):
    (tmp_path / "input.txt").write_text(make_text(0, 10))
    with pytest.raises(DataError, match="split=documents leaves the val split without documents"):
        prepare(TextFilesSource(str(tmp_path / "input.txt")), tmp_path, split="documents")


def test_incomplete_cache_is_rebuilt(tmp_path, docs_dir):
    source = TextFilesSource(str(docs_dir))
    corpus = prepare(source, tmp_path)
    (corpus.path / "meta.json").unlink()  # as if the build crashed before finishing
    leftover = corpus.path.parent / f"{corpus.path.name}.tmp-crashed"
    leftover.mkdir()
    rebuilt = prepare(source, tmp_path)
    assert rebuilt.built and rebuilt.path == corpus.path
    assert not leftover.exists()
    assert not prepare(source, tmp_path).built


def test_tokenizer_mismatch_is_reported(tmp_path, docs_dir):
    corpus = prepare(TextFilesSource(str(docs_dir)), tmp_path)
    meta = dict(corpus.meta, vocab_size=999)
    (corpus.path / "meta.json").write_text(json.dumps(meta))
    message = "tokenizer.json does not match the cached token files in .*; delete the directory to rebuild"
    with pytest.raises(DataError, match=message):
        prepare(TextFilesSource(str(docs_dir)), tmp_path)


def test_unwritable_cache_root(tmp_path, docs_dir):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    message = "cannot write the token cache to .*; set data.cache_dir to a writable directory"
    with pytest.raises(DataError, match=message):
        prepare_corpus(TextFilesSource(str(docs_dir)), "bytes", None, cache_root=blocker / "cache")


def test_given_tokenizer_is_used(tmp_path, docs_dir):
    source = TextFilesSource(str(docs_dir))
    char = prepare(source, tmp_path, tokenizer_kind="char")
    given = prepare(source, tmp_path, tokenizer_json=char.tokenizer.to_str())
    assert given.path != char.path
    assert given.tokenizer.to_str() == char.tokenizer.to_str()
    assert np.array_equal(given.tokens("val"), char.tokens("val"))


def numbered_lines_corpus(root: Path) -> Path:
    """40 documents of 50 lines; every line starts with its number in the whole corpus."""
    root.mkdir()
    for doc in range(40):
        lines = [f"{doc * 50 + i:05d} " + make_text(doc * 50 + i, 1) for i in range(50)]
        (root / f"doc{doc:02d}.txt").write_text("".join(lines))
    return root


def fed_to_trainer(monkeypatch, source, tmp_path, **kwargs) -> tuple[list[str], cache_module.CachedCorpus]:
    """Prepare ``source`` and return the texts the tokenizer was trained on, and the corpus."""
    fed = []

    def recording_train_tokenizer(kind, texts, vocab_size):
        fed.extend(texts)
        return train_tokenizer(kind, iter(fed), vocab_size)

    monkeypatch.setattr(cache_module, "train_tokenizer", recording_train_tokenizer)
    corpus = prepare(source, tmp_path, **kwargs)
    return fed, corpus


def line_numbers(texts: list[str]) -> list[int]:
    return sorted(int(line[:5]) for text in texts for line in text.splitlines() if line)


@pytest.mark.parametrize("split", ["documents", "contiguous"])
def test_bpe_is_trained_on_a_fixed_sample_spread_over_the_train_split(tmp_path, monkeypatch, split):
    monkeypatch.setattr(cache_module, "CHUNK_CHARS", 200)  # ~4 lines a chunk: ~450 chunks
    source = TextFilesSource(str(numbered_lines_corpus(tmp_path / "corpus")))
    kwargs = {"tokenizer_kind": "bpe", "vocab_size": 300, "split": split}
    whole, corpus = fed_to_trainer(monkeypatch, source, tmp_path, tokenizer_train_bytes=None, **kwargs)
    train_bytes = corpus.meta["splits"]["train"]["bytes"]
    assert sum(len(t.encode()) for t in whole) == corpus.meta["tokenizer_sample_bytes"] == train_bytes > 80_000
    assert max(len(t) for t in whole) <= 200

    budget = 20_000
    sample, sampled = fed_to_trainer(monkeypatch, source, tmp_path, tokenizer_train_bytes=budget, **kwargs)
    fed_bytes = sum(len(t.encode()) for t in sample)
    assert sampled.meta["tokenizer_sample_bytes"] == fed_bytes
    assert abs(fed_bytes - budget) < 0.15 * budget
    train_lines, sample_lines = line_numbers(whole), line_numbers(sample)
    assert set(sample_lines) < set(train_lines)
    for quarter in np.array_split(np.array(train_lines), 4):  # each quarter of the split gives ~1/4 of the sample
        share = np.isin(sample_lines, quarter).mean()
        assert 0.15 < share < 0.35, share
    assert len({n // 50 for n in sample_lines}) > 0.8 * len({n // 50 for n in train_lines})  # most documents

    again, rebuilt = fed_to_trainer(monkeypatch, source, tmp_path / "elsewhere", tokenizer_train_bytes=budget, **kwargs)
    assert again == sample and rebuilt.tokenizer.to_str() == sampled.tokenizer.to_str()
    above, _ = fed_to_trainer(monkeypatch, source, tmp_path, tokenizer_train_bytes=10 * train_bytes, **kwargs)
    assert above == whole


def test_char_tokenizer_sees_the_whole_train_split(tmp_path, docs_dir, monkeypatch):
    source = TextFilesSource(str(docs_dir))
    fed, corpus = fed_to_trainer(monkeypatch, source, tmp_path, tokenizer_kind="char", tokenizer_train_bytes=1000)
    assert sum(len(t.encode()) for t in fed) == corpus.meta["splits"]["train"]["bytes"] > 10_000
    assert corpus.meta["tokenizer_train_bytes"] is None
    assert not prepare(source, tmp_path, tokenizer_kind="char", tokenizer_train_bytes=None).built  # same cache


def test_bad_tokenizer_train_bytes_is_one_error_line_before_any_preparation(tmp_path, docs_dir, capsys):
    overrides = ["data=text_files", f"data.path={docs_dir}", "data.tokenizer_train_bytes=0"]
    cfg = compose_config("prepare", overrides, tmp_path)
    with pytest.raises(SystemExit) as exit_info, reported_errors():
        run_prepare(cfg)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: data.tokenizer_train_bytes=0 must be a positive whole number of bytes")
    assert "\n" not in err
    assert not (tmp_path / "data").exists()
    with pytest.raises(DataError, match="data.tokenizer_train_bytes=-5 must be"):
        prepare(TextFilesSource(str(docs_dir)), tmp_path, tokenizer_train_bytes=-5)


def _prepare_in_subprocess(source, cache_root, barrier, results):
    barrier.wait()
    corpus = prepare_corpus(source, "char", None, cache_root=cache_root)
    results.put((corpus.built, str(corpus.path), corpus.meta["built_at"]))


def test_concurrent_prepare_builds_once(tmp_path, docs_dir):
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    source = TextFilesSource(str(docs_dir))
    args = (source, tmp_path / "cache", barrier, results)
    procs = [ctx.Process(target=_prepare_in_subprocess, args=args) for _ in range(2)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert sorted(built for built, _, _ in outcomes) == [False, True]
    assert len({(path, built_at) for _, path, built_at in outcomes}) == 1


# --- windows -------------------------------------------------------------------------------


def test_train_windows_are_a_function_of_seed_and_global_index():
    tokens = np.arange(1000, dtype=np.uint16)
    windows = TrainWindows(tokens, block_size=16, batch_size=4, seed=1, rank=0)
    x, y = windows[5]
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)  # targets are the next tokens
    assert torch.equal(windows[5][0], x)
    assert torch.equal(TrainWindows(tokens, 16, 4, seed=1, rank=0)[5][0], x)
    assert not torch.equal(windows[6][0], x)
    assert not torch.equal(TrainWindows(tokens, 16, 4, seed=1, rank=1, world_size=2)[5][0], x)
    assert not torch.equal(TrainWindows(tokens, 16, 4, seed=2, rank=0)[5][0], x)
    # micro-batch 2 of rank 1 of 2 is number 2 * 2 + 1 = 5 of the job, as micro-batch 5 of one process
    assert torch.equal(TrainWindows(tokens, 16, 4, seed=1, rank=1, world_size=2)[2][0], x)
    with pytest.raises(ValueError, match=r"rank=2 must be in \[0, world_size=2\)"):
        TrainWindows(tokens, 16, 4, seed=1, rank=2, world_size=2)
    assert int(x.max()) <= 998 and int(y.max()) <= 999


def test_sampler_start_continues_the_sequence():
    windows = TrainWindows(np.arange(500, dtype=np.uint16), block_size=8, batch_size=2, seed=0, rank=0)
    assert list(MicroBatchSampler(3, 4)) == [3, 4, 5, 6] and len(MicroBatchSampler(3, 4)) == 4
    assert list(MicroBatchSampler(3, 4, period=2)) == [1, 0, 1, 0]

    def first(start, n):
        loader = torch.utils.data.DataLoader(windows, batch_size=None, sampler=MicroBatchSampler(start))
        return [x for (x, _), _ in zip(loader, range(n))]

    uninterrupted = first(0, 10)
    resumed = first(6, 4)
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted[6:], resumed))


def test_eval_windows_all_and_sampled():
    tokens = np.arange(101, dtype=np.uint16)
    all_windows = EvalWindows(tokens, block_size=10, num_windows=None, seed=0)
    assert len(all_windows) == 10
    assert [int(all_windows[i][0][0]) for i in range(10)] == list(range(0, 100, 10))
    assert torch.equal(all_windows[9][1], torch.arange(91, 101))

    sampled = EvalWindows(tokens, block_size=10, num_windows=7, seed=3)
    assert len(sampled) == 7
    assert np.array_equal(sampled.offsets, EvalWindows(tokens, 10, 7, seed=3).offsets)
    assert sampled.offsets.max() <= 90


@pytest.mark.parametrize("num_windows", [None, 11])
def test_eval_windows_rank_split_covers_everything_once(num_windows):
    tokens = np.arange(200, dtype=np.uint16)
    full = EvalWindows(tokens, 12, num_windows, seed=0).offsets
    shards = [EvalWindows(tokens, 12, num_windows, seed=0, rank=r, world_size=3).offsets for r in range(3)]
    assert sum(len(s) for s in shards) == len(full)
    assert sorted(np.concatenate(shards).tolist()) == sorted(full.tolist())


def test_split_too_small():
    message = r"the val split has 10 tokens, fewer than one window of block_size\+1=11; use a smaller data.block_size"
    with pytest.raises(DataError, match=message):
        EvalWindows(np.arange(10, dtype=np.uint16), 10, None, seed=0)
    with pytest.raises(DataError, match="the train split has 5 tokens"):
        TrainWindows(np.arange(5, dtype=np.uint16), 8, 2, seed=0, rank=0)


def test_windows_pickle_memmaps_by_name(tmp_path):
    path = tmp_path / "tokens.bin"
    np.arange(1000, dtype=np.uint16).tofile(path)
    windows = TrainWindows(np.memmap(path, dtype=np.uint16, mode="r"), 8, 2, seed=0, rank=0)
    payload = pickle.dumps(windows)
    assert len(payload) < 1000
    assert torch.equal(pickle.loads(payload)[3][0], windows[3][0])


# --- data module ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"block_size": 0}, "data.block_size=0 must be >= 1"),
        ({"batch_size": 0}, "data.batch_size=0 must be >= 1"),
        ({"eval_windows": 0}, "data.eval_windows=0 must be >= 1"),
        ({"val_fraction": 0.0}, "data.val_fraction=0.0 must be in"),
        ({"test_fraction": 1.0}, "data.test_fraction=1.0 must be in"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "leaves no training data"),
        ({"tokenizer": "words"}, "data.tokenizer='words' is not one of bpe, char, bytes"),
        ({"split": "random"}, "data.split='random' is not one of"),
        ({"overfit_batches": -1}, "data.overfit_batches=-1 must be >= 0"),
        ({"tokenizer_train_bytes": 0}, "data.tokenizer_train_bytes=0 must be a positive whole number"),
        ({"tokenizer_train_bytes": 6.4e7}, r"data.tokenizer_train_bytes=64000000.0 must be .* \(e.g. 64000000\)"),
        ({"tokenizer_train_bytes": "64MB"}, "data.tokenizer_train_bytes='64MB' must be"),
        ({"tokenizer_train_bytes": True}, "data.tokenizer_train_bytes=True must be"),
    ],
)
def test_datamodule_validates_arguments(tmp_path, kwargs, message):
    with pytest.raises(DataError, match=message):
        LMDataModule(TextFilesSource(str(tmp_path)), **kwargs)


def make_datamodule(docs_dir, tmp_path, **kwargs):
    kwargs = {"tokenizer": "bytes", "block_size": 16, "batch_size": 4, "cache_dir": str(tmp_path / "cache"), **kwargs}
    return LMDataModule(TextFilesSource(str(docs_dir)), **kwargs)


def test_datamodule_loaders(tmp_path, docs_dir):
    dm = make_datamodule(docs_dir, tmp_path, eval_batch_size=8, eval_windows=20)
    assert dm.vocab_size == 257  # prepares on first access
    assert dm.cache_path.is_dir() and dm.tokenizer.get_vocab_size() == 257
    assert json.loads(dm.tokenizer_json)["model"]["type"] == "BPE"
    dm.setup("fit")
    assert dm.tokens("test") is dm.tokens("val")

    x, y = next(iter(dm.train_loader(start_micro_batch=0, rank=0)))
    assert x.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])

    dm.trainer = SimpleNamespace(
        global_step=3, accumulate_grad_batches=2, distributed_sampler_kwargs={"rank": 1, "num_replicas": 2}
    )
    loader = dm.train_dataloader()
    assert loader.sampler.start == 6 and (loader.dataset.rank, loader.dataset.world_size) == (1, 2)
    assert torch.equal(next(iter(loader))[0], TrainWindows(dm.tokens("train"), 16, 4, 1337, 1, 2)[6][0])
    assert len(dm.val_dataloader().dataset) == 10  # windows 1::2 of 20
    dm.trainer = None
    batches = list(dm.val_dataloader())
    assert [len(b[0]) for b in batches] == [8, 8, 4]


def test_datamodule_overfit_batches_repeat(tmp_path, docs_dir):
    dm = make_datamodule(docs_dir, tmp_path, overfit_batches=2)
    batches = [x for (x, _), _ in zip(dm.train_loader(start_micro_batch=0, rank=0), range(4))]
    assert torch.equal(batches[0], batches[2]) and torch.equal(batches[1], batches[3])
    assert not torch.equal(batches[0], batches[1])


def test_datamodule_block_too_large(tmp_path, docs_dir):
    dm = make_datamodule(docs_dir, tmp_path, block_size=100_000)
    message = r"the train split has \d+ tokens, fewer than one window of block_size\+1=100001"
    with pytest.raises(DataError, match=message):
        dm.setup("fit")


class TinyLM(pl.LightningModule):
    def __init__(self, vocab_size):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, vocab_size)
        self.val_batches = 0

    def _loss(self, batch):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.embed(x).flatten(0, 1), y.flatten())

    def training_step(self, batch, batch_idx):
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self.val_batches += 1
        self.log("val/loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_datamodule_with_trainer(tmp_path, docs_dir):
    dm = make_datamodule(docs_dir, tmp_path, eval_windows=8, num_workers=1)
    dm.prepare_data()
    model = TinyLM(dm.vocab_size)
    trainer = pl.Trainer(
        max_steps=4,
        val_check_interval=2,
        accumulate_grad_batches=2,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 4
    assert model.val_batches > 0 and model.val_batches % 2 == 0  # each validation: 8 windows in 2 batches of 4


def test_text_file_document_ids_do_not_depend_on_the_working_directory(tmp_path, monkeypatch):
    """The seeded document split hashes document ids: they must name files relative to the corpus."""
    corpus = tmp_path / "deep" / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.txt").write_text("alpha\n")
    (corpus / "sub" / "b.txt").write_text("beta\n")
    seen = []
    for cwd in (tmp_path, corpus / "sub"):
        monkeypatch.chdir(cwd)
        seen.append([doc_id for doc_id, _ in TextFilesSource(str(corpus)).documents()])
        seen.append([doc_id for doc_id, _ in TextFilesSource(str(corpus / "**" / "*.txt")).documents()])
    assert all(ids == ["a.txt", "sub/b.txt"] for ids in seen), seen


def test_text_files_behind_fsspec_urls(tmp_path):
    """data.path may be an fsspec URL: a folder, a glob or a file in any store fsspec reaches."""
    memory = fsspec.filesystem("memory")
    for name, text in {"a.txt": "alpha text\n", "sub/b.txt": "beta text\n", ".hidden.txt": "no", "c.bin": "x"}.items():
        memory.pipe(f"/corpus-{tmp_path.name}/{name}", text.encode())
    url = f"memory://corpus-{tmp_path.name}"
    source = TextFilesSource(url + "/", extensions=[".txt"])
    assert dict(source.documents()) == {"a.txt": "alpha text\n", "sub/b.txt": "beta text\n"}
    assert dict(TextFilesSource(url + "/*.txt").documents()) == {"a.txt": "alpha text\n"}
    fingerprint = source.fingerprint()
    memory.pipe(f"/corpus-{tmp_path.name}/a.txt", b"alpha text, longer\n")
    assert source.fingerprint() != fingerprint
    with pytest.raises(DataError, match="does not exist"):
        TextFilesSource(url + "/missing.txt").files()
    local = tmp_path / "local"
    local.mkdir()
    (local / "d.txt").write_text("delta\n")
    assert dict(TextFilesSource(f"file://{local}").documents()) == {"d.txt": "delta\n"}
