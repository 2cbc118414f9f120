"""The real ``lmforge`` commands end to end: train, then eval and generate from its checkpoint."""

from __future__ import annotations

import pytest
from helpers import (
    DEFAULT_MODEL,
    run_cli,
    tiny_train_overrides,
)


@pytest.mark.slow
def test_cli_train_eval_generate(tmp_path, corpus_dir):
    paths = [f"paths.log_dir={tmp_path}/logs", f"paths.data_dir={tmp_path}/data"]
    trained = run_cli("train", *tiny_train_overrides(corpus_dir, DEFAULT_MODEL), *paths, "sample.prompt=def")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "val/loss" in trained.stdout and "sample" in trained.stdout
    runs = list((tmp_path / "logs" / "train" / "runs").iterdir())
    assert len(runs) == 1
    checkpoints = runs[0] / "checkpoints"
    assert (checkpoints / "last.ckpt").exists()
    best = [p for p in checkpoints.glob("step*.ckpt")]
    assert best, list(checkpoints.iterdir())
    assert list((runs[0] / "tensorboard").glob("events.out.tfevents.*"))

    evaluated = run_cli("eval", f"ckpt_path={best[0]}", "trainer.accelerator=cpu", *paths)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "val/ppl" in evaluated.stdout and "test/loss" in evaluated.stdout

    generated = run_cli("generate", "ckpt_path=last", 'prompt="def "', "max_new_tokens=20", "seed=3", *paths)
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert generated.stdout.startswith("def ")
    again = run_cli("generate", "ckpt_path=last", 'prompt="def "', "max_new_tokens=20", "seed=3", *paths)
    assert again.stdout == generated.stdout
