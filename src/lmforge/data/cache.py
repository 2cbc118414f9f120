"""The token cache: a corpus split, tokenized and stored as flat token files.

:func:`prepare_corpus` turns a :class:`~lmforge.data.sources.CorpusSource` into a directory::

    <cache_root>/<source.name>-<key[:12]>/
        tokenizer.json                # trained on the train split only (BPE: a bounded sample of it)
        train.bin, val.bin, test.bin  # token ids (uint16 or uint32), EOT after every document
        meta.json                     # written last: its presence marks a complete cache

The key hashes everything the contents depend on (source fingerprint, tokenizer settings,
split settings, :data:`CACHE_VERSION`), so a later run with the same settings reuses the
directory and any change builds a new one. Building happens in a temporary directory that is
renamed into place, under a file lock so that concurrent processes build it once.

Memory stays flat as the corpus grows: the text is read, encoded and written in bounded
chunks, and the BPE trainer, whose word counts grow with the text it sees, gets a seeded
sample of about ``tokenizer_train_bytes`` spread over the whole train split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from filelock import FileLock, Timeout
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from tokenizers import Tokenizer

from lmforge.data.sources import CorpusSource
from lmforge.data.tokenizer import (
    TOKENIZER_KINDS,
    encode_documents,
    eot_id,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)
from lmforge.errors import DataError

CACHE_VERSION = 1
SPLITS = ("train", "val", "test")
SPLIT_MODES = ("auto", "documents", "contiguous")
BATCH_BYTES = 2_000_000  # text handed to one encode_batch call
# Documents reach the tokenizer trainer and the encoder in chunks of at most this many characters:
# both hold many times each text they work on (1 MB chunks cost hundreds of MB, 16 KB ones tens).
CHUNK_CHARS = 16_384
LINE_SEARCH_CHARS = 10_000  # a contiguous split point moves to the next newline within this distance
# A 4096- or 16384-token BPE trained on 10 MB of code instead of 4 MB compressed held-out code
# under 1% better: 64 MB is far into diminishing returns, and it bounds the trainer's word counts
# (memory) and time (~20 s on 2 cores).
DEFAULT_TOKENIZER_TRAIN_BYTES = 64_000_000

log = logging.getLogger("lmforge.data")


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every token id."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def check_split_params(val_fraction: float, test_fraction: float, split: str) -> None:
    """Raise :class:`DataError` for invalid split settings."""
    if not 0 < val_fraction < 1:
        raise DataError(f"data.val_fraction={val_fraction} must be in (0, 1); e.g. 0.1")
    if not 0 <= test_fraction < 1:
        raise DataError(f"data.test_fraction={test_fraction} must be in [0, 1); e.g. 0 or 0.05")
    if val_fraction + test_fraction >= 1:
        raise DataError(
            f"data.val_fraction + data.test_fraction = {val_fraction + test_fraction} leaves no training data; "
            "make their sum < 1"
        )
    if split not in SPLIT_MODES:
        raise DataError(f"data.split={split!r} is not one of {', '.join(SPLIT_MODES)}")


def check_tokenizer_train_bytes(value: int | None) -> None:
    """Raise :class:`DataError` unless ``value`` is a positive integer or None."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise DataError(
            f"data.tokenizer_train_bytes={value!r} must be a positive whole number of bytes "
            f"(e.g. {DEFAULT_TOKENIZER_TRAIN_BYTES}) or null to train the BPE tokenizer on the whole train split"
        )


@dataclass
class CachedCorpus:
    """A built token cache: its directory, tokenizer and metadata."""

    path: Path
    tokenizer: Tokenizer
    meta: dict
    built: bool = False
    """True when this call built the cache, False when it reused an existing one."""

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.meta["dtype"])

    @property
    def token_counts(self) -> dict[str, int]:
        return {split: info["tokens"] for split, info in self.meta["splits"].items()}

    def tokens(self, split: str) -> np.ndarray:
        """The token ids of ``split`` as a read-only memmap (an empty array for an empty split)."""
        count = self.token_counts[split]
        if count == 0:  # numpy cannot map an empty file
            return np.empty(0, self.dtype)
        return np.memmap(self.path / f"{split}.bin", dtype=self.dtype, mode="r", shape=(count,))


