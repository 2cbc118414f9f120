"""Corpus sources: where the raw text comes from.

A source yields ``(doc_id, text)`` documents in a deterministic order, one at a time, and has a
cheap :meth:`CorpusSource.fingerprint` (file names, sizes and modification times plus the
source's parameters) that keys the token cache: when the fingerprint changes, the cache is rebuilt.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import posixpath
import re
import sysconfig
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import SimpleNamespace

import fsspec
from filelock import FileLock

from lmforge.errors import DataError

log = logging.getLogger("lmforge.data")


class CorpusSource(ABC):
    """A corpus: a deterministic stream of ``(doc_id, text)`` documents."""

    name: str = "corpus"
    """Short name used in the token cache directory name."""

    @abstractmethod
    def documents(self) -> Iterator[tuple[str, str]]:
        """Yield ``(doc_id, text)`` pairs in a deterministic order, one document in memory at a time."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A SHA-256 hex digest that changes whenever the documents may have changed."""

    @abstractmethod
    def describe(self) -> str:
        """A one-line description for logs."""


def _fingerprint(params: dict, files: Iterable[tuple[str, Path | RemoteFile]]) -> str:
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    for label, path in files:
        stat = path.stat()
        digest.update(f"{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def is_url(path: str) -> bool:
    """Whether ``path`` is an fsspec URL (``s3://bucket/x``, ``gs://``, ``hf://``, ``memory://``, ``file://``)."""
    return "://" in path


@dataclass(frozen=True)
class RemoteFile:
    """A file behind an fsspec URL, with what a corpus reads of a local :class:`Path`: its bytes and a
    stat whose size and modification marker (a time or an ETag, as the store reports it) key the cache."""

    fs: fsspec.AbstractFileSystem
    path: str

    def read_bytes(self) -> bytes:
        return self.fs.cat_file(self.path)

    def stat(self) -> SimpleNamespace:
        info = self.fs.info(self.path)
        marker = next((info[k] for k in ("mtime", "LastModified", "updated", "ETag", "created") if k in info), "")
        return SimpleNamespace(st_size=info.get("size", 0), st_mtime_ns=str(marker))


def _read_text(path: Path | RemoteFile) -> str | None:
    """The file's text, or None when it is binary (has NUL bytes) or not valid UTF-8."""
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class _FileListSource(CorpusSource):
    """A source made of a list of text files; skips binary and non-UTF-8 files with one warning."""

    _warned_skips = False

    @abstractmethod
    def files(self) -> list[tuple[str, Path]]:
        """The ``(doc_id, path)`` pairs of the corpus, in order."""

    def documents(self) -> Iterator[tuple[str, str]]:
        skipped: list[str] = []
        yielded = 0
        for doc_id, path in self.files():
            text = _read_text(path)
            if text is None:
                skipped.append(doc_id)
            elif text:
                yielded += 1
                yield doc_id, text
        if yielded == 0:
            raise DataError(
                f"{self.describe()}: no usable text (every file is empty, binary or not UTF-8); "
                "point data.path at UTF-8 text files"
            )
        if skipped and not self._warned_skips:
            self._warned_skips = True
            examples = ", ".join(skipped[:3]) + (", ..." if len(skipped) > 3 else "")
            log.warning("skipped %d binary or non-UTF-8 file(s): %s", len(skipped), examples)


class StdlibSource(_FileListSource):
    """The ``.py`` files of the running interpreter's standard library (always available offline).

    Test suites (``test``/``tests``/``idle_test`` directories), the generated codec tables in
    ``encodings``, ``site-packages`` and caches are
    excluded. Files are visited in the order of the SHA-256 of their relative path (a fixed
    pseudo-random order, so the selection mixes all modules) and each is taken if it still fits
    in ``max_bytes``; the selected files are then yielded sorted by relative path.
    """

    name = "stdlib"
    # ``encodings`` holds generated codec tables (hex literals), which teach a model little.
    EXCLUDED_DIRS = frozenset(
        {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "encodings"}
    )

    def __init__(self, max_bytes: int = 8_000_000) -> None:
        if max_bytes < 1:
            raise DataError(f"max_bytes={max_bytes} must be >= 1; set data.source.max_bytes")
        self.max_bytes = max_bytes
        self.root = Path(sysconfig.get_paths()["stdlib"])

    def files(self) -> list[tuple[str, Path]]:
        candidates = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if d not in self.EXCLUDED_DIRS and not d.startswith(".")]
            for filename in filenames:
                if filename.endswith(".py"):
                    path = Path(dirpath, filename)
                    candidates.append((path.relative_to(self.root).as_posix(), path))
        if not candidates:
            raise DataError(f"found no standard library .py files under {self.root}; use data=text_files")
        selected, total = [], 0
        for rel, path in sorted(candidates, key=lambda c: hashlib.sha256(c[0].encode()).digest()):
            size = path.stat().st_size
            if total + size <= self.max_bytes:
                selected.append((rel, path))
                total += size
        return sorted(selected)

    def fingerprint(self) -> str:
        return _fingerprint({"source": self.name, "root": str(self.root), "max_bytes": self.max_bytes}, self.files())

    def describe(self) -> str:
        return f"Python standard library at {self.root} (max {self.max_bytes:,} bytes)"


