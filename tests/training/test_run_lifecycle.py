"""The run lifecycle both loops share (lmforge.training.run): checkpoints either loop reads, `ckpt_path=last`,
the logging rule, the CPU bf16 probe and the debug modes."""

from __future__ import annotations

import pytest
import torch
from helpers import DEFAULT_MODEL, TINY_MODEL, compose_config, tiny_train_overrides

import lmforge.training.precision as precision
from lmforge.cli.eval import evaluate
from lmforge.cli.generate import generate
from lmforge.cli.train import train
from lmforge.errors import CheckpointError, PrecisionError, reported_errors
from lmforge.fabric.loop import fit  # [fabric]
from lmforge.models import LSTMLanguageModel  # [lstm]
from lmforge.training.checkpoint import read_network
from lmforge.training.run import check_run, is_logging_step

TINY_LOOP = ["trainer.max_steps=7", "trainer.val_check_interval=7", "trainer.log_every_n_steps=5", "test=false"]


# [fabric]
def fabric_overrides(corpus_dir, *extra: str) -> list[str]:
    """A tiny Fabric run: the Trainer's tiny overrides without the Trainer-only callback settings."""
    base = [o for o in tiny_train_overrides(corpus_dir, DEFAULT_MODEL) if not o.startswith("callbacks.")]
    return [*base, "throughput.window_size=3", *extra]


# [/fabric]
def test_logging_rule():
    assert [s for s in range(1, 13) if is_logging_step(s, 5, 12)] == [5, 10, 12]
    assert [s for s in range(1, 4) if is_logging_step(s, 0, 3)] == [3]  # logging off: the last step still counts


# [fabric]
def test_each_loop_reads_the_others_checkpoints(tmp_path, corpus_dir):
    """eval and generate take either loop's checkpoint; exact resume stays with the loop that wrote it."""
    train(compose_config("train", tiny_train_overrides(corpus_dir, DEFAULT_MODEL, *TINY_LOOP), tmp_path / "t"))
    fabric_metrics = fit(compose_config("fabric", fabric_overrides(corpus_dir, *TINY_LOOP), tmp_path / "f"))
    trainer_checkpoint = tmp_path / "t" / "run" / "checkpoints" / "last.ckpt"
    fabric_checkpoint = tmp_path / "f" / "run" / "checkpoints" / "step000007.ckpt"

    for path, loop in ((trainer_checkpoint, "train"), (fabric_checkpoint, "fabric")):
        network = read_network(path)
        assert network.loop == loop and network.net_config["n_embd"] == 32
        eval_cfg = compose_config("eval", [f"ckpt_path={path}", "trainer.accelerator=cpu"], tmp_path / f"e-{loop}")
        metrics = evaluate(eval_cfg)
        assert set(metrics) == {"val/loss", "val/ppl", "test/loss", "test/ppl"}
        if loop == "fabric":  # the same weights on the same fixed windows: the loop's own final val/loss
            assert metrics["val/loss"] == pytest.approx(fabric_metrics["val/loss"], abs=1e-5)
        generate_cfg = compose_config("generate", [f"ckpt_path={path}", "max_new_tokens=5"], tmp_path / f"g-{loop}")
        assert generate(generate_cfg)[0].startswith("\n")

    resume = tiny_train_overrides(corpus_dir, DEFAULT_MODEL, *TINY_LOOP, f"ckpt_path={fabric_checkpoint}")
    with pytest.raises(CheckpointError, match="was written by lmforge fabric, whose optimizer and loop state"):
        check_run(compose_config("train", resume, tmp_path / "t2"), "train")


