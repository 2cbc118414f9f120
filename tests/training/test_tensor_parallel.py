"""Tensor parallelism with sequence parallelism for the GPT, on real CPU processes (gloo).

fp32, one thread per process (as each rank of 2 has on 2 cores, so kernels sum in the same order):
the split model's losses and weights equal one unsplit process's within 1e-5, with ``trainer=tp``
and with ``trainer=fsdp_tp`` on a 2 x 2 mesh, and in the own loop.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import (
    assert_runs_agree,
    csv_values,
    global_batch_overrides,
    run_cli,
    scalars,
    succeeded,
    tiny_train_overrides,
)

from lmforge.errors import ConfigError
from lmforge.models import GPT
from lmforge.models.gpt_parallelize import check_sequence_length, check_tensor_parallel
from lmforge.training.checkpoint import read_network
from lmforge.training.lora import LoRA
from lmforge.training.parallel import data_parallel_groups, is_tensor_parallel, tensor_parallelize

# Every split the plan makes: grouped-query attention (k/v heads split too), SwiGLU's separate
# gate, RoPE; two blocks.
SPLIT_MODEL = ["model.n_layer=2", "model.n_head=4", "model.n_kv_head=2", "model.mlp=swiglu", "model.pos_embedding=rope"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def tiny_gpt(**options) -> GPT:
    return GPT(**{"vocab_size": 40, "block_size": 16, "n_layer": 1, "n_head": 4, "n_embd": 32, **options})


@pytest.mark.parametrize(
    ("options", "degree", "message"),
    [
        ({"n_head": 2, "n_embd": 32}, 4, r"model.n_head=2 into equal parts; pick a value divisible by 4"),
        ({"n_kv_head": 1}, 2, r"model.n_kv_head=1 into equal parts"),
        ({"mlp_hidden": 42}, 4, r"MLP hidden size \(model.mlp_hidden\)=42"),
        ({"block_size": 18}, 4, r"pick a data.block_size divisible by 4 \(got 18\)"),
        ({"qk_norm": True}, 2, r"model.qk_norm=true is not supported under tensor parallelism"),
    ],
)
def test_a_gpt_that_cannot_be_split_is_one_line(options, degree, message):
    with pytest.raises(ConfigError, match=message):
        check_tensor_parallel(tiny_gpt(**options), degree)


def test_layers_wrapped_by_adapters_are_refused():
    net = tiny_gpt()
    LoRA(r=2).apply(net)
    with pytest.raises(ConfigError, match=r"blocks.0.attn.c_q is a .*LoRA is not supported under tensor parallelism"):
        check_tensor_parallel(net, 2)


def test_sequences_that_do_not_split_into_equal_parts_are_refused_before_any_collective():
    check_sequence_length(tiny_gpt(), (torch.zeros(2, 16, dtype=torch.long),), degree=4)
    with pytest.raises(ConfigError, match="a batch has 10 positions"):
        check_sequence_length(tiny_gpt(), (torch.zeros(2, 10, dtype=torch.long),), degree=4)


def test_models_without_a_plan_and_sizes_that_do_not_divide_are_refused():
    with pytest.raises(ConfigError, match="has a plan for lmforge's GPT only, and GRU has none"):
        tensor_parallelize(torch.nn.GRU(4, 4), mesh=None)
    assert not is_tensor_parallel(tiny_gpt())
    assert data_parallel_groups(8, 2, "trainer.strategy.tensor_parallel_size") == 4
    with pytest.raises(
        ConfigError, match=r"tensor_parallel_size=3 must divide the 4 processes of the job; pick one of"
    ):
        data_parallel_groups(4, 3, "trainer.strategy.tensor_parallel_size")


@pytest.mark.slow
def test_trainer_tp_on_two_processes_equals_one_process_resumes_exactly_and_its_checkpoints_are_read(
    corpus_dir, tmp_path
):
    """20 steps: every logged training loss, the validation losses and the final weights within 1e-5;
    a run resumed from the sharded step-10 checkpoint logs the same losses; consolidate, eval and
    generate read the sharded checkpoint."""
    common = [
        *tiny_train_overrides(corpus_dir, "gpt", *SPLIT_MODEL),
        "trainer.max_steps=20",
        "trainer.val_check_interval=10",
        "trainer.log_every_n_steps=1",
        "callbacks.periodic_checkpoint.every_n_train_steps=10",
        "callbacks.periodic_checkpoint.save_top_k=-1",
        "logger=csv",
        "test=false",
        f"paths.data_dir={tmp_path}/data",
    ]
    split = [*common, "trainer=tp", "trainer.devices=2"]
    assert succeeded(run_cli("train", *common, f"paths.log_dir={tmp_path}/one", env=ONE_THREAD))
    assert succeeded(run_cli("train", *split, f"paths.log_dir={tmp_path}/two", env=ONE_THREAD))
    assert_runs_agree(tmp_path / "one", tmp_path / "two", min_validations=2)
    losses_one, losses_two = csv_values(tmp_path / "one", "train/loss"), csv_values(tmp_path / "two", "train/loss")
    assert sorted(losses_one) == sorted(losses_two) == list(range(20))
    for step, loss in losses_one.items():
        assert abs(loss - losses_two[step]) <= 1e-5, (step, loss, losses_two[step])

    (step10,) = (tmp_path / "two").glob("train/runs/*/checkpoints/periodic-step000010.ckpt")
    assert step10.is_dir() and len(list(step10.glob("*.distcp"))) == 2  # each process wrote its slices
    resumed = [*split, f"paths.log_dir={tmp_path}/resumed", f"ckpt_path={step10}"]
    assert succeeded(run_cli("train", *resumed, env=ONE_THREAD))
    losses_resumed = csv_values(tmp_path / "resumed", "train/loss")
    assert sorted(losses_resumed) == list(range(10, 20))
    for step, loss in losses_resumed.items():
        assert loss == pytest.approx(losses_two[step], abs=1e-6), step

    (last,) = (tmp_path / "two").glob("train/runs/*/checkpoints/last.ckpt")
    assert succeeded(run_cli("consolidate", f"ckpt_path={last}"))
    consolidated = read_network(last.with_name("last.consolidated.pt")).weights
    for name, tensor in read_network(last).weights.items():
        assert torch.equal(tensor, consolidated[name]), name
    evaluated = run_cli("eval", f"ckpt_path={last}", "splits=[val]")
    assert succeeded(evaluated) and f"{csv_values(tmp_path / 'two')[19]:.4f}" in evaluated.stdout
    assert succeeded(run_cli("generate", f"ckpt_path={last}", "prompt=ab", "max_new_tokens=8"))


@pytest.mark.slow
def test_fsdp_tp_on_a_two_by_two_mesh_equals_one_process_for_the_same_global_batch(corpus_dir, tmp_path):
    """4 processes: 2 data-parallel groups (FSDP2) of 2 tensor-parallel processes; 1 process
    accumulates 2 micro-batches. Validation losses and final weights within 1e-5."""
    common = global_batch_overrides(corpus_dir, "gpt", tmp_path / "data", *SPLIT_MODEL)
    one = [*common, "trainer.val_check_interval=8", f"paths.log_dir={tmp_path}/one"]  # counted in micro-batches
    four = [*common, "trainer=fsdp_tp", "trainer.devices=4", "trainer.val_check_interval=4"]
    assert succeeded(run_cli("train", *one, env=ONE_THREAD))
    result = run_cli("train", *four, f"paths.log_dir={tmp_path}/four", env=ONE_THREAD)
    assert succeeded(result)
    assert "256 tokens per micro-batch x 2 data-parallel process(es) x 1 accumulation step(s)" in result.stdout
    assert_runs_agree(tmp_path / "one", tmp_path / "four", min_validations=2)


# [fabric]
@pytest.mark.slow
def test_fabric_loop_tensor_parallel_on_two_processes_equals_one_process(corpus_dir, tmp_path):
    """The Fabric loop's strategy=fsdp with tensor_parallel_size=2: losses of 12 steps and the final weights."""
    common = [
        *(o for o in tiny_train_overrides(corpus_dir, "gpt", *SPLIT_MODEL) if not o.startswith("callbacks.")),
        "trainer.log_every_n_steps=1",
        "trainer.checkpoint_every_n_steps=12",
        "test=false",
        f"paths.data_dir={tmp_path}/data",
    ]
    split = ["trainer.strategy=fsdp", "trainer.devices=2", "trainer.tensor_parallel_size=2"]
    assert succeeded(run_cli("fabric", *common, f"paths.log_dir={tmp_path}/one", env=ONE_THREAD))
    assert succeeded(run_cli("fabric", *common, *split, f"paths.log_dir={tmp_path}/two", env=ONE_THREAD))
    runs = [next((tmp_path / name / "fabric" / "runs").iterdir()) for name in ("one", "two")]
    logged = [scalars(run / "tensorboard") for run in runs]
    assert sorted(logged[0]["train/loss"]) == sorted(logged[1]["train/loss"]) == list(range(12))
    for tag in ("train/loss", "val/loss"):
        for step, loss in logged[0][tag].items():
            assert loss == pytest.approx(logged[1][tag][step], abs=1e-5), (tag, step)
    weights = [read_network(Path(run, "checkpoints", "step000012.ckpt")).weights for run in runs]
    for name, tensor in weights[0].items():
        torch.testing.assert_close(tensor, weights[1][name], rtol=0, atol=1e-5, msg=name)


# [/fabric]
