"""Scaling out on the Trainer path: DDP, FSDP2, precision, multi-node, one run directory per launch.

The end-to-end tests start real processes (gloo on the CPU) that train a tiny model for a
few steps; module-scoped fixtures train once for several tests.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import (
    DEFAULT_MODEL,
    REPO_ROOT,
    TESTS_DIR,
    TINY_MODEL,
    compose_config,
    free_port,
    run_cli,
    succeeded,
    tiny_train_overrides,
)
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.distributed.device_mesh import init_device_mesh

from lmforge.cli.consolidate import consolidate
from lmforge.cli.eval import evaluate
from lmforge.errors import CheckpointError, PrecisionError
from lmforge.models import (
    GPT,  # [gpt]
    LSTMLanguageModel,  # [lstm]
)
from lmforge.training import run_dir
from lmforge.training.checkpoint import is_sharded_checkpoint
from lmforge.training.parallel import (
    DATA_PARALLEL,
    TENSOR_PARALLEL,
    apply_block_options,  # [lstm]
    cpu_count,
    is_sharded,
    reshard,
    shard_model,
)
from lmforge.training.precision import check_precision, mixed_precision_dtypes

MAX_STEPS = 12  # of the tiny runs (helpers.TINY_RUN)
# The multirun sweep trains the other model where the project has two, so DDP runs cover both.
SWEEP_MODEL = list(TINY_MODEL)[-1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """One token cache for every run of this module."""
    return tmp_path_factory.mktemp("data")


def paths(log_dir: Path, data_dir: Path) -> list[str]:
    return [f"paths.log_dir={log_dir}", f"paths.data_dir={data_dir}"]


def tree(directory: Path) -> list[str]:
    """Every path below ``directory``, relative and sorted."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def first_run_dir(log_dir: Path) -> Path:
    """The oldest training run directory under ``log_dir``."""
    return sorted((log_dir / "train" / "runs").iterdir())[0]


def only_run_dir(log_dir: Path, task: str = "train") -> Path:
    """The single run directory of ``task``; fails if the log dir holds anything else."""
    assert [p.name for p in log_dir.iterdir()] == [task], tree(log_dir)
    assert [p.name for p in (log_dir / task).iterdir()] == ["runs"], tree(log_dir)
    runs = list((log_dir / task / "runs").iterdir())
    assert len(runs) == 1, tree(log_dir)
    return runs[0]


def global_step(checkpoint: Path) -> int:
    """The step a checkpoint file or sharded checkpoint directory was saved at."""
    path = checkpoint / "meta.pt" if checkpoint.is_dir() else checkpoint
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


def csv_metric(run_dir: Path, key: str) -> dict[int, float]:
    """step -> value of ``key`` in the run's CSV log."""
    with open(run_dir / "csv" / "metrics.csv") as handle:
        return {int(row["step"]): float(row[key]) for row in csv.DictReader(handle) if row.get(key)}


# --- DDP -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ddp_log_dir(tmp_path_factory, corpus_dir, data_dir) -> Path:
    """A 2-process ``trainer=ddp_sim`` run; peak_flops set so that MFU is logged, 37 eval windows
    so that the ranks validate unequal shares (19 and 18 windows)."""
    log_dir = tmp_path_factory.mktemp("ddp") / "logs"
    overrides = tiny_train_overrides(
        corpus_dir, DEFAULT_MODEL, "callbacks.throughput.peak_flops=1e11", "data.eval_windows=37", "test=false"
    )
    assert succeeded(run_cli("train", "trainer=ddp_sim", *overrides, *paths(log_dir, data_dir)))
    return log_dir


@pytest.mark.slow
def test_ddp_sim_run_writes_one_run_dir_from_rank_zero(ddp_log_dir):
    run_dir = only_run_dir(ddp_log_dir)
    # Rank 1's Hydra log sits next to rank 0's; only rank 0 wrote .hydra/, logs and checkpoints.
    expected = {".hydra", "checkpoints", "tensorboard", "train.log", "train_ddp_process_1.log"}
    assert {p.name for p in run_dir.iterdir()} == expected
    assert global_step(run_dir / "checkpoints" / "last.ckpt") == MAX_STEPS

    # The throughput monitor works under DDP: per-device and global rates, and MFU from peak_flops.
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/device/items_per_sec", "train/items_per_sec", "train/device/mfu"} <= scalars
    device_rate = events.Scalars("train/device/items_per_sec")[-1].value
    assert events.Scalars("train/items_per_sec")[-1].value == pytest.approx(2 * device_rate)