class TextFilesSource(_FileListSource):
    """Your own UTF-8 text: files, directories (recursive) and glob patterns (``**`` allowed), local or
    behind fsspec URLs (``s3://``, ``gs://``, ``hf://``, ``file://``...; the store's fsspec package,
    e.g. ``s3fs``, installed).

    Relative paths are resolved against the working directory at construction. Directory walks
    and globs skip hidden files and keep only ``extensions`` (e.g. ``[".txt", ".md"]``) when given;
    files named explicitly are always used. Document ids are paths relative to the deepest folder
    that holds every entry (the directory given, a glob's fixed prefix, a file's folder), so the
    seeded document split does not depend on the working directory or on where the corpus lives.
    """

    name = "text_files"

    def __init__(self, path: str | Sequence[str], extensions: Sequence[str] | None = None) -> None:
        paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
        if not paths:
            raise DataError("data.path is empty; set it to a text file, a directory or a glob pattern")
        self.paths = [str(p) if is_url(str(p)) else os.path.expanduser(str(p)) for p in paths]
        self.extensions = None if extensions is None else {"." + e.lower().lstrip(".") for e in extensions}
        self.base = Path.cwd()

    def _wanted(self, path: Path) -> bool:
        return self.extensions is None or path.suffix.lower() in self.extensions

    def _remote_files(self, entry: str) -> list[tuple[str, RemoteFile]]:
        """The files of an fsspec URL (a file, a folder or a glob), named relative to its folder or fixed prefix."""
        wanted = "" if self.extensions is None else f" {'/'.join(sorted(self.extensions))}"
        fs, path = fsspec.core.url_to_fs(entry)
        if any(ch in path for ch in "*?["):
            root = path[: min(path.find(ch) for ch in "*?[" if ch in path)].rsplit("/", 1)[0]
            matches = [m for m in sorted(fs.glob(path)) if fs.isfile(m)]
        elif fs.isdir(path):
            root = path.rstrip("/")
            matches = sorted(fs.find(path))
        elif fs.isfile(path):
            root, matches = posixpath.dirname(path), [path]
        else:
            raise DataError(f"the data path {entry} does not exist; fix data.path")
        files = [
            (posixpath.relpath(m, root), RemoteFile(fs, m))
            for m in matches
            if self._wanted(PurePosixPath(m)) and not _hidden(PurePosixPath(posixpath.relpath(m, root)))
        ]
        if not files:
            raise DataError(f"{entry} holds no{wanted} files; fix data.path")
        return files

    def _expand(self, entry: str) -> list[Path]:
        full = self.base / entry
        wanted = "" if self.extensions is None else f" {'/'.join(sorted(self.extensions))}"
        if any(ch in entry for ch in "*?["):
            matches = [Path(p) for p in sorted(glob.glob(str(full), recursive=True))]
            matches = [p for p in matches if p.is_file() and self._wanted(p)]
            if not matches:
                raise DataError(f"the pattern {entry!r} matches no{wanted} files; fix data.path")
            return matches
        if full.is_dir():
            matches = [
                p
                for p in sorted(full.rglob("*"))
                if p.is_file() and self._wanted(p) and not _hidden(p.relative_to(full))
            ]
            if not matches:
                raise DataError(f"the directory {entry} contains no{wanted} files; add text files or fix data.path")
            return matches
        if full.is_file():
            return [full]
        raise DataError(f"the data path {entry} does not exist (resolved to {full}); fix data.path")

    def _root(self, entry: str) -> Path:
        """The folder an entry's documents are named relative to."""
        full = self.base / entry
        if any(ch in entry for ch in "*?["):
            fixed = []
            for part in full.parts:
                if any(ch in part for ch in "*?["):
                    break
                fixed.append(part)
            return Path(*fixed)
        return full if full.is_dir() else full.parent

    def files(self) -> list[tuple[str, Path | RemoteFile]]:
        local = [entry for entry in self.paths if not is_url(entry)]
        files: list[tuple[str, Path | RemoteFile]] = []
        if local:
            unique = {path.absolute(): None for entry in local for path in self._expand(entry)}
            root = os.path.commonpath([self._root(entry).absolute() for entry in local])
            files += [(os.path.relpath(path, root), path) for path in unique]
        for entry in self.paths:
            if is_url(entry):
                files += self._remote_files(entry)
        if all(path.stat().st_size == 0 for _, path in files):
            raise DataError(f"all {len(files)} file(s) of data.path {self.paths} are empty (0 bytes); add text to them")
        return files

    def fingerprint(self) -> str:
        files = [(str(path), path) for _, path in self.files()]
        return _fingerprint({"source": self.name, "extensions": sorted(self.extensions or [])}, files)

    def describe(self) -> str:
        return f"text files {', '.join(self.paths)}"


