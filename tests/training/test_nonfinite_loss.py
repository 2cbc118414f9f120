"""The NaN/Inf loss policy: stop before the update (with the last good checkpoint named) or skip it."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    DEFAULT_MODEL,
    SHORT_RUN,
    assert_one_clear_error,
    compose_config,
    reported,
    tiny_train_overrides,
)

from lmforge.cli.train import train
from lmforge.errors import ConfigError
from lmforge.lightning.callbacks import NonFiniteLossGuard
from lmforge.lightning.module import LMModule
from lmforge.training.checkpoint import read_checkpoint


def test_nonfinite_loss_stops_before_the_update_or_skips_it(corpus_dir, tmp_path, monkeypatch, capsys):
    original = LMModule.training_step

    def nan_at_step_3(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        return loss * float("nan") if self.global_step == 3 else loss

    monkeypatch.setattr(LMModule, "training_step", nan_at_step_3)
    every_step = [*SHORT_RUN, "callbacks.periodic_checkpoint.every_n_train_steps=1"]

    stop = compose_config("train", tiny_train_overrides(corpus_dir, DEFAULT_MODEL, *every_step), tmp_path / "stop")
    code, stderr = reported(train, stop, capsys)
    checkpoints = tmp_path / "stop" / "run" / "checkpoints"
    assert_one_clear_error(code, stderr, "the training loss is NaN or infinite at step 3")
    assert f"the last good checkpoint is {checkpoints / 'periodic-step000003.ckpt'}" in stderr
    assert sorted(p.name for p in checkpoints.glob("*.ckpt"))[-1] == "periodic-step000003.ckpt"
    last_good = read_checkpoint(checkpoints / "periodic-step000003.ckpt")
    assert all(torch.isfinite(t).all() for t in last_good["state_dict"].values())

    skip = compose_config(
        "train",
        tiny_train_overrides(corpus_dir, DEFAULT_MODEL, *every_step, "callbacks.nonfinite_loss.action=skip"),
        tmp_path / "skip",
    )
    train(skip)
    checkpoints = tmp_path / "skip" / "run" / "checkpoints"
    before, after = (read_checkpoint(checkpoints / f"periodic-step{step:06d}.ckpt") for step in (3, 4))
    for name, tensor in before["state_dict"].items():  # step 3's update was skipped ...
        assert torch.equal(after["state_dict"][name], tensor), name
    final = read_checkpoint(checkpoints / "last.ckpt")  # ... and training went on from good weights
    assert final["global_step"] == 6
    assert all(torch.isfinite(t).all() for t in final["state_dict"].values())
    guard_state = next(v for k, v in final["callbacks"].items() if k.startswith("NonFiniteLossGuard"))
    assert guard_state == {"skipped_steps": 1}
    with pytest.raises(ConfigError, match="must be one of stop, skip"):
        NonFiniteLossGuard(action="ignore")
