"""Corpora streamed from LitData chunks (``data=streaming``; extra ``lmforge[stream]``).

``lmforge prepare data=streaming data.chunks_dir=<folder or s3:// / gs:// URI> data.path=<corpus>``
tokenizes the corpus into the local token cache once, then writes each split with LitData's
``optimize`` as chunks of consecutive tokens (``TokensLoader``), plus the tokenizer and the split
sizes. Training then needs only the chunks: ``lmforge train data=streaming data.chunks_dir=<same>``
on any machine. Each split is read through a LitData ``StreamingDataset`` (remote chunks are
downloaded on first use into a local chunk cache of at most ``max_cache_size``) and served by
:class:`ChunkedTokens`, which slices like the memory-mapped token cache. So the training windows
are the ones of :class:`~lmforge.data.windows.TrainWindows`, a pure function of the seed, the
rank and the micro-batch index: the token stream equals the memmap cache's, it is sharded over
ranks and DataLoader workers the same way, and a run resumes exactly from its step alone (no
loader state to save: LitData's shuffle state would replace that guarantee, not add to it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import signal
from pathlib import Path

import fsspec
import numpy as np
import torch
from litdata import StreamingDataset, TokensLoader, optimize
from tokenizers import Tokenizer

from lmforge.data.cache import CachedCorpus
from lmforge.data.datamodule import LMDataModule
from lmforge.data.sources import CorpusSource, TextFilesSource, is_url
from lmforge.errors import DataError

log = logging.getLogger("lmforge.data")

META_FILE = "lmforge-chunks.json"  # written last: its presence marks complete chunks
TOKENIZER_FILE = "tokenizer.json"
# Tokens per LitData item. A window of block_size + 1 tokens spans ceil((block_size + 1) / ITEM_TOKENS) + 1
# items at most; small items waste little of each read, large ones cost fewer lookups.
ITEM_TOKENS = 2048


def text_files_or_none(path: str | list[str] | None) -> CorpusSource | None:
    """The corpus the chunks are written from: text files at ``path``, or None when the chunks exist."""
    return None if path is None else TextFilesSource(path)


def _piece(spec: tuple[str, str, int, int, int, int]) -> torch.Tensor:
    """Tokens ``start:stop`` of a cache file, zero-padded to ``padded`` tokens (LitData ``optimize`` worker)."""
    filename, dtype, count, start, stop, padded = spec
    tokens = np.memmap(filename, dtype=np.dtype(dtype), mode="r", shape=(count,))[start:stop]
    piece = np.zeros(padded, dtype=np.int32 if tokens.dtype == np.uint32 else tokens.dtype)
    piece[: stop - start] = tokens
    return torch.from_numpy(piece)


def write_token_chunks(corpus: CachedCorpus, chunks_dir: str, chunk_tokens: int) -> None:
    """Write every non-empty split of ``corpus`` to ``<chunks_dir>/<split>/`` as LitData token chunks of
    ``chunk_tokens`` tokens, then the tokenizer and the metadata (last, so a crash leaves no half set)."""
    if chunk_tokens % ITEM_TOKENS:
        raise DataError(f"data.chunk_tokens={chunk_tokens} must be a multiple of {ITEM_TOKENS}")
    splits = {}
    for split, count in corpus.token_counts.items():
        if count == 0:
            continue
        filename, dtype = str(corpus.path / f"{split}.bin"), corpus.dtype.str
        pieces = []
        for start in range(0, count, chunk_tokens):
            stop = min(start + chunk_tokens, count)
            padded = -(-(stop - start) // ITEM_TOKENS) * ITEM_TOKENS  # the last item filled up with zeros
            pieces.append((filename, dtype, count, start, stop, padded))
        # LitData's optimize installs a SIGINT handler that exits with status 0 and never puts the
        # previous one back; restore it, or a later Ctrl-C would end the run silently as a success.
        sigint_handler = signal.getsignal(signal.SIGINT)
        try:
            optimize(
                fn=_piece,
                inputs=pieces,
                output_dir=f"{chunks_dir.rstrip('/')}/{split}",
                chunk_size=chunk_tokens,
                item_loader=TokensLoader(),
                num_workers=1,
                reorder_files=False,
                start_method="fork",  # a spawned worker would import torch again (seconds); it only copies tokens
                mode="overwrite",
                verbose=False,
            )
        finally:
            signal.signal(signal.SIGINT, sigint_handler)
        splits[split] = count
    meta = {"splits": splits, "vocab_size": corpus.vocab_size, "item_tokens": ITEM_TOKENS}
    with fsspec.open(f"{chunks_dir.rstrip('/')}/{TOKENIZER_FILE}", "w") as handle:
        handle.write(corpus.tokenizer.to_str())
    with fsspec.open(f"{chunks_dir.rstrip('/')}/{META_FILE}", "w") as handle:
        json.dump(meta, handle)


def read_chunks_meta(chunks_dir: str) -> dict | None:
    """The metadata of complete chunks at ``chunks_dir``, None when there are none."""
    try:
        with fsspec.open(f"{chunks_dir.rstrip('/')}/{META_FILE}", "r") as handle:
            return json.load(handle)
    except FileNotFoundError:
        return None


class ChunkedTokens:
    """A split's token ids in LitData chunks, sliced as the memory-mapped cache is (``tokens[a:b]``,
    ``tokens[index_array]``, ``len``), so the window datasets serve either unchanged."""

    def __init__(self, url: str, length: int, cache_dir: str | None, max_cache_size: str) -> None:
        self.url, self.length, self.cache_dir, self.max_cache_size = url, length, cache_dir, max_cache_size
        self._dataset: StreamingDataset | None = None

    def __getstate__(self) -> dict:  # DataLoader workers open their own reader
        return {**self.__dict__, "_dataset": None}

    def __len__(self) -> int:
        return self.length

    @property
    def dataset(self) -> StreamingDataset:
        if self._dataset is None:
            self._dataset = StreamingDataset(
                self.url,
                item_loader=TokensLoader(block_size=ITEM_TOKENS),
                cache_dir=self.cache_dir,
                max_cache_size=self.max_cache_size,
            )
        return self._dataset

    def _span(self, start: int, stop: int) -> np.ndarray:
        first, last = start // ITEM_TOKENS, (stop - 1) // ITEM_TOKENS
        items = [self.dataset[i].numpy() for i in range(first, last + 1)]
        joined = items[0] if len(items) == 1 else np.concatenate(items)
        return joined[start - first * ITEM_TOKENS : stop - first * ITEM_TOKENS]

    def __getitem__(self, index: slice | np.ndarray) -> np.ndarray:
        if isinstance(index, slice):
            start, stop, step = index.indices(self.length)
            return self._span(start, stop)[::step] if stop > start else np.empty(0, np.int64)
        # An array of windows (rows of consecutive positions), as _TokenWindows indexes.
        rows = np.atleast_2d(index)
        windows = np.stack([self._span(int(row[0]), int(row[-1]) + 1) for row in rows])
        return windows.reshape(index.shape)


class ChunkedCorpus(CachedCorpus):
    """LitData chunks written by :func:`write_token_chunks`, read as a token cache."""

    def __init__(self, chunks_dir: str, meta: dict, tokenizer: Tokenizer, cache_dir: str | None, max_cache_size: str):
        super().__init__(path=Path(chunks_dir) if not is_url(chunks_dir) else Path(), tokenizer=tokenizer, meta=meta)
        self.url, self.cache_dir, self.max_cache_size = chunks_dir.rstrip("/"), cache_dir, max_cache_size

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.int64)

    @property
    def token_counts(self) -> dict[str, int]:
        return {"train": 0, "val": 0, "test": 0, **self.meta["splits"]}

    def tokens(self, split: str) -> ChunkedTokens | np.ndarray:
        count = self.token_counts[split]
        if count == 0:
            return np.empty(0, np.int64)
        cache = None if self.cache_dir is None else f"{self.cache_dir}/{split}"
        return ChunkedTokens(f"{self.url}/{split}", count, cache, self.max_cache_size)


class StreamingDataModule(LMDataModule):
    """:class:`~lmforge.data.datamodule.LMDataModule` whose token cache is LitData chunks at ``chunks_dir``.

    When the chunks are missing and a ``source`` is given, the corpus is tokenized into the local
    token cache (every ``LMDataModule`` setting applies) and written as chunks of ``chunk_tokens``
    tokens; existing chunks are never rewritten (use a new ``chunks_dir`` for another corpus). Remote
    chunks are kept in ``<cache_dir>/chunks-<hash of the URL>/`` up to ``max_cache_size``.
    """

    def __init__(
        self,
        chunks_dir: str,
        source: CorpusSource | None = None,
        chunk_tokens: int = 64 * ITEM_TOKENS,  # 128 Ki tokens
        max_cache_size: str = "50GB",
        **settings,
    ) -> None:
        super().__init__(source=source, **settings)
        if not chunks_dir:
            raise DataError("data.chunks_dir is empty; set it to a folder or a bucket URI (s3://..., gs://...)")
        self.chunks_dir = chunks_dir if is_url(chunks_dir) else str(Path(chunks_dir).expanduser().absolute())
        self.chunk_tokens = chunk_tokens
        self.max_cache_size = max_cache_size

    def prepare_data(self) -> None:
        """Open the chunks, writing them first from the source when they are missing."""
        if self._corpus is not None:
            return
        meta = read_chunks_meta(self.chunks_dir)
        if meta is None:
            if self.source is None:
                raise DataError(
                    f"no LitData chunks at data.chunks_dir={self.chunks_dir}; write them once with "
                    f"`lmforge prepare data=streaming data.chunks_dir={self.chunks_dir} data.path=<corpus>`"
                )
            super().prepare_data()
            log.info("writing the token cache %s as LitData chunks to %s", self._corpus.path, self.chunks_dir)
            write_token_chunks(self._corpus, self.chunks_dir, self.chunk_tokens)
            meta = read_chunks_meta(self.chunks_dir)
        with fsspec.open(f"{self.chunks_dir}/{TOKENIZER_FILE}", "r") as handle:
            tokenizer_json = handle.read()
        if self.tokenizer_json_override and self.tokenizer_json_override != tokenizer_json:
            raise DataError(
                f"the chunks at {self.chunks_dir} were tokenized with another tokenizer than this run's "
                "(e.g. the checkpoint's); write chunks with this tokenizer to a new data.chunks_dir"
            )
        cache_dir = None
        if is_url(self.chunks_dir):
            cache_dir = str(self.cache_dir / f"chunks-{hashlib.sha256(self.chunks_dir.encode()).hexdigest()[:16]}")
        # LMDataModule serves the val split as test when test_fraction is 0: so where no test chunks were written.
        self.test_fraction = 1.0 if meta["splits"].get("test") else 0.0
        self._corpus = ChunkedCorpus(
            self.chunks_dir, meta, Tokenizer.from_str(tokenizer_json), cache_dir, self.max_cache_size
        )

    @property
    def cache_path(self) -> Path:
        """Where the chunks are (a local path, or the URL as a path)."""
        return Path(self.chunks_dir)
