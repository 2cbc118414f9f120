"""The Fabric loop: config, `lmforge fabric` and `fabric run` launches, exact resume, parity with the Trainer."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    DEFAULT_MODEL,
    FINE_TUNING_EXPERIMENTS,  # [gpt]
    REPO_ROOT,
    SHORT_FINE_TUNING,  # [gpt]
    compose_config,
    free_port,
    read_csv_metric,
    run_cli,
    scalars,
    tensorboard_cards_and_hparams,
    tiny_sft_overrides,
    tiny_train_overrides,
    write_task_data,
)

import lmforge.fabric.loop
from lmforge.cli.train import train
from lmforge.errors import CheckpointError, NonFiniteLossError
from lmforge.fabric.loop import LoopSettings, build_fabric, fit
from lmforge.training.checkpoint import read_network
from lmforge.training.run import check_run

# The tiny run of the Trainer tests, less the settings that only the Trainer has.
TRAINER_ONLY = ("callbacks.", "trainer.accelerator=")


def tiny_fabric_overrides(corpus: Path, *extra: str) -> list[str]:
    base = [o for o in tiny_train_overrides(corpus) if not o.startswith(TRAINER_ONLY)]
    return [*base, "trainer.accelerator=cpu", "throughput.window_size=3", *extra]


def run_dirs(log_dir: Path) -> list[Path]:
    return sorted((log_dir / "fabric" / "runs").iterdir())


def test_config_composes_with_shared_groups(tmp_path, corpus_dir):
    cfg = compose_config("fabric", ["trainer.max_steps=77", "scheduler=constant"], tmp_path)
    assert cfg.scheduler.max_steps == 77  # `${trainer.max_steps}` resolves to the loop's setting
    assert cfg.scheduler.decay == "constant" and cfg.optimizer._target_ == "lmforge.training.optim.adamw"
    assert LoopSettings.from_config(cfg.trainer).max_steps == 77
    assert set(cfg.trainer) >= {"accelerator", "devices", "num_nodes", "strategy", "precision"}

    # [gpt]
    experiment = compose_config("fabric", ["experiment=shakespeare_char", f"data.path={corpus_dir}"], tmp_path)
    assert experiment.trainer.max_steps == experiment.scheduler.max_steps == 2000
    # [/gpt]
    assert LoopSettings.from_config(compose_config("fabric", ["debug=overfit"], tmp_path).trainer).max_steps == 100


@pytest.mark.parametrize(
    "bad,message",
    [
        ("+trainer.detect_anomaly=true", "trainer.detect_anomaly is a Lightning Trainer setting"),
        ("trainer.accumulate_grad_batches=0", "must be an integer >= 1"),
        ("trainer.gradient_clip_val=0", "must be > 0, or null"),
    ],
)
def test_bad_loop_settings_are_refused_in_one_line(bad, message, tmp_path):
    cfg = compose_config("fabric", [bad], tmp_path)
    with pytest.raises(ValueError, match=message):
        LoopSettings.from_config(cfg.trainer)


@pytest.mark.slow
def test_cli_refuses_a_trainer_only_setting_in_one_line(tmp_path):
    result = run_cli("fabric", "+trainer.detect_anomaly=true", f"paths.log_dir={tmp_path}/logs")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "error: trainer.detect_anomaly is a Lightning Trainer setting the Fabric loop does not have; remove it"
        )
    )
    assert not list((tmp_path / "logs").rglob("*.ckpt"))  # refused before any training


def test_resume_continues_exactly(tmp_path, corpus_dir):
    """Resumed from its step-6 checkpoint, a run with gradient accumulation matches the uninterrupted one."""
    common = [
        "trainer.max_steps=12",
        "trainer.accumulate_grad_batches=2",
        "trainer.log_every_n_steps=1",
        "trainer.checkpoint_every_n_steps=6",
        "trainer.val_check_interval=6",
        "test=false",
    ]
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    fit(compose_config("fabric", tiny_fabric_overrides(corpus_dir, *common), full_dir))
    step6 = full_dir / "run" / "checkpoints" / "step000006.ckpt"
    assert step6.exists()
    fit(compose_config("fabric", tiny_fabric_overrides(corpus_dir, *common, f"ckpt_path={step6}"), resumed_dir))

    full, resumed = scalars(full_dir / "run" / "tensorboard"), scalars(resumed_dir / "run" / "tensorboard")
    assert sorted(resumed["train/loss"]) == list(range(6, 12))
    for step in range(6, 12):
        assert resumed["train/loss"][step] == pytest.approx(full["train/loss"][step], abs=1e-6), step
        assert resumed["lr"][step] == pytest.approx(full["lr"][step])
    assert resumed["val/loss"][12] == pytest.approx(full["val/loss"][12], abs=1e-6)

    final_full = torch.load(full_dir / "run" / "checkpoints" / "step000012.ckpt", weights_only=True)
    final_resumed = torch.load(resumed_dir / "run" / "checkpoints" / "step000012.ckpt", weights_only=True)
    assert final_full["step"] == final_resumed["step"] == 12
    assert final_resumed["scheduler"]["last_epoch"] == 12
    for name, tensor in final_full["model"].items():
        torch.testing.assert_close(final_resumed["model"][name], tensor, rtol=0, atol=1e-6)


def test_resume_continues_exactly_on_task_data(tmp_path):
    """Task batches (data=sft) resume exactly too: their order and loss weights depend on the step alone."""
    task_file = write_task_data(tmp_path / "qa.jsonl")
    resumable = [
        "trainer.max_steps=8",
        "trainer.accumulate_grad_batches=2",
        "trainer.log_every_n_steps=1",
        "test=false",
    ]
    base = [o for o in tiny_sft_overrides(task_file, DEFAULT_MODEL, *resumable) if not o.startswith(TRAINER_ONLY)]
    common = [*base, "trainer.accelerator=cpu", "trainer.checkpoint_every_n_steps=4", "trainer.val_check_interval=4"]
    fit(compose_config("fabric", common, tmp_path / "full"))
    step4 = tmp_path / "full" / "run" / "checkpoints" / "step000004.ckpt"
    fit(compose_config("fabric", [*common, f"ckpt_path={step4}"], tmp_path / "resumed"))
    full, resumed = (scalars(tmp_path / d / "run" / "tensorboard") for d in ("full", "resumed"))
    assert sorted(resumed["train/loss"]) == list(range(4, 8))
    for step in range(4, 8):
        assert resumed["train/loss"][step] == pytest.approx(full["train/loss"][step], abs=1e-6), step
    assert resumed["val/loss"][8] == pytest.approx(full["val/loss"][8], abs=1e-6)


def test_first_loss_matches_the_trainer(tmp_path, corpus_dir):
    """Same seed, same initial weights and first batch: the Trainer and Fabric paths share model and data code."""
    one_step = [
        "trainer.max_steps=1",
        "trainer.log_every_n_steps=1",
        "trainer.val_check_interval=1",
        "scheduler.warmup_steps=0",
        "test=false",
    ]
    trainer_overrides = tiny_train_overrides(corpus_dir, DEFAULT_MODEL, *one_step, "logger=csv")
    train(compose_config("train", trainer_overrides, tmp_path / "t"))
    fit(compose_config("fabric", tiny_fabric_overrides(corpus_dir, *one_step), tmp_path / "f"))
    trainer_loss = read_csv_metric(tmp_path / "t" / "run", "train/loss")[0]
    fabric_loss = scalars(tmp_path / "f" / "run" / "tensorboard")["train/loss"][0]
    assert fabric_loss == pytest.approx(trainer_loss, abs=1e-5)

    # Exact resume needs the loop's own optimizer and loop state: the Fabric loop refuses the Trainer's.
    trainer_checkpoint = tmp_path / "t" / "run" / "checkpoints" / "last.ckpt"
    resume = tiny_fabric_overrides(corpus_dir, *one_step, f"ckpt_path={trainer_checkpoint}")
    with pytest.raises(CheckpointError, match="was written by lmforge train, whose optimizer and loop state"):
        fit(compose_config("fabric", resume, tmp_path / "f2"))


def test_run_under_a_url_log_dir_is_mirrored_there(tmp_path, corpus_dir, monkeypatch):
    """The Fabric loop shares the run lifecycle: under paths.log_dir=<URL> its run directory is uploaded."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    bucket = tmp_path / "bucket"
    overrides = tiny_fabric_overrides(corpus_dir, "trainer.max_steps=4", "test=false", f"paths.log_dir=file://{bucket}")
    fit(compose_config("fabric", overrides, tmp_path / "local"))
    local, uploaded = tmp_path / "local" / "run", bucket / "fabric" / "runs" / "run"
    assert sorted(p.relative_to(uploaded) for p in uploaded.rglob("*") if p.is_file()) == sorted(
        p.relative_to(local) for p in local.rglob("*") if p.is_file()
    )
    final = local / "checkpoints" / "step000004.ckpt"
    assert (uploaded / "checkpoints" / "step000004.ckpt").read_bytes() == final.read_bytes()