@pytest.mark.slow
def test_ddp_validation_loss_equals_single_process_eval(ddp_log_dir, tmp_path):
    """Each rank validates its share of the windows; the loss reduced over ranks is the single-process one."""
    run_dir = only_run_dir(ddp_log_dir)
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    two_processes = events.Scalars("loss/val")[-1]  # the metric val/loss
    assert two_processes.step == MAX_STEPS - 1  # the validation after the last step (0-based index)
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    cfg = compose_config("eval", [f"ckpt_path={checkpoint}", "trainer.accelerator=cpu", "splits=[val]"], tmp_path)
    assert evaluate(cfg)["val/loss"] == pytest.approx(two_processes.value, rel=1e-5)


@pytest.mark.slow
def test_multirun_sweep_with_ddp_sim_shares_rank_zero_dirs(corpus_dir, data_dir, tmp_path):
    """Under -m, Lightning's relaunched rank runs the sweep in step with rank 0, in rank 0's folders."""
    log_dir = tmp_path / "logs"
    overrides = tiny_train_overrides(corpus_dir, SWEEP_MODEL, "model.dropout=0.0,0.1", "test=false")
    assert succeeded(run_cli("train", "-m", "trainer=ddp_sim", *overrides, *paths(log_dir, data_dir)))

    assert [p.name for p in log_dir.iterdir()] == ["train"]
    assert [p.name for p in (log_dir / "train").iterdir()] == ["multiruns"]
    (sweep,) = (log_dir / "train" / "multiruns").iterdir()
    assert sorted(p.name for p in sweep.iterdir()) == ["0", "1", "multirun.yaml"]
    for job, dropout in (("0", 0.0), ("1", 0.1)):
        assert {".hydra", "train.log", "train_ddp_process_1.log"} <= {p.name for p in (sweep / job).iterdir()}
        last = torch.load(sweep / job / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert last["global_step"] == MAX_STEPS
        assert last["hyper_parameters"]["model"]["dropout"] == dropout


# --- Multi-node ------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_nodes_simulated_with_torchrun(corpus_dir, data_dir, tmp_path):
    """Two torchrun agents (one process each) form a 2-node DDP job; each rank is its own Hydra app."""
    log_dir = tmp_path / "logs"
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc_per_node=1",
                "--rdzv_backend=c10d",
                f"--rdzv_endpoint=127.0.0.1:{port}",
                f"--node_rank={node}",
                "-m",
                "lmforge",
                "train",
                "trainer=ddp",
                "trainer.num_nodes=2",
                "trainer.devices=1",
                *tiny_train_overrides(corpus_dir, DEFAULT_MODEL, "test=false"),
                *paths(log_dir, data_dir),
            ],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # a process group per node: agent and worker stop together
        )
        for node in (0, 1)
    ]
    try:
        outputs = [node.communicate(timeout=300)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(out[-3000:] for out in outputs)

    run_dir = only_run_dir(log_dir)  # no folder of rank 1's own, no hand-over file left behind
    assert {".hydra", "train.log", "train_rank1.log", "checkpoints"} <= {p.name for p in run_dir.iterdir()}
    assert not list(run_dir.parent.glob(".lmforge-run-dir-*"))
    # Global steps are counted once across nodes: the run reaches max_steps, as a single process does.
    assert global_step(run_dir / "checkpoints" / "last.ckpt") == MAX_STEPS


# --- FSDP2 -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, corpus_dir, data_dir) -> tuple[Path, Path]:
    """A 2-process ``trainer=fsdp`` run of a 2-layer model; returns (log dir, shard probe dir)."""
    root = tmp_path_factory.mktemp("fsdp")
    log_dir, probe_dir = root / "logs", root / "probe"
    overrides = tiny_train_overrides(
        corpus_dir,
        DEFAULT_MODEL,
        "model.n_layer=2",
        "logger=csv",
        "test=false",
        "+callbacks.shard_probe._target_=shard_probe.ShardProbe",
        f"+callbacks.shard_probe.out_dir={probe_dir}",
    )
    python_path = os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")]))
    result = run_cli(
        "train",
        "trainer=fsdp",
        "trainer.devices=2",
        *overrides,
        *paths(log_dir, data_dir),
        env={"PYTHONPATH": python_path},
    )
    assert succeeded(result)
    return log_dir, probe_dir


@pytest.mark.slow
def test_fsdp_each_rank_holds_a_shard_of_every_parameter(fsdp_run):
    log_dir, probe_dir = fsdp_run
    records = [json.loads((probe_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    # run_cli sets OMP_NUM_THREADS=2; each of the 2 ranks gets at most its share of the cores.
    assert [record["threads"] for record in records] == [min(2, max(1, cpu_count() // 2))] * 2
    ranks = [record["params"] for record in records]
    assert ranks[0].keys() == ranks[1].keys()
    assert {"blocks.0.attn.c_q.weight", "blocks.1.attn.c_q.weight"} <= ranks[0].keys()  # [gpt]
    for name in ranks[0]:
        rows = ranks[0][name]["shape"][0]
        for params in ranks:
            assert params[name]["placements"] == ["Shard(dim=0)"], name
            assert params[name]["local_shape"][0] < rows, name
        assert sum(params[name]["local_shape"][0] for params in ranks) == rows, name

    checkpoint = first_run_dir(log_dir) / "checkpoints" / "last.ckpt"
    assert is_sharded_checkpoint(checkpoint)
    assert sorted(p.name for p in checkpoint.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]


@pytest.mark.slow
def test_fsdp_sharded_checkpoint_resumes(fsdp_run, corpus_dir, data_dir):
    log_dir, _ = fsdp_run
    checkpoint = first_run_dir(log_dir) / "checkpoints" / "last.ckpt"
    overrides = tiny_train_overrides(
        corpus_dir,
        DEFAULT_MODEL,
        "model.n_layer=2",
        "logger=csv",
        "test=false",
        f"ckpt_path={checkpoint}",
        "trainer.max_steps=16",
        "trainer.log_every_n_steps=1",
    )
    assert succeeded(run_cli("train", "trainer=fsdp", "trainer.devices=2", *overrides, *paths(log_dir, data_dir)))
    resumed = next(p for p in (log_dir / "train" / "runs").iterdir() if p != checkpoint.parents[1])
    assert sorted(csv_metric(resumed, "train/loss")) == [12, 13, 14, 15]  # continues at step 12
    assert global_step(resumed / "checkpoints" / "last.ckpt") == 16


@pytest.mark.slow
def test_fsdp_checkpoint_consolidates_and_evaluates(fsdp_run, tmp_path):
    log_dir, probe_dir = fsdp_run
    run_dir = first_run_dir(log_dir)  # not the resumed run
    sharded = run_dir / "checkpoints" / "last.ckpt"
    result = run_cli("consolidate", f"ckpt_path={sharded}")
    assert succeeded(result)
    single_file = run_dir / "checkpoints" / "last.consolidated.pt"
    assert f"wrote {single_file}" in result.stdout

    checkpoint = torch.load(single_file, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == MAX_STEPS and "optimizer_states" not in checkpoint
    probed = json.loads((probe_dir / "rank0.json").read_text())["params"]
    full_shapes = {f"net.{name}": param["shape"] for name, param in probed.items()}
    consolidated = {name: list(tensor.shape) for name, tensor in checkpoint["state_dict"].items()}
    assert {name: consolidated.get(name) for name in full_shapes} == full_shapes  # every parameter whole, not a shard
    val_losses = csv_metric(run_dir, "val/loss")
    logged = val_losses[max(val_losses)]  # at the last step, as last.ckpt
    for path in (single_file, sharded):  # eval reads the sharded directory directly too
        cfg = compose_config("eval", [f"ckpt_path={path}", "trainer.accelerator=cpu", "splits=[val]"], tmp_path)
        assert evaluate(cfg)["val/loss"] == pytest.approx(logged, rel=1e-5)

    with pytest.raises(CheckpointError, match="already exists"):
        consolidate(str(sharded))


@pytest.fixture
def one_process_group():
    """A gloo process group of one process, as FSDP2 needs one, and its 1 x 1 (data x tensor parallel) mesh."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield init_device_mesh("cpu", (1, 1), mesh_dim_names=(DATA_PARALLEL, TENSOR_PARALLEL))
    dist.destroy_process_group()


@pytest.mark.parametrize(
    "make,activation_checkpointing,units",
    [
        # [gpt]
        # Each block a unit of its own (recomputing its activations in the backward pass), then the root.
        pytest.param(
            partial(GPT, vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32),
            True,
            ["", "blocks.0", "blocks.1"],
            id="gpt",
        ),
        # [/gpt]
        # [lstm]
        # A network without blocks: the root is the one unit.
        pytest.param(
            partial(LSTMLanguageModel, vocab_size=50, n_embd=32, hidden_size=32, dropout=0.0),
            False,
            [""],
            id="lstm",
        ),
        # [/lstm]
    ],
)
def test_shard_model_computes_what_the_plain_model_does(make, activation_checkpointing, units, one_process_group):
    """Sharded in place, a network computes the same logits, gradients and generation as before."""
    torch.manual_seed(0)
    plain, sharded = make(), make()
    sharded.load_state_dict(plain.state_dict())
    shard_model(sharded, one_process_group, activation_checkpointing=activation_checkpointing)
    assert is_sharded(sharded) and not is_sharded(plain)
    assert all(type(p).__name__ == "DTensor" for p in sharded.parameters())
    assert [name for name, module in sharded.named_modules() if is_sharded(module)] == units

    idx = torch.randint(0, 50, (2, 16))
    torch.testing.assert_close(sharded(idx), plain(idx))
    sharded(idx).sum().backward()
    plain(idx).sum().backward()
    for (name, p_sharded), p_plain in zip(sharded.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p_sharded.grad.full_tensor(), p_plain.grad, msg=name)
    prompt = idx[:, :3]
    assert torch.equal(sharded.generate(prompt, 8, temperature=0), plain.generate(prompt, 8, temperature=0))
    # A forward without backward leaves the root gathered; reshard() hands the checkpoint writer shards again.
    with torch.no_grad():
        sharded(idx)
    reshard(sharded)
    assert all(type(p).__name__ == "DTensor" for p in sharded.parameters())


# [lstm]
def test_block_options_need_transformer_blocks():
    with pytest.raises(ValueError, match="has none; set both to false"):
        apply_block_options(LSTMLanguageModel(vocab_size=10, n_embd=8, hidden_size=8), activation_checkpointing=True)


# [/lstm]


# --- Precision -------------------------------------------------------------------------------


FSDP = {"_target_": "lmforge.lightning.strategies.FSDP2Strategy"}


@pytest.mark.parametrize(
    "precision,accelerator,strategy,full_name",
    [
        ("32", "cpu", None, "32-true"),
        ("bf16", "cpu", "ddp", "bf16-mixed"),
        ("bf16-true", "cpu", FSDP, "bf16-true"),
        ("16-mixed", "gpu", "ddp", "16-mixed"),
    ],
)
def test_check_precision_accepts(precision, accelerator, strategy, full_name):
    assert check_precision(precision, accelerator, strategy) == full_name


@pytest.mark.parametrize(
    "precision,accelerator,strategy,message",
    [
        ("16-mixed", "cpu", None, "16-mixed cannot run on a CPU"),
        ("16-true", "cpu", None, "16-true cannot run on a CPU"),
        ("transformer-engine", "cpu", None, "cannot run on a CPU"),
        ("64-true", "gpu", FSDP, "64-true cannot run with FSDP2; choose one of: 32-true, bf16-mixed"),
        ("8-bit", "cpu", None, "8-bit is unknown"),
    ],
)
def test_check_precision_refuses(precision, accelerator, strategy, message):
    with pytest.raises(PrecisionError, match=message):
        check_precision(precision, accelerator, strategy)


def test_mixed_precision_dtypes():
    assert mixed_precision_dtypes("bf16-mixed") == (torch.bfloat16, torch.float32)
    assert mixed_precision_dtypes("16-mixed") == (torch.float16, torch.float32)
    assert mixed_precision_dtypes("32-true") == mixed_precision_dtypes("bf16-true") == (None, None)


@pytest.mark.slow
def test_impossible_precision_fails_before_data_preparation(corpus_dir, tmp_path):
    overrides = tiny_train_overrides(corpus_dir, DEFAULT_MODEL, "trainer.precision=16-mixed")
    result = run_cli("train", *overrides, *paths(tmp_path / "logs", tmp_path / "data"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: trainer.precision=16-mixed cannot run on a CPU (float16 needs a GPU); "
        "choose one of: 32-true, bf16-mixed, bf16-true, 64-true"
    )
    assert not (tmp_path / "data").exists()


# --- One run directory per launch ------------------------------------------------------------


def test_run_dir_handed_from_rank_zero_to_the_other_ranks(tmp_path, monkeypatch, capsys):
    """The ranks of an external launch (here: torchrun's environment) agree on rank 0's run directory."""
    launch = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999", "TORCHELASTIC_RUN_ID": "test"}
    monkeypatch.setattr(run_dir, "_START_ENV", launch)
    monkeypatch.delenv(run_dir._RUN_DIRS_ENV, raising=False)
    for name in ("LOCAL_RANK", "NODE_RANK", "SLURM_STEP_ID"):
        monkeypatch.delenv(name, raising=False)
    parent = str(tmp_path / "runs")

    monkeypatch.setenv("RANK", "0")
    rank_zero_dir = run_dir.shared_run_dir(parent)
    assert rank_zero_dir.startswith(parent + "/")
    assert run_dir.rank_zero_only_value(".hydra") == ".hydra" and run_dir.rank_suffix() == ""

    monkeypatch.setenv("RANK", "1")
    assert run_dir.shared_run_dir(parent) == rank_zero_dir
    assert run_dir.rank_zero_only_value(".hydra") is None and run_dir.rank_suffix() == "_rank1"

    # A hand-over file left by a killed run of the same launch id is ignored, as is no file at all
    # (no shared filesystem): after the bounded wait the rank uses a folder of its own.
    handover = next(Path(parent).glob(".lmforge-run-dir-*"))
    os.utime(handover, (0, 0))
    monkeypatch.setattr(run_dir, "RUN_DIR_WAIT_SECONDS", 0.2)
    own_dir = run_dir.shared_run_dir(parent)
    assert own_dir not in (rank_zero_dir, parent) and own_dir.startswith(parent + "/")
    assert "found no run directory from rank 0" in capsys.readouterr().err


# --- SLURM -----------------------------------------------------------------------------------


def test_slurm_script_launches_a_config_that_composes(tmp_path):
    """scripts/slurm_train.sh run with a stand-in srun: its command line is a valid multi-node config."""
    (tmp_path / "srun").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$SRUN_ARGS"\n')
    (tmp_path / "srun").chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}",
        "SRUN_ARGS": str(tmp_path / "args"),
        "SLURM_NNODES": "2",
        "SLURM_NTASKS_PER_NODE": "8",
        "SLURM_JOB_ID": "4242",
    }
    script = REPO_ROOT / "scripts" / "slurm_train.sh"
    subprocess.run(["bash", str(script), "model.n_layer=3"], cwd=REPO_ROOT, env=env, check=True, timeout=60)
    command, task, *overrides = (tmp_path / "args").read_text().splitlines()
    assert (command, task) == ("lmforge", "train")
    assert "hydra.run.dir=${paths.log_dir}/${task_name}/slurm/4242" in overrides
    assert "#SBATCH --signal=SIGUSR1@90" in script.read_text()  # Lightning's checkpoint-and-requeue signal

    cfg = compose_config("train", overrides, tmp_path)
    assert (cfg.trainer.num_nodes, cfg.trainer.devices) == (2, 8)
    assert cfg.trainer.strategy._target_ == "lightning.pytorch.strategies.DDPStrategy"
    assert cfg.model.n_layer == 3  # the script's arguments reach the command line
