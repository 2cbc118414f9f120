"""``key=value`` arguments of the commands that need no Hydra config (``consolidate``, ``export``)."""

from __future__ import annotations

import sys


def parse_key_values(command: str, args: list[str], known: dict[str, str], usage: str) -> dict[str, str]:
    """Map each ``key=value`` of ``args`` to ``known[key]``; ``ckpt_path`` is required.

    A usage error exits with code 2."""
    parsed = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or key not in known or not value:
            print(f"lmforge {command}: cannot use {arg!r}\n{usage}", file=sys.stderr)
            sys.exit(2)
        parsed[known[key]] = value
    if "ckpt_path" not in parsed:
        print(f"lmforge {command}: ckpt_path is required\n{usage}", file=sys.stderr)
        sys.exit(2)
    return parsed