@pytest.mark.slow
def test_cli_trains_validates_logs_and_checkpoints(tmp_path, corpus_dir):
    logs = tmp_path / "logs"
    overrides = tiny_fabric_overrides(corpus_dir, "trainer.checkpoint_every_n_steps=6", "throughput.peak_flops=1e11")
    result = run_cli("fabric", *overrides, f"paths.log_dir={logs}", f"paths.data_dir={tmp_path}/data")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "val/loss" in result.stdout and "1 process(es)" in result.stdout
    [run] = run_dirs(logs)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step000006.ckpt", "step000012.ckpt"]
    checkpoint = torch.load(run / "checkpoints" / "step000012.ckpt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "step", "lmforge"} <= set(checkpoint)
    assert checkpoint["lmforge"]["tokenizer"] and checkpoint["lmforge"]["model"]["n_embd"] == 32

    logged = scalars(run / "tensorboard")
    expected = {
        "train/loss",
        "train/grad_norm",
        "train/tokens",
        "lr",
        "val/loss",
        "val/ppl",
        "test/loss",
        "test/ppl",
        "train/device/items_per_sec",
        "train/device/mfu",
    }
    assert expected <= set(logged), expected - set(logged)
    assert sorted(logged["val/loss"]) == [6, 12]
    assert logged["val/ppl"][12] == pytest.approx(math.exp(logged["val/loss"][12]), rel=1e-4)
    assert logged["train/tokens"][11] == 12 * 8 * 32
    assert logged["train/loss"][11] < logged["train/loss"][1]
    # TensorBoard shows it as it shows a Trainer run: loss and perplexity first, the HParams tab filled.
    groups, hparams, metrics = tensorboard_cards_and_hparams(run / "tensorboard")
    assert groups[:2] == ["loss", "perplexity"], groups
    assert {"model/n_embd", "optimizer/lr", "data/block_size"} <= set(hparams)
    assert metrics == ["loss/val", "perplexity/val"]


def fabric_run(*args: str) -> subprocess.CompletedProcess:
    """``fabric run src/lmforge/cli/fabric.py <args>``: Lightning's own launcher (torchrun underneath).

    Without OMP_NUM_THREADS in the environment, as from a shell: the CLI then sets it to all the cores.
    """
    fabric = Path(sys.executable).with_name("fabric")
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    return subprocess.run(
        [str(fabric), "run", f"--main-port={free_port()}", "src/lmforge/cli/fabric.py", *args],
        cwd=REPO_ROOT,
        env={**env, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )


# [gpt]
@pytest.mark.parametrize("experiment", list(FINE_TUNING_EXPERIMENTS))
def test_fine_tuning_experiments_run_in_the_fabric_loop(experiment, tmp_path):
    """The experiments on task data run here as in the Trainer (which runs them on two DDP processes:
    tests/training/test_sft_runs.py); task scores are part of the run's metrics."""
    overrides = [f"experiment={experiment}", *FINE_TUNING_EXPERIMENTS[experiment](tmp_path), *SHORT_FINE_TUNING]
    metrics = fit(compose_config("fabric", [*overrides, "trainer.accelerator=cpu"], tmp_path))
    assert {"val/chrf", "test/chrf", "test/exact_match"} <= set(metrics)


@pytest.mark.slow
def test_task_data_on_two_ddp_processes(tmp_path):
    """Under `fabric run`, both ranks answer their share of the validation sample and score it together."""
    experiment = "translate_en_fr"
    overrides = [f"experiment={experiment}", *FINE_TUNING_EXPERIMENTS[experiment](tmp_path), *SHORT_FINE_TUNING]
    paths = [f"paths.log_dir={tmp_path}/logs", f"paths.data_dir={tmp_path}/data"]
    result = fabric_run("--accelerator=cpu", "--devices=2", "--strategy=ddp", *overrides, *paths)
    errors = [line for line in result.stderr.splitlines() if "rror" in line or "rank" in line]
    assert result.returncode == 0, "\n".join(errors)[-6000:]
    assert "test/chrf" in result.stdout and "test/exact_match" in result.stdout


# [/gpt]
@pytest.mark.slow
def test_fabric_run_two_ddp_processes_share_one_run_dir(tmp_path, corpus_dir):
    logs = tmp_path / "logs"
    overrides = [o for o in tiny_fabric_overrides(corpus_dir) if not o.startswith("trainer.accelerator")]
    result = fabric_run(
        "--accelerator=cpu",
        "--devices=2",
        "--strategy=ddp",
        *overrides,
        "trainer.max_steps=6",
        "trainer.accumulate_grad_batches=2",
        "trainer.val_check_interval=3",
        "trainer.checkpoint_every_n_steps=3",
        "data.eval_windows=33",  # ranks get 17 and 16 windows: one more eval batch on rank 0
        "process_group_timeout=120",  # a stuck collective fails with its traceback before the 300 s kill
        f"paths.log_dir={logs}",
        f"paths.data_dir={tmp_path}/data",
    )
    # torchrun prints the workers' errors before its own traceback: show those lines.
    errors = [line for line in result.stderr.splitlines() if "rror" in line or "rank" in line]
    assert result.returncode == 0, "\n".join(errors)[-6000:]
    # The CLI's flags win over the config, and the 2 cores are split between the processes.
    assert "2 process(es), strategy DDPStrategy, 1 CPU threads each" in result.stdout

    # One run directory; rank 1 writes nothing there but its own Python log.
    [run] = run_dirs(logs)
    assert sorted(p.name for p in run.iterdir()) == [
        ".hydra",
        "checkpoints",
        "fabric.log",
        "fabric_rank1.log",
        "tensorboard",
    ]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step000003.ckpt", "step000006.ckpt"]
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1  # one event file: rank 0's
    logged = scalars(run / "tensorboard")
    assert sorted(logged["val/loss"]) == [3, 6]
    assert logged["train/tokens"][5] == 6 * 2 * 8 * 32 * 2  # steps x accumulation x batch x block x ranks


@pytest.mark.slow
def test_fsdp_two_processes_shard_and_resume_exactly(tmp_path, corpus_dir):
    """`lmforge fabric fabric.devices=2` launches the second process itself; FSDP2 writes sharded checkpoints."""
    common = [
        *tiny_fabric_overrides(
            corpus_dir,
            "trainer.strategy=fsdp",
            "trainer.devices=2",
            "trainer.max_steps=4",
            "trainer.log_every_n_steps=1",
            "trainer.val_check_interval=2",
            "trainer.checkpoint_every_n_steps=2",
            "test=false",
        ),
        f"paths.data_dir={tmp_path}/data",
    ]
    full = run_cli("fabric", *common, f"paths.log_dir={tmp_path}/full")
    assert full.returncode == 0, full.stderr[-3000:]
    assert "2 process(es), strategy ModelParallelStrategy" in full.stdout
    assert "sample" in full.stdout  # every rank took part in generation; rank 0 printed it
    [run] = run_dirs(tmp_path / "full")
    step2 = run / "checkpoints" / "step000002.ckpt"
    assert step2.is_dir() and (step2 / "meta.pt").exists() and len(list(step2.glob("*.distcp"))) == 2

    resumed = run_cli("fabric", *common, f"paths.log_dir={tmp_path}/resumed", f"ckpt_path={step2}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    [resumed_run] = run_dirs(tmp_path / "resumed")
    full_logged, resumed_logged = scalars(run / "tensorboard"), scalars(resumed_run / "tensorboard")
    assert sorted(resumed_logged["train/loss"]) == [2, 3]
    for step in (2, 3):
        assert resumed_logged["train/loss"][step] == pytest.approx(full_logged["train/loss"][step], abs=1e-6)
        assert resumed_logged["lr"][step] == pytest.approx(full_logged["lr"][step])
    assert resumed_logged["val/loss"][4] == pytest.approx(full_logged["val/loss"][4], abs=1e-6)


# ----------------------------------------------------------------------------------------------
# Faults: the Fabric loop shares the Trainer's signal handling and non-finite loss policy


class SignalAtStep:
    """Fabric callback for the tests: sends ``signum`` to this process after optimizer step ``step``."""

    def __init__(self, signum: int, step: int) -> None:
        self.signum = signum
        self.step = step

    def on_train_batch_end(self, fabric, step, loss) -> None:
        if step == self.step:
            assert signal.getsignal(self.signum) not in (signal.SIG_DFL, None), "unhandled: it would kill pytest"
            os.kill(os.getpid(), self.signum)


SHORT_FABRIC_RUN = [
    "trainer.max_steps=6",
    "trainer.log_every_n_steps=1",
    "trainer.val_check_interval=6",
    "trainer.checkpoint_every_n_steps=1",
    "test=false",
]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_a_checkpoint_that_resumes_exactly(signum, tmp_path, corpus_dir, capsys):
    common = tiny_fabric_overrides(corpus_dir, *SHORT_FABRIC_RUN, "trainer.checkpoint_every_n_steps=100")
    signal_at_step_3 = [
        f"+callbacks.signal._target_={__name__}.SignalAtStep",
        f"+callbacks.signal.signum={int(signum)}",
        "+callbacks.signal.step=3",
    ]
    with pytest.raises(SystemExit) as exit_info:
        fit(compose_config("fabric", [*common, *signal_at_step_3], tmp_path / "stopped"))
    assert exit_info.value.code == 128 + signum
    assert signal.getsignal(signum) in (signal.SIG_DFL, signal.default_int_handler)  # handlers restored
    checkpoints = tmp_path / "stopped" / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step000003.ckpt"]
    stderr = capsys.readouterr().err
    assert f"training stopped by {signum.name} after step 3; saved a resumable checkpoint: {checkpoints}" in stderr
    assert "resume with: lmforge fabric" in stderr and f"ckpt_path={checkpoints / 'step000003.ckpt'}" in stderr

    fit(compose_config("fabric", common, tmp_path / "full"))
    fit(compose_config("fabric", [*common, f"ckpt_path={checkpoints / 'step000003.ckpt'}"], tmp_path / "resumed"))
    full, resumed = (scalars(tmp_path / name / "run" / "tensorboard") for name in ("full", "resumed"))
    assert sorted(resumed["train/loss"]) == [3, 4, 5]
    for step in (3, 4, 5):
        assert resumed["train/loss"][step] == pytest.approx(full["train/loss"][step], abs=1e-6), step


def test_nonfinite_loss_stops_before_the_update_or_skips_it(tmp_path, corpus_dir, monkeypatch, capsys):
    original = lmforge.fabric.loop.batch_loss
    training_calls = 0

    def nan_at_step_3(model, batch, ignore_index):
        nonlocal training_calls
        loss, count = original(model, batch, ignore_index)
        if model.training:
            training_calls += 1
            if training_calls == 4:  # the micro-batch of step 3 (counted from 0, like the Trainer's global_step)
                loss = loss * float("nan")
        return loss, count

    monkeypatch.setattr(lmforge.fabric.loop, "batch_loss", nan_at_step_3)
    with pytest.raises(NonFiniteLossError) as error:
        fit(compose_config("fabric", tiny_fabric_overrides(corpus_dir, *SHORT_FABRIC_RUN), tmp_path / "stop"))
    checkpoints = tmp_path / "stop" / "run" / "checkpoints"
    assert "the training loss is NaN or infinite at step 3" in str(error.value)
    assert f"the last good checkpoint is {checkpoints / 'step000003.ckpt'}" in str(error.value)
    assert "set nonfinite_loss=skip" in str(error.value)
    assert sorted(p.name for p in checkpoints.iterdir())[-1] == "step000003.ckpt"

    training_calls = 0
    skip = tiny_fabric_overrides(corpus_dir, *SHORT_FABRIC_RUN, "nonfinite_loss=skip")
    fit(compose_config("fabric", skip, tmp_path / "skip"))
    checkpoints = tmp_path / "skip" / "run" / "checkpoints"
    before, after, final = (torch.load(checkpoints / f"step{step:06d}.ckpt", weights_only=True) for step in (3, 4, 6))
    for name, tensor in before["model"].items():  # step 3's update was skipped ...
        assert torch.equal(after["model"][name], tensor), name
    assert all(torch.isfinite(t).all() for t in final["model"].values())  # ... and training went on
    assert final["skipped_steps"] == 1
    assert scalars(tmp_path / "skip" / "run" / "tensorboard")["train/skipped_steps"][5] == 1


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_process_group_timeout_comes_from_the_config(strategy, tmp_path):
    overrides = [f"trainer.strategy={strategy}", "trainer.devices=2", "trainer.accelerator=cpu"]
    cfg = compose_config("fabric", [*overrides, "process_group_timeout=42"], tmp_path)
    assert build_fabric(cfg, LoopSettings.from_config(cfg.trainer)).strategy._timeout.total_seconds() == 42
    with pytest.raises(ValueError, match="process_group_timeout=0 must be > 0"):
        check_run(compose_config("fabric", [*overrides, "process_group_timeout=0"], tmp_path), "fabric")


@pytest.mark.slow
def test_sigterm_to_one_rank_under_ddp_stops_every_rank_at_the_same_step(tmp_path, corpus_dir):
    """`kill` reaches rank 0 only; both processes stop after the same step, and one checkpoint is saved."""
    overrides = tiny_fabric_overrides(
        corpus_dir,
        "trainer.strategy=ddp",
        "trainer.devices=2",
        "trainer.max_steps=100000",
        "trainer.val_check_interval=100000",
        "trainer.checkpoint_every_n_steps=5",
    )
    stderr_file = tmp_path / "stderr.txt"
    with open(stderr_file, "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "lmforge", "fabric", *overrides, f"paths.log_dir={tmp_path}/logs"],
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        deadline = time.monotonic() + 180
        while not list(tmp_path.glob("logs/fabric/runs/*/checkpoints/step*.ckpt")):
            assert process.poll() is None and time.monotonic() < deadline, stderr_file.read_text()[-3000:]
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    finally:
        process.kill()
        process.wait()
    text = stderr_file.read_text()
    assert process.returncode == 128 + signal.SIGTERM, text[-3000:]
    assert "Traceback" not in text and text.count("training stopped by SIGTERM") == 1
    saved = max(tmp_path.glob("logs/fabric/runs/*/checkpoints/step*.ckpt"))
    step = torch.load(saved, weights_only=True)["step"]
    assert f"training stopped by SIGTERM after step {step}; saved a resumable checkpoint: {saved}" in text


@pytest.mark.slow
def test_one_and_two_processes_give_the_same_losses_and_weights_for_the_same_global_batch(tmp_path, corpus_dir):
    """As for the Trainer (tests/training/test_batching.py): 1 process x 2 accumulation steps and 2 DDP
    processes x 1, fp32, validate to the same losses and end with the same weights within 1e-5."""
    common = [
        *tiny_fabric_overrides(corpus_dir, "trainer.max_steps=6", "trainer.val_check_interval=2", "test=false"),
        "data.global_batch_tokens=512",  # 2 micro-batches of 8 x 32 tokens
        f"paths.data_dir={tmp_path}/data",
    ]
    one = run_cli("fabric", *common, f"paths.log_dir={tmp_path}/one", env={"OMP_NUM_THREADS": "1"})  # as each rank
    assert one.returncode == 0, one.stderr[-3000:]
    assert (
        "global batch 512 tokens = 256 tokens per micro-batch x 1 data-parallel process(es) x 2 accumulation step(s)"
        in one.stdout
    )
    two = run_cli(
        "fabric",
        *common,
        "trainer.devices=2",
        "trainer.strategy=ddp",
        f"paths.log_dir={tmp_path}/two",
        env={"OMP_NUM_THREADS": "1"},
    )
    assert two.returncode == 0, two.stderr[-3000:]
    [run_one], [run_two] = run_dirs(tmp_path / "one"), run_dirs(tmp_path / "two")
    losses_one, losses_two = scalars(run_one / "tensorboard")["val/loss"], scalars(run_two / "tensorboard")["val/loss"]
    assert sorted(losses_one) == sorted(losses_two) == [2, 4, 6]
    for step in losses_one:
        assert losses_one[step] == pytest.approx(losses_two[step], abs=1e-5), step
    last_one = read_network(run_one / "checkpoints" / "step000006.ckpt").weights
    last_two = read_network(run_two / "checkpoints" / "step000006.ckpt").weights
    for name, tensor in last_one.items():
        torch.testing.assert_close(tensor, last_two[name], rtol=0, atol=1e-5, msg=name)