def prepare_corpus(
    source: CorpusSource,
    tokenizer_kind: str = "bpe",
    vocab_size: int | None = 4096,
    val_fraction: float = 0.1,
    test_fraction: float = 0.0,
    split: str = "auto",
    seed: int = 1337,
    cache_root: str | Path = "data",
    tokenizer_json: str | None = None,
    tokenizer_train_bytes: int | None = DEFAULT_TOKENIZER_TRAIN_BYTES,
) -> CachedCorpus:
    """Build the token cache of ``source`` under ``cache_root``, or reuse it when it exists.

    Documents are assigned to train/val/test by a seeded hash of their id (``split="documents"``)
    or, for corpora with too few documents, the concatenated text is cut into consecutive
    train/val/test ranges (``split="contiguous"``); ``"auto"`` picks documents when every split
    with a non-zero fraction gets at least one document. ``vocab_size`` only matters for BPE.
    ``tokenizer_json`` (e.g. a checkpoint's tokenizer) replaces training a tokenizer.
    BPE is trained on a deterministic sample of about ``tokenizer_train_bytes`` of the train
    split when the split is larger (None: all of it); ``"char"`` always sees the whole split.
    Safe to call from several processes at once.
    """
    if tokenizer_kind not in TOKENIZER_KINDS:
        raise DataError(f"data.tokenizer={tokenizer_kind!r} is not one of {', '.join(TOKENIZER_KINDS)}")
    check_split_params(val_fraction, test_fraction, split)
    check_tokenizer_train_bytes(tokenizer_train_bytes)
    trains_bpe = tokenizer_kind == "bpe" and tokenizer_json is None
    settings = {
        "fingerprint": source.fingerprint(),
        "tokenizer": tokenizer_kind,
        "vocab_size": vocab_size if trains_bpe else None,
        "tokenizer_train_bytes": tokenizer_train_bytes if trains_bpe else None,
        "tokenizer_json_sha256": hashlib.sha256(tokenizer_json.encode()).hexdigest() if tokenizer_json else None,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "split": split,
        "seed": seed,
        "cache_version": CACHE_VERSION,
    }
    final = cache_directory(cache_root, source.name, settings)
    corpus = _load(final)
    if corpus is None:
        lock = acquire_build_lock(final)
        try:
            corpus = _load(final)  # another process may have built it while we waited
            if corpus is None:
                return _build(source, settings, final, tokenizer_json)
        finally:
            lock.release()
    log.info("reusing token cache at %s", final)
    return corpus


def cache_directory(cache_root: str | Path, name: str, settings: dict) -> Path:
    """``<cache_root>/<name>-<key>``, the key a hash of every setting the cached contents depend on."""
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    return Path(cache_root).absolute() / f"{name}-{key[:12]}"


