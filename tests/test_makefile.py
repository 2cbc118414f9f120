"""The Makefile's targets: services bind to localhost only."""

from __future__ import annotations

from helpers import (
    REPO_ROOT,
)


def test_tensorboard_binds_localhost():
    recipe = (REPO_ROOT / "Makefile").read_text().split("\ntensorboard:")[1].split("\n\n")[0]
    assert "--host 127.0.0.1" in recipe
