"""One run directory per launch, agreed by every process of a distributed run.

Every process of a distributed launch composes the config itself and would take its run
directory from its own clock. The ``lmforge_run_dir`` resolver (hydra.run.dir and
hydra.sweep.dir) makes them agree: rank 0 picks the time-stamped directory and hands it over,
through the environment to the processes it starts itself (Lightning's relaunch of the script
for the other local ranks, which under ``-m`` runs the whole sweep again in step with rank 0),
and through a small file under the parent directory to the ranks of an external launcher
(torchrun, ``fabric run``, srun, one Lightning launch per node). The resolvers are registered
by :mod:`lmforge.training.config`.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import re
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from lmforge.training.mirror import local_log_dir

# (torchrun, ``fabric run``, srun, one Lightning launch per node).

# How long ranks > 0 wait for rank 0's hand-over file; older files are left-overs of killed runs.
RUN_DIR_WAIT_SECONDS = 60.0
_IMPORTED_AT = time.time()
LABEL_CHARS = 120  # of the overrides in a run directory's name; file systems allow 255 bytes
_RUN_DIRS_ENV = "LMFORGE_RUN_DIRS"
# The environment as the process started: Lightning's launcher later sets MASTER_PORT & co. in
# rank 0 for the processes it starts itself, which are not an external launch.
_START_ENV = dict(os.environ)


def _env_rank(name: str) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() else 0


def launcher_rank() -> int | None:
    """The global rank an external launcher gave this process (torchrun's RANK, srun's SLURM_PROCID), else None."""
    if "RANK" in os.environ:
        return _env_rank("RANK")
    if "SLURM_STEP_ID" in os.environ and "SLURM_PROCID" in os.environ:
        return _env_rank("SLURM_PROCID")
    return None


def is_rank_zero_process() -> bool:
    """False in a process started as another rank than 0 (by torchrun, srun, or Lightning's launcher)."""
    return not (launcher_rank() or _env_rank("LOCAL_RANK") or _env_rank("NODE_RANK"))


def _launch_key() -> str | None:
    """An id that the processes of an external launch share and no other launch has; None outside one."""
    env = _START_ENV
    if "MASTER_ADDR" in env and "MASTER_PORT" in env:
        names = ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT")
    elif "SLURM_JOB_ID" in env and "SLURM_STEP_ID" in env:
        names = ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_RESTART_COUNT")
    else:
        return None
    return hashlib.sha1("|".join(env.get(name, "") for name in names).encode()).hexdigest()[:16]


def _handover_file(parent: str, key: str) -> Path:
    return Path(parent) / f".lmforge-run-dir-{key}"


def _publish(parent: str, run_dir: str) -> None:
    """Rank 0: hand ``run_dir`` to the processes it starts and to the other ranks of its launch."""
    published = json.loads(os.environ.get(_RUN_DIRS_ENV, "{}"))
    if published.get("pid") != os.getpid():
        published = {"pid": os.getpid(), "dirs": {}}
    published["dirs"][parent] = run_dir
    os.environ[_RUN_DIRS_ENV] = json.dumps(published)
    key = _launch_key()
    if key is None:
        return
    handover = _handover_file(parent, key)
    handover.parent.mkdir(parents=True, exist_ok=True)
    partial = handover.with_name(f"{handover.name}.{os.getpid()}.tmp")
    partial.write_text(run_dir)
    partial.replace(handover)  # readers never see a half-written file
    atexit.register(handover.unlink, missing_ok=True)  # the other ranks read it at start-up


def _received(parent: str) -> str | None:
    """Ranks > 0: rank 0's run directory, from the parent process or the launch's hand-over file."""
    inherited = json.loads(os.environ.get(_RUN_DIRS_ENV, "{}"))
    if inherited.get("pid") == os.getppid() and parent in inherited["dirs"]:
        return inherited["dirs"][parent]
    key = _launch_key()
    if key is None:
        return None
    handover = _handover_file(parent, key)
    deadline = time.monotonic() + RUN_DIR_WAIT_SECONDS
    while time.monotonic() < deadline:
        fresh = handover.is_file() and handover.stat().st_mtime > _IMPORTED_AT - RUN_DIR_WAIT_SECONDS
        if fresh and (run_dir := handover.read_text()):
            return run_dir
        time.sleep(0.05)
    print(
        f"warning: rank {launcher_rank()} found no run directory from rank 0 in {handover} after "
        f"{RUN_DIR_WAIT_SECONDS:.0f} s (is paths.log_dir on a shared filesystem?); using its own",
        file=sys.stderr,
    )
    return None


def run_label(overrides: str) -> str:
    """A folder-name suffix that says what a run is: its command-line overrides (Hydra's
    ``override_dirname``) as ``key-value`` parts joined by ``__``, a path value shortened to its last
    part; whole parts up to :data:`LABEL_CHARS` characters, then ``+N`` for the N left out
    (``.hydra/overrides.yaml`` has them all). Only letters, digits and ``._+-`` remain, none of which
    Hydra reads specially, so the folder can be passed back as ``ckpt_path=<folder>``."""
    parts = []
    for override in filter(None, overrides.split(",")):
        key, _, value = override.partition("=")
        value = value.rstrip("/").rsplit("/", 1)[-1]
        parts.append(re.sub(r"[^A-Za-z0-9._+-]", "", f"{key}-{value}"))
    kept: list[str] = []
    for part in parts:
        if len("__".join([*kept, part])) > LABEL_CHARS:
            kept.append(f"+{len(parts) - len(kept)}")
            break
        kept.append(part)
    return "_" + "__".join(kept) if kept else ""


def shared_run_dir(parent: str, overrides: str = "") -> str:
    """``<parent>/<start time>_<overrides>`` (see :func:`run_label`), the same in every process of a
    launch (resolver ``lmforge_run_dir``)."""
    parent = str(local_log_dir(parent))  # a URL's staging copy: lmforge.training.mirror uploads the run
    if not is_rank_zero_process() and (run_dir := _received(parent)):
        return run_dir
    run_dir = f"{parent}/{datetime.now():%Y-%m-%d_%H-%M-%S-%f}{run_label(overrides)}"
    if is_rank_zero_process():
        _publish(parent, run_dir)
    return run_dir


def rank_zero_only_value(value: Any) -> Any:
    """``value`` in the rank-0 process, None in the others (resolver ``lmforge_rank_zero_only``)."""
    return value if is_rank_zero_process() else None


def rank_suffix() -> str:
    """``""`` in rank 0, else ``_rank<N>``: keeps the ranks' log files apart (resolver ``lmforge_rank_suffix``)."""
    rank = launcher_rank()
    return f"_rank{rank}" if rank else ""


# Resolver name -> function; cached per config, as Hydra's `now`: the run and job configs resolve the
# same directory.
RESOLVERS = {
    "lmforge_run_dir": shared_run_dir,
    "lmforge_rank_zero_only": rank_zero_only_value,
    "lmforge_rank_suffix": rank_suffix,
}