# [/fabric]
def test_ckpt_path_last_never_resumes_another_experiment(tmp_path, corpus_dir):
    """`last` takes the newest checkpoint of the same task *with this run's model and data*."""
    logs = [f"paths.log_dir={tmp_path}/logs", f"paths.data_dir={tmp_path}/data"]
    runs = tmp_path / "logs" / "train" / "runs"  # where `lmforge train` puts its run directories
    experiment_a = tiny_train_overrides(corpus_dir, DEFAULT_MODEL, *TINY_LOOP, *logs)
    experiment_b = [*experiment_a, "data.batch_size=4"]  # same network and tokenizer, another token stream
    train(compose_config("train", experiment_a, runs / "a"))
    train(compose_config("train", experiment_b, runs / "b"))  # B's checkpoints are the newest

    resumed = check_run(compose_config("train", [*experiment_a, "ckpt_path=last"], tmp_path / "a2"), "train").resume
    assert resumed.path.startswith(str(runs / "a"))
    resumed = check_run(compose_config("train", [*experiment_b, "ckpt_path=last"], tmp_path / "b2"), "train").resume
    assert resumed.path.startswith(str(runs / "b"))

    experiment_c = [*experiment_a, "data.batch_size=2"]
    with pytest.raises(CheckpointError) as error:
        check_run(compose_config("train", [*experiment_c, "ckpt_path=last"], tmp_path / "c"), "train")
    message = str(error.value)
    assert "\n" not in message
    assert f"the newest, {runs / 'b'}" in message  # names the newest candidate
    assert "data.batch_size=4 in the checkpoint but 2 in the config" in message


# [lstm]
@pytest.mark.parametrize("works", [False, True])
def test_cpu_bf16_is_probed_per_model(works, tmp_path, corpus_dir, monkeypatch, capsys):
    """The LSTM's bf16 kernel is missing on some x86 CPUs: bf16 is refused up front in one line, decided by
    the probe's answer (forced here both ways), never by the CPU's name."""
    monkeypatch.setattr(precision, "cpu_bf16_error", lambda kernels, mode: None if works else "no primitive")
    with torch.device("meta"):
        lstm = LSTMLanguageModel(vocab_size=16, n_embd=8, hidden_size=8, n_layer=1)
    if works:
        assert precision.check_precision("bf16-mixed", "cpu", None, lstm) == "bf16-mixed"
        return
    overrides = tiny_train_overrides(corpus_dir, "lstm", "trainer.precision=bf16-mixed")
    with pytest.raises(SystemExit) as exit_info, reported_errors():
        train(compose_config("train", overrides, tmp_path))
    assert exit_info.value.code == 1
    line = capsys.readouterr().err.strip()
    assert line == (
        "error: trainer.precision=bf16-mixed cannot run LSTMLanguageModel on this CPU: its bfloat16 LSTM kernel "
        "fails here (no primitive); use trainer.precision=32-true"
    )
    assert not (tmp_path / "data").exists()  # refused before the data was prepared


# [/lstm]
@pytest.mark.parametrize("model", list(TINY_MODEL))
def test_bf16_mixed_trains_or_is_refused_by_what_this_cpu_runs(model, tmp_path, corpus_dir):
    """On this machine's CPU, whatever it is: bf16-mixed either trains or fails up front with a PrecisionError."""
    overrides = tiny_train_overrides(corpus_dir, model, "trainer.precision=bf16-mixed", "debug=fdr")
    try:
        check_run(compose_config("train", overrides, tmp_path / "check"), "train")
    except PrecisionError as refused:
        assert "on this CPU" in str(refused) and "\n" not in str(refused)
        return
    metrics = train(compose_config("train", overrides, tmp_path / "run"))
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


# [fabric]
@pytest.mark.parametrize("debug", ["fdr", "profiler"])
def test_debug_modes_work_in_the_fabric_loop(debug, tmp_path, corpus_dir):
    short = ["trainer.max_steps=3", "trainer.val_check_interval=3", "scheduler.warmup_steps=1"]
    extra = short if debug == "profiler" else []
    metrics = fit(compose_config("fabric", fabric_overrides(corpus_dir, f"debug={debug}", *extra), tmp_path))
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))
    run = tmp_path / "run"
    if debug == "fdr":  # one step and one validation batch, nothing written
        assert not (run / "checkpoints").exists() and not (run / "tensorboard").exists()
    else:
        report = next(run.glob("*profile*.txt")).read_text()
        assert "training_step" in report and "validation" in report


# [/fabric]
