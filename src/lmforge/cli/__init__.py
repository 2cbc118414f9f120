"""The ``lmforge`` command: ``lmforge <command> [hydra overrides]``, one module of this package per command."""

from __future__ import annotations

import runpy
import sys

COMMANDS = {
    "train": ("lmforge.cli.train", "train a model with the Lightning Trainer (then test the best checkpoint)"),
    "fabric": ("lmforge.cli.fabric", "train a model with the Fabric loop (lmforge/fabric/loop.py)"),  # [fabric]
    "eval": ("lmforge.cli.eval", "val/test loss and perplexity of a checkpoint: ckpt_path=..."),
    "generate": ("lmforge.cli.generate", "sample text from a checkpoint: ckpt_path=... prompt=..."),
    "prepare": ("lmforge.cli.prepare", "tokenize the corpus into the token cache only"),
    "consolidate": ("lmforge.cli.consolidate", "one checkpoint file from a sharded (FSDP2) one: ckpt_path=<dir>"),
    "export": ("lmforge.cli.export", "a GPT as a Hugging Face model directory: ckpt_path=... out=<dir>"),  # [gpt]
}

USAGE = (
    "usage: lmforge <command> [hydra overrides] [--help]\n\ncommands:\n"
    + "\n".join(f"  {name:<12} {help_text}" for name, (_, help_text) in COMMANDS.items())
    + "\n\n`lmforge <command> --help` shows the command's config groups and options."
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
    # Run the command as `python -m lmforge.cli.<command>` would, so that launchers which
    # re-run the script for other ranks (Lightning's DDP) start the same command.
    runpy.run_module(COMMANDS[command][0], run_name="__main__", alter_sys=True)