def acquire_build_lock(final: Path, kind: str = "token cache") -> FileLock:
    """The file lock under which one process builds the ``kind`` at ``final`` (taken; others wait for it)."""
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(f"{final}.lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info("waiting for another process to build the %s at %s", kind, final)
            lock.acquire()
    except OSError as exc:
        raise DataError(
            f"cannot write the {kind} to {final.parent}: {exc}; set data.cache_dir to a writable directory"
        ) from exc
    return lock


def _load(path: Path) -> CachedCorpus | None:
    """The cache at ``path``, or None when it is absent or incomplete (no valid meta.json)."""
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    try:
        tokenizer = load_tokenizer(path / "tokenizer.json")
    except Exception as exc:  # tokenizers raises its own exception type for malformed files
        raise DataError(f"cannot read {path / 'tokenizer.json'} ({exc}); delete {path} to rebuild") from exc
    if tokenizer.get_vocab_size() != meta["vocab_size"]:
        raise DataError(
            f"tokenizer.json does not match the cached token files in {path}; delete the directory to rebuild"
        )
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split, info in meta["splits"].items():
        file = path / f"{split}.bin"
        if not file.is_file() or file.stat().st_size != info["tokens"] * itemsize:
            raise DataError(f"{file} does not match meta.json; delete {path} to rebuild")
    return CachedCorpus(path, tokenizer, meta)


def _uniform(key: str) -> float:
    """A number in [0, 1) that is a pseudo-random but fixed function of ``key``."""
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass
class _Plan:
    """How the corpus is split and sampled for the tokenizer, from a first pass over it."""

    mode: str  # "documents" or "contiguous"
    seed: int
    val_fraction: float
    test_fraction: float
    documents: int = 0
    chars: int = 0
    bytes: int = 0
    train_bytes: int = 0  # exact for "documents", estimated for "contiguous"
    docs_per_split: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    bytes_per_split: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    tokenizer_share: float = 1.0  # the fraction of the train split that the tokenizer is trained on
    tokenizer_sample_bytes: int = 0  # counted while the sample is fed to the trainer

    def document_split(self, doc_id: str) -> str:
        """The split of a document: a seeded hash of its id mapped to [0, 1) and cut by the fractions."""
        u = _uniform(f"{self.seed}\0{doc_id}")
        if u < 1 - self.val_fraction - self.test_fraction:
            return "train"
        return "val" if u < 1 - self.test_fraction else "test"

    def cut_points(self) -> tuple[int, int]:
        """Character offsets where val and test start in the concatenated text (contiguous mode)."""
        return (
            math.floor(self.chars * (1 - self.val_fraction - self.test_fraction)),
            math.floor(self.chars * (1 - self.test_fraction)),
        )

    def in_tokenizer_sample(self, doc_id: str, offset: int) -> bool:
        """Whether the train chunk at character ``offset`` of a document is in the tokenizer's sample:
        a seeded hash of both, so the sample is fixed and spread evenly over the split."""
        if self.tokenizer_share >= 1:
            return True
        return _uniform(f"{self.seed}\0tokenizer\0{doc_id}\0{offset}") < self.tokenizer_share


def _make_plan(source: CorpusSource, settings: dict, progress: Progress) -> _Plan:
    plan = _Plan("documents", settings["seed"], settings["val_fraction"], settings["test_fraction"])
    task = progress.add_task("reading", total=None)
    for doc_id, text in source.documents():
        split = plan.document_split(doc_id)
        size = len(text.encode("utf-8"))
        plan.documents += 1
        plan.chars += len(text)
        plan.bytes += size
        plan.docs_per_split[split] += 1
        plan.bytes_per_split[split] += size
        progress.advance(task, size)
    progress.remove_task(task)

    fractions = dict(zip(SPLITS, (1 - plan.val_fraction - plan.test_fraction, plan.val_fraction, plan.test_fraction)))
    empty = [s for s in SPLITS if fractions[s] > 0 and plan.docs_per_split[s] == 0]
    if settings["split"] == "documents" and empty:
        raise DataError(
            f"split=documents leaves the {empty[0]} split without documents ({plan.documents} in total); "
            "use data.split=contiguous, or a corpus with more documents"
        )
    if settings["split"] == "contiguous" or empty:
        plan.mode = "contiguous"
        plan.train_bytes = round(plan.bytes * fractions["train"])
    else:
        plan.train_bytes = plan.bytes_per_split["train"]
    budget = settings["tokenizer_train_bytes"]
    if budget is not None and plan.train_bytes > budget:
        plan.tokenizer_share = budget / plan.train_bytes
    return plan


def _next_line(text: str, pos: int) -> int:
    """``pos`` moved just past the next newline when one is near, else ``pos``."""
    newline = text.find("\n", pos, pos + LINE_SEARCH_CHARS)
    return pos if newline < 0 else newline + 1


def _pieces(source: CorpusSource, plan: _Plan) -> Iterator[tuple[str, str, str, int, int, bool]]:
    """Yield ``(split, doc_id, text, start, end, ends_document)``: ranges of document text per split."""
    if plan.mode == "documents":
        for doc_id, text in source.documents():
            yield plan.document_split(doc_id), doc_id, text, 0, len(text), True
        return
    cuts = plan.cut_points()
    offset = 0
    for doc_id, text in source.documents():
        n = len(text)
        bounds = [0]
        for cut in cuts:
            local = min(max(cut - offset, 0), n)
            bounds.append(max(bounds[-1], _next_line(text, local) if 0 < local < n else local))
        bounds.append(n)
        for split, start, end in zip(SPLITS, bounds, bounds[1:]):
            if start < end:
                yield split, doc_id, text, start, end, end == n
        offset += n


def _cut(text: str, start: int, limit: int) -> int:
    """The end of a chunk of ``text`` from ``start`` to at most ``limit``: the last newline (else space)
    that follows a non-space character. Every tokenizer splits words there, so the chunks give the
    same tokens as the whole text; only a stretch of ``CHUNK_CHARS`` without one is cut at ``limit``."""
    for separator in ("\n", " "):
        pos = text.rfind(separator, start + 1, limit + 1)
        while pos > start:
            if not text[pos - 1].isspace():
                return pos
            pos = text.rfind(separator, start + 1, pos)
    return limit


def _chunks(text: str, start: int, end: int) -> Iterator[str]:
    """``text[start:end]`` in chunks of at most :data:`CHUNK_CHARS` characters (see :func:`_cut`)."""
    while end - start > CHUNK_CHARS:
        cut = _cut(text, start, start + CHUNK_CHARS)
        yield text[start:cut]
        start = cut
    yield text[start:end]


def _train_texts(source: CorpusSource, plan: _Plan, progress: Progress) -> Iterator[str]:
    """The tokenizer's training text: the train split, or its sample (see :meth:`_Plan.in_tokenizer_sample`),
    in chunks (see :func:`_chunks`)."""
    task = progress.add_task("training tokenizer", total=plan.train_bytes)
    for split, doc_id, text, start, end, _ in _pieces(source, plan):
        if split != "train":
            continue
        offset = start
        for chunk in _chunks(text, start, end):
            size = len(chunk.encode("utf-8"))
            progress.advance(task, size)
            if plan.in_tokenizer_sample(doc_id, offset):
                plan.tokenizer_sample_bytes += size
                yield chunk
            offset += len(chunk)
    progress.remove_task(task)


def _encode(
    source: CorpusSource, plan: _Plan, tokenizer: Tokenizer, directory: Path, dtype: np.dtype, progress: Progress
) -> dict:
    """Encode every split into ``<split>.bin``; return per-split token, document and byte counts."""
    eot = eot_id(tokenizer)
    stats = {split: {"tokens": 0, "documents": 0, "bytes": 0} for split in SPLITS}
    files = {split: open(directory / f"{split}.bin", "wb") for split in SPLITS}
    task = progress.add_task("encoding", total=plan.bytes)
    batch: list[str] = []
    labels: list[tuple[str, bool]] = []  # (split, append EOT) of each text in the batch
    batch_bytes = 0

    def flush() -> None:
        nonlocal batch_bytes
        arrays: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
        for (split, ends), ids in zip(labels, encode_documents(tokenizer, batch)):
            arrays[split].append(np.array(ids, dtype=dtype))
            if ends:
                arrays[split].append(np.array([eot], dtype=dtype))
        for split, parts in arrays.items():
            if parts:
                tokens = np.concatenate(parts)
                tokens.tofile(files[split])
                stats[split]["tokens"] += len(tokens)
        progress.advance(task, batch_bytes)
        batch.clear()
        labels.clear()
        batch_bytes = 0

    try:
        for split, _, text, start, end, ends in _pieces(source, plan):
            stats[split]["documents"] += 1
            chunks = list(_chunks(text, start, end))
            for i, chunk in enumerate(chunks):
                size = len(chunk.encode("utf-8"))
                stats[split]["bytes"] += size
                batch.append(chunk)
                labels.append((split, ends and i == len(chunks) - 1))
                batch_bytes += size
                if batch_bytes >= BATCH_BYTES:
                    flush()
        if batch:
            flush()
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
    finally:
        for f in files.values():
            f.close()
    progress.remove_task(task)
    return stats


def _fsync_dir(path: Path) -> None:
    if os.name == "posix":
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _build(source: CorpusSource, settings: dict, final: Path, tokenizer_json: str | None) -> CachedCorpus:
    """Build the cache in a temporary sibling directory and rename it to ``final``. Call with the lock held."""
    started = time.perf_counter()
    for stale in final.parent.glob(f"{final.name}.tmp-*"):  # left over by a crashed build
        shutil.rmtree(stale, ignore_errors=True)
    if final.exists():
        log.warning("rebuilding the incomplete token cache at %s", final)
        shutil.rmtree(final)
    log.info("building token cache at %s from %s", final, source.describe())
    tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=final.parent))
    console = Console(stderr=True)
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not console.is_terminal,
        transient=True,
    )
    try:
        with progress:
            plan = _make_plan(source, settings, progress)
            kind = settings["tokenizer"]
            if tokenizer_json:
                tokenizer = Tokenizer.from_str(tokenizer_json)
            else:
                if plan.tokenizer_share < 1:
                    log.info(
                        "training the BPE tokenizer on a sample of about %s of the %s train bytes "
                        "(data.tokenizer_train_bytes)",
                        f"{settings['tokenizer_train_bytes']:,}",
                        f"{plan.train_bytes:,}",
                    )
                texts = _train_texts(source, plan, progress) if kind != "bytes" else iter(())
                tokenizer = train_tokenizer(kind, texts, settings["vocab_size"])
            save_tokenizer(tokenizer, tmp / "tokenizer.json")
            dtype = token_dtype(tokenizer.get_vocab_size())
            stats = _encode(source, plan, tokenizer, tmp, dtype, progress)
        meta = {
            "cache_version": CACHE_VERSION,
            "tokenizer": kind,
            "tokenizer_json_sha256": settings["tokenizer_json_sha256"],
            "requested_vocab_size": settings["vocab_size"],
            "tokenizer_train_bytes": settings["tokenizer_train_bytes"],
            "tokenizer_sample_bytes": plan.tokenizer_sample_bytes,  # what the trainer saw (0: not trained)
            "vocab_size": tokenizer.get_vocab_size(),
            "eot_id": eot_id(tokenizer),
            "dtype": dtype.name,
            "split": {
                "mode": plan.mode,
                "val_fraction": plan.val_fraction,
                "test_fraction": plan.test_fraction,
                "seed": plan.seed,
            },
            "splits": stats,
            "documents": plan.documents,
            "bytes": plan.bytes,
            "source": {"name": source.name, "description": source.describe(), "fingerprint": settings["fingerprint"]},
            "built_at": datetime.now(timezone.utc).isoformat(),
            "build_seconds": round(time.perf_counter() - started, 3),
        }
        with open(tmp / "meta.json", "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        os.rename(tmp, final)
        _fsync_dir(final.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info(
        "built token cache at %s in %.1f s: %d documents, %s bytes, split by %s; tokens: %s; "
        "%s tokenizer with %d tokens",
        final,
        meta["build_seconds"],
        plan.documents,
        f"{plan.bytes:,}",
        plan.mode,
        ", ".join(f"{split} {info['tokens']:,}" for split, info in stats.items()),
        kind,
        meta["vocab_size"],
    )
    return CachedCorpus(final, tokenizer, meta, built=True)
