"""Runs whose ``paths.log_dir`` is an fsspec URL (``s3://bucket/logs``, ``gs://``, ``file://``, ``memory://``).

Hydra, the loggers and the checkpoint writers write local files, and a checkpoint must be
written whole before anyone reads it. So such a run is written to a local staging copy of the
log directory (:func:`staging_dir`, under ``$XDG_CACHE_HOME/lmforge/logs``, default
``~/.cache``), and rank 0 mirrors its run directory to the URL with :class:`RunDirMirror`: from
a background thread every ``paths.sync_every_seconds``, and once more when the run ends, so
that a preempted machine has lost at most that interval. Only files that changed since the last
upload go up; the hidden temporary files of checkpoints being written never do.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import threading
from pathlib import Path

import fsspec

from lmforge.data.sources import is_url

log = logging.getLogger("lmforge.mirror")
TEMPORARY_FILE = re.compile(r"^\..+\.tmp$")  # lmforge.training.safety.atomic_write's partial files


def staging_dir(url: str) -> Path:
    """The local folder that stands for the log directory at ``url`` (the same one on every call)."""
    scheme, _, rest = url.partition("://")
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "lmforge" / "logs" / scheme / rest.strip("/")


def local_log_dir(log_dir: str) -> Path:
    """``paths.log_dir`` as a local folder: itself, or its staging copy when it is a URL."""
    return staging_dir(log_dir) if is_url(log_dir) else Path(log_dir)


def remote_run_dir(log_dir: str, run_dir: Path, task_name: str) -> str:
    """The URL of ``run_dir`` under the remote ``log_dir``: its place under the staging copy, or
    ``<log_dir>/<task_name>/runs/<its name>`` for a run directory chosen elsewhere (tests, notebooks)."""
    try:
        relative = run_dir.resolve().relative_to(staging_dir(log_dir).resolve()).as_posix()
    except ValueError:
        relative = f"{task_name}/runs/{run_dir.name}"
    return f"{log_dir.rstrip('/')}/{relative}"


class RunDirMirror:
    """Keeps a copy of a local run directory at an fsspec URL (see the module docstring)."""

    def __init__(self, local: Path, url: str, every_seconds: float) -> None:
        self.local, self.url, self.every_seconds = Path(local), url.rstrip("/"), every_seconds
        self.fs, self._root = fsspec.core.url_to_fs(self.url)
        self._uploaded: dict[Path, tuple[int, int]] = {}  # file -> (size, mtime_ns) last uploaded
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> RunDirMirror:
        """Upload in the background from now on, and at exit if :meth:`close` is never reached."""
        if self.every_seconds > 0:
            self._thread = threading.Thread(target=self._run, name="lmforge-mirror", daemon=True)
            self._thread.start()
        atexit.register(self.close)
        return self

    def sync(self) -> int:
        """Upload the files that are new or changed since the last sync; returns how many."""
        with self._lock:
            uploaded = 0
            for path in sorted(p for p in self.local.rglob("*") if p.is_file() and not TEMPORARY_FILE.match(p.name)):
                stat = path.stat()
                signature = (stat.st_size, stat.st_mtime_ns)
                if self._uploaded.get(path) == signature:
                    continue
                target = f"{self._root}/{path.relative_to(self.local).as_posix()}"
                self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
                self.fs.put_file(str(path), target)
                self._uploaded[path] = signature
                uploaded += 1
            return uploaded

    def close(self) -> None:
        """Stop the background uploads and upload what is left (idempotent)."""
        atexit.unregister(self.close)
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.sync()

    def _run(self) -> None:
        while not self._stop.wait(self.every_seconds):
            try:
                self.sync()
            except Exception as exc:  # a store that is briefly unreachable: the next sync retries
                log.warning("could not upload the run directory to %s (%s); retrying", self.url, exc)