class DownloadedTextSource(CorpusSource):
    """A single UTF-8 text file downloaded once from ``url`` (``http(s)://`` or ``file://``).

    The file is saved as ``cache_dir/filename`` (written to a temporary file, checked against
    ``sha256`` when given, then renamed into place) and reused afterwards, its hash re-checked.
    """

    def __init__(
        self, url: str, sha256: str | None = None, filename: str | None = None, cache_dir: str = "data/downloads"
    ) -> None:
        self.url = url
        self.sha256 = sha256.lower() if sha256 else None
        filename = filename or os.path.basename(urllib.parse.urlparse(url).path) or "download.txt"
        self.path = Path(cache_dir, filename).absolute()
        self.name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(filename).stem) or "download"

    def local_path(self) -> Path:
        """The path of the verified local copy, downloading it first if needed."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock = FileLock(f"{self.path}.lock")
            lock.acquire()
        except OSError as exc:
            raise DataError(
                f"cannot write the download to {self.path.parent}: {exc}; "
                "set data.source.cache_dir to a writable directory"
            ) from exc
        try:
            if not self.path.exists():
                self._download()
            elif got := self._mismatch(self.path):
                raise DataError(
                    f"{self.path} has SHA-256 {got}, expected {self.sha256}; delete it to download it again"
                )
        finally:
            lock.release()
        return self.path

    def _mismatch(self, path: Path | str) -> str | None:
        """The SHA-256 of ``path`` when it differs from the expected one, else None."""
        if self.sha256 is None:
            return None
        got = _sha256_file(path)
        return got if got != self.sha256 else None

    def _download(self) -> None:
        log.info("downloading %s to %s", self.url, self.path)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f"{self.path.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out:
                try:
                    with urllib.request.urlopen(self.url, timeout=60) as response:
                        while chunk := response.read(1 << 20):
                            out.write(chunk)
                except (OSError, ValueError) as exc:  # URLError, HTTPError, timeouts, malformed URLs
                    reason = exc.reason if type(exc) is urllib.error.URLError else exc
                    raise DataError(
                        f"could not download {self.url} ({reason}); download it by hand and save it as "
                        f"{self.path}, or use data=text_files data.path=<file>"
                    ) from exc
            if got := self._mismatch(tmp):
                raise DataError(
                    f"the download of {self.url} has SHA-256 {got}, expected {self.sha256}; "
                    "check data.source.url and data.source.sha256"
                )
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def documents(self) -> Iterator[tuple[str, str]]:
        path = self.local_path()
        text = _read_text(path)
        if text is None:
            raise DataError(f"{path} is binary or not UTF-8 text; check data.source.url")
        if not text:
            raise DataError(f"{path} is empty; delete it and check data.source.url")
        yield path.name, text

    def fingerprint(self) -> str:
        path = self.local_path()
        return _fingerprint({"source": "download", "url": self.url, "sha256": self.sha256}, [(path.name, path)])

    def describe(self) -> str:
        return f"{self.url} (saved as {self.path})"
