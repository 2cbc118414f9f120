"""What a user sees: the first screen of a run shows lmforge's own lines, not third-party chatter."""

from __future__ import annotations

import pytest
from helpers import DEFAULT_MODEL, run_cli, tiny_train_overrides

from lmforge.training.console import LIGHTNING_CHATTER


@pytest.mark.slow
def test_first_screen_shows_lmforge_lines_only(tmp_path, corpus_dir):
    overrides = tiny_train_overrides(corpus_dir, DEFAULT_MODEL, "trainer.max_steps=2", "trainer.val_check_interval=2")
    result = run_cli("train", *overrides, f"paths.log_dir={tmp_path}/logs", f"paths.data_dir={tmp_path}/data")
    assert result.returncode == 0, result.stderr[-3000:]
    screen = result.stdout + result.stderr
    assert "model: " in screen and "MFLOPs per token" in screen  # lmforge's own summary line
    for chatter in (*LIGHTNING_CHATTER, "LeafSpec", "FLOPs │"):
        assert chatter not in screen, chatter
    assert "reusing token cache" not in screen  # built once, not announced again by each stage
