"""The ``lmforge`` command: ``lmforge <command> [hydra overrides]``."""

from __future__ import annotations

import runpy
import sys

COMMANDS = {
    "train": ("lmforge.train", "train a model (then test the best checkpoint)"),
    "fabric": ("lmforge.fabric_train", "train a model with the Fabric loop (src/lmforge/fabric_train.py)"),  # [fabric]
    "eval": ("lmforge.eval", "val/test loss and perplexity of a checkpoint: ckpt_path=..."),
    "generate": ("lmforge.generate", "sample text from a checkpoint: ckpt_path=... prompt=..."),
    "prepare": ("lmforge.prepare", "tokenize the corpus into the token cache only"),
    "consolidate": ("lmforge.consolidate", "one checkpoint file from a sharded (trainer=fsdp) one: ckpt_path=<dir>"),
}

USAGE = "usage: lmforge <command> [hydra overrides] [--help]\n\ncommands:\n" + "\n".join(
    f"  {name:<12} {help_text}" for name, (_, help_text) in COMMANDS.items()
)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0 if len(sys.argv) >= 2 else 2)
    command = sys.argv[1]
    if command not in COMMANDS:
        print(f"lmforge: unknown command {command!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    sys.argv = [sys.argv[0], *sys.argv[2:]]
    # Run the command as `python -m lmforge.<command>` would, so that launchers which
    # re-run the script for other ranks (Lightning's DDP) start the same command.
    runpy.run_module(COMMANDS[command][0], run_name="__main__", alter_sys=True)
