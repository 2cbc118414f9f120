"""A corpus from Hugging Face ``datasets`` (``data=hf_dataset``; the extra ``lmforge[datasets]``).

The dataset is a Hub name (``data.path=roneneldan/TinyStories``) or a loader with local or remote
files (``data.path=json data.source.data_files=...``: ``json``, ``csv``, ``parquet``, ``text``);
each row's ``text_column`` is a document. ``streaming=true`` reads the rows as they arrive instead
of downloading and converting the whole dataset first: the token cache then holds only what the
run reads, and memory stays flat.

This module imports ``datasets``, so it is only imported through the config's ``_target_``.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import datasets

from lmforge.data.sources import CorpusSource
from lmforge.errors import DataError

log = logging.getLogger("lmforge.data")


class HFDatasetSource(CorpusSource):
    """Documents from ``datasets.load_dataset(path, name, data_files=..., split=..., streaming=...)``.

    ``revision`` pins a Hub dataset to a commit: the token cache is keyed by the parameters (and
    the local files' sizes and times), not by the Hub's contents, so an unpinned Hub dataset that
    changes upstream keeps its cached tokens until ``revision`` or another setting changes.
    ``max_documents`` stops after that many rows (e.g. a sample of a huge streamed corpus).
    """

    name = "hf-dataset"

    def __init__(
        self,
        path: str,
        name: str | None = None,
        data_files: str | list[str] | dict | None = None,
        split: str = "train",
        text_column: str = "text",
        streaming: bool = False,
        revision: str | None = None,
        max_documents: int | None = None,
    ) -> None:
        if max_documents is not None and max_documents < 1:
            raise DataError(f"data.source.max_documents={max_documents} must be >= 1 or null")
        self.path = path
        self.config_name = name
        self.data_files = data_files
        self.split = split
        self.text_column = text_column
        self.streaming = streaming
        self.revision = revision
        self.max_documents = max_documents

    def _load(self) -> datasets.Dataset | datasets.IterableDataset:
        for pattern in self._named_files():
            if "://" not in pattern and not glob.glob(pattern):
                raise DataError(f"data.source.data_files: {pattern} matches no file")
        try:
            return datasets.load_dataset(
                self.path,
                self.config_name,
                data_files=self.data_files,
                split=self.split,
                streaming=self.streaming,
                revision=self.revision,
            )
        except (FileNotFoundError, ValueError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataError(
                f"cannot load the dataset {self.path!r} (split {self.split!r}): {first_line}; check data.path "
                "(a Hub name, or a loader such as json with data.source.data_files) and data.source.split"
            ) from exc

    def documents(self) -> Iterator[tuple[str, str]]:
        dataset = self._load()
        columns = dataset.column_names
        if columns is not None and self.text_column not in columns:
            raise DataError(
                f"the dataset {self.path!r} has no column {self.text_column!r}; set data.source.text_column "
                f"to one of {', '.join(columns)}"
            )
        skipped = yielded = 0
        for index, row in enumerate(dataset):
            if self.max_documents is not None and index >= self.max_documents:
                break
            text = row.get(self.text_column)
            if not isinstance(text, str) or not text:
                skipped += 1
                continue
            yielded += 1
            yield f"{self.split}/{index}", text
        if not yielded:
            raise DataError(
                f"no row of the dataset {self.path!r} has text in column {self.text_column!r}; "
                "set data.source.text_column to the column that holds the documents"
            )
        if skipped:
            log.warning("skipped %d rows of %s without text in column %r", skipped, self.path, self.text_column)

    def fingerprint(self) -> str:
        params = {
            "path": self.path,
            "name": self.config_name,
            "data_files": self.data_files,
            "split": self.split,
            "text_column": self.text_column,
            "revision": self.revision,
            "max_documents": self.max_documents,
        }
        digest = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode())
        for file in sorted(self._local_files()):
            stat = file.stat()
            digest.update(f"{file}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()

    def _named_files(self) -> list[str]:
        """``data_files`` as a flat list of names and patterns."""
        named = self.data_files
        if isinstance(named, dict):
            return [str(f) for files in named.values() for f in ([files] if isinstance(files, str) else files)]
        if isinstance(named, str):
            return [named]
        return [str(f) for f in named or []]

    def _local_files(self) -> list[Path]:
        """The local files the dataset reads (their sizes and times key the cache)."""
        candidates = [Path(match) for f in self._named_files() for match in glob.glob(f)]
        candidates.append(Path(self.path))
        files: list[Path] = []
        for candidate in candidates:
            if candidate.is_file():
                files.append(candidate.resolve())
            elif candidate.is_dir():
                files += [p.resolve() for p in candidate.rglob("*") if p.is_file() and ".git" not in p.parts]
        return files

    def describe(self) -> str:
        mode = "streamed" if self.streaming else "downloaded"
        return f"Hugging Face dataset {self.path} ({self.split}, column {self.text_column!r}, {mode})"
