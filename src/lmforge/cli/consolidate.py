"""``lmforge consolidate ckpt_path=<dir> [out=<file>]``: one checkpoint file from a sharded one.

FSDP2 (``trainer=fsdp``, or ``trainer.strategy=fsdp`` in ``lmforge fabric``) saves each
checkpoint as a directory with one shard per rank. This gathers the weights and the run's
metadata into a single file of the same loop's layout, which ``lmforge eval``/``generate`` and
``torch.load(weights_only=True)`` read on any machine. The optimizer state is left out: resume
sharded training from the directory itself. ``eval`` and ``generate`` also accept the directory
and gather it in memory each time.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from lmforge.cli.arguments import parse_key_values
from lmforge.errors import CheckpointError, reported_errors
from lmforge.training.checkpoint import is_sharded_checkpoint, read_network, resolve_checkpoint, single_file_checkpoint
from lmforge.training.config import project_root

USAGE = (
    "usage: lmforge consolidate ckpt_path=<sharded checkpoint dir | run dir | last> [out=<file>] [paths.log_dir=<dir>]"
)


def default_output(ckpt_dir: Path) -> Path:
    """``<name>.consolidated.pt`` next to ``<name>.ckpt/``.

    Not ``*.ckpt``: ``ckpt_path=last`` keeps resuming from the shards, which hold the optimizer state.
    """
    return ckpt_dir.with_suffix(".consolidated.pt")


def consolidate(ckpt_path: str, out: str | None = None, log_dir: str | None = None) -> Path:
    """Write the sharded checkpoint ``ckpt_path`` as one file and return its path.

    ``ckpt_path`` is a sharded directory, a run directory (its newest checkpoint) or ``last``
    (the newest checkpoint under ``log_dir``, by default ``<project>/logs``).
    """
    path = Path(resolve_checkpoint(ckpt_path, log_dir or Path(project_root()) / "logs"))
    if not is_sharded_checkpoint(path):
        raise CheckpointError(
            f"{path} is not a sharded checkpoint directory (no .metadata inside); a single-file checkpoint "
            "needs no consolidation: pass it to lmforge eval/generate as it is"
        )
    target = Path(out) if out else default_output(path)
    if target.exists():
        raise CheckpointError(f"{target} already exists; pass another out=<file>, or delete it first")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    torch.save(single_file_checkpoint(read_network(path), merge_adapters=True), partial)
    partial.replace(target)  # never a half-written file under the final name
    return target


def main() -> None:
    if any(arg in ("-h", "--help") for arg in sys.argv[1:]):
        print(USAGE)
        return
    known = {"ckpt_path": "ckpt_path", "out": "out", "paths.log_dir": "log_dir"}
    options = parse_key_values("consolidate", sys.argv[1:], known, USAGE)
    with reported_errors():
        target = consolidate(**options)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
