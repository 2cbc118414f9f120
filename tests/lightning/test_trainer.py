"""Training with the Lightning Trainer: fast dev runs, overfitting, exact resume, TensorBoard."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    DEFAULT_MODEL,
    TINY_MODEL,
    compose_config,
    read_csv_metric,
    tensorboard_cards_and_hparams,
    tiny_train_overrides,
)
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lmforge.cli.train import train
from lmforge.lightning.callbacks import ProgressBar


@pytest.mark.parametrize("model", list(TINY_MODEL))
def test_fast_dev_run(model, tmp_path, corpus_dir):
    cfg = compose_config("train", tiny_train_overrides(corpus_dir, model, "debug=fdr"), tmp_path)
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


@pytest.mark.parametrize("model", list(TINY_MODEL))
def test_overfit_drives_loss_down(model, tmp_path, corpus_dir):
    # data.split=contiguous: the same batches in every session (the default split assigns documents by
    # a hash of their path, which here includes the number of pytest's tmp dir).
    overrides = tiny_train_overrides(
        corpus_dir,
        model,
        "debug=overfit",
        "logger=csv",
        "trainer.log_every_n_steps=1",
        "trainer.max_steps=100",
        "optimizer.lr=3e-3",
        "model.n_embd=64",
        "data.split=contiguous",
    )
    # [lstm]
    # Slower to learn these batches: 0.37 of the first loss after 100 steps, 0.05 after 200 (and 0.26 to
    # 0.42 after 100 steps with the default split, depending on the tmp dir).
    if model == "lstm":
        overrides += ["model.hidden_size=64", "model.dropout=0.0", "optimizer.lr=1e-2", "trainer.max_steps=200"]
    # [/lstm]
    cfg = compose_config("train", overrides, tmp_path)
    train(cfg)
    losses = read_csv_metric(tmp_path / "run", "train/loss")
    first, last = losses[min(losses)], losses[max(losses)]
    assert last < 0.4 * first, (first, last)


def test_resume_continues_exactly(tmp_path, corpus_dir):
    """A run resumed from its step-6 checkpoint matches the uninterrupted run step by step."""
    common = [
        "logger=csv",
        "trainer.log_every_n_steps=1",
        "trainer.max_steps=12",
        "callbacks.periodic_checkpoint.every_n_train_steps=6",
        "callbacks.periodic_checkpoint.save_top_k=-1",
        "test=false",
    ]
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    train(compose_config("train", tiny_train_overrides(corpus_dir, DEFAULT_MODEL, *common), full_dir))
    step6 = full_dir / "run" / "checkpoints" / "periodic-step000006.ckpt"
    assert step6.exists()
    train(
        compose_config(
            "train", tiny_train_overrides(corpus_dir, DEFAULT_MODEL, *common, f"ckpt_path={step6}"), resumed_dir
        )
    )

    full = read_csv_metric(full_dir / "run", "train/loss")
    resumed = read_csv_metric(resumed_dir / "run", "train/loss")
    assert sorted(resumed) == list(range(6, 12))
    for step in range(6, 12):
        assert resumed[step] == pytest.approx(full[step], abs=1e-6), step
    lr_full = read_csv_metric(full_dir / "run", "lr-AdamW/decay")
    lr_resumed = read_csv_metric(resumed_dir / "run", "lr-AdamW/decay")
    for step in lr_resumed:
        assert lr_resumed[step] == pytest.approx(lr_full[step])

    weights_full = torch.load(full_dir / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    weights_resumed = torch.load(resumed_dir / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert weights_resumed["global_step"] == weights_full["global_step"] == 12
    for name, tensor in weights_full["state_dict"].items():
        torch.testing.assert_close(weights_resumed["state_dict"][name], tensor, rtol=0, atol=1e-6)


def test_tensorboard_events_hold_scalars_samples_and_hparams(tmp_path, corpus_dir, monkeypatch):
    bar_reads = []  # (stage, step) of each time the progress bar collects the logged values
    get_metrics = ProgressBar.get_metrics

    def recording_get_metrics(self, trainer, pl_module):
        bar_reads.append((trainer.state.stage, trainer.global_step))
        return get_metrics(self, trainer, pl_module)

    monkeypatch.setattr(ProgressBar, "get_metrics", recording_get_metrics)
    cfg = compose_config("train", tiny_train_overrides(corpus_dir, DEFAULT_MODEL), tmp_path)
    train(cfg)
    # The bar re-reads the values after the steps that log them (every 2 of 12), not after every
    # step, and once more when training ends.
    assert sorted(step for stage, step in bar_reads if stage == "train") == [*range(2, 13, 2), 12]
    accumulator = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"tensors": 0})
    accumulator.Reload()
    scalars = set(accumulator.Tags()["scalars"])
    expected = {
        "loss/train",
        "loss/val",
        "loss/test",
        "perplexity/val",
        "perplexity/test",
        "train/grad_norm",
        "train/tokens",
        "train/lr-AdamW/decay",
        "train/device/items_per_sec",
    }
    assert expected <= scalars, expected - scalars
    assert "epoch" not in scalars  # a flat line on an endless stream, TensorBoard's first card otherwise
    # Every logged value belongs to the step it is logged at (every trainer.log_every_n_steps=2 steps).
    tokens_per_step = 8 * 32  # data.batch_size x data.block_size
    tokens = {event.step: event.value for event in accumulator.Scalars("train/tokens")}
    assert tokens == {step: (step + 1) * tokens_per_step for step in range(1, 12, 2)}
    assert sorted(event.step for event in accumulator.Scalars("loss/train")) == list(range(1, 12, 2))
    val_loss = accumulator.Scalars("loss/val")[-1].value
    val_ppl = accumulator.Scalars("perplexity/val")[-1].value
    assert val_ppl == pytest.approx(torch.tensor(val_loss).exp().item(), rel=1e-4)
    assert [event.step for event in accumulator.Scalars("loss/val")] == [5, 11]  # no stray point from HParams
    assert "samples/text_summary" in accumulator.Tags()["tensors"]
    sample = accumulator.Tensors("samples/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert sample.strip()
    # TensorBoard lays out its cards by tag group in alphabetical order: loss, then perplexity, first.
    # The HParams tab: the run's hyperparameters, with the validation loss and perplexity as its metrics.
    groups, hparams, metrics = tensorboard_cards_and_hparams(tmp_path / "run" / "tensorboard")
    assert groups[:2] == ["loss", "perplexity"], groups
    assert {"model/n_layer", "data/block_size", "optimizer/lr", "scheduler/warmup_steps"} <= set(hparams)
    assert metrics == ["loss/val", "perplexity/val"]
