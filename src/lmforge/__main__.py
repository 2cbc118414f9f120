"""``python -m lmforge <command> [overrides]``: the same as the ``lmforge`` command."""

from lmforge.cli import main

main()
