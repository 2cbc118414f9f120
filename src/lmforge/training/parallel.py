"""Scaling out: tensor parallelism, FSDP2 sharding, per-block options, CPU threads per process.

The Lightning Trainer path (``LMModule.configure_model``) and the Fabric loop share these
functions, so both split, shard and size thread pools the same way.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from torch.distributed._composable import checkpoint as checkpoint_activations
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from lmforge.errors import ConfigError
from lmforge.models.base import LanguageModel
from lmforge.models.gpt import GPT  # [gpt]
from lmforge.models.gpt_parallelize import tensor_parallelize as tensor_parallelize_gpt  # [gpt]

# The dimensions of the 2-D device mesh of Lightning's ModelParallelStrategy (Trainer and Fabric).
DATA_PARALLEL = "data_parallel"
TENSOR_PARALLEL = "tensor_parallel"


def transformer_blocks(net: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a network (:meth:`LanguageModel.repeated_blocks`); empty for one without."""
    return net.repeated_blocks() if isinstance(net, LanguageModel) else []


def apply_block_options(
    net: nn.Module, *, activation_checkpointing: bool = False, compile_blocks: bool = False
) -> None:
    """Per transformer block, in place: recompute activations in the backward pass, and/or ``torch.compile``.

    Parameter names do not change, so checkpoints stay interchangeable.
    """
    if not (activation_checkpointing or compile_blocks):
        return
    blocks = transformer_blocks(net)
    if not blocks:
        raise ConfigError(
            f"activation_checkpointing and compile_blocks work per transformer block and {type(net).__name__} "
            "has none; set both to false"
        )
    for block in blocks:
        if activation_checkpointing:
            checkpoint_activations(block)
        if compile_blocks:
            block.compile()


def is_sharded(net: nn.Module) -> bool:
    """Whether ``net`` was sharded with FSDP2 (its forward then needs every rank)."""
    return isinstance(net, FSDPModule)


def is_tensor_parallel(net: nn.Module) -> bool:
    """Whether ``net`` is split by :func:`tensor_parallelize` (then only whole-sequence forwards run: no
    generation, whose prompts and single new tokens cannot be split over the processes)."""
    return any(
        isinstance(p, DTensor) and TENSOR_PARALLEL in (p.device_mesh.mesh_dim_names or ()) for p in net.parameters()
    )


def tensor_parallelize(net: nn.Module, mesh: DeviceMesh) -> None:
    """Split ``net`` in place over the 1-D tensor-parallel ``mesh`` with its model's plan."""
    # [gpt]
    if isinstance(net, GPT):
        tensor_parallelize_gpt(net, mesh)
        return
    # [/gpt]
    raise ConfigError(
        f"tensor parallelism has a plan for lmforge's GPT only, and {type(net).__name__} has none; "
        "set trainer.strategy.tensor_parallel_size=1 (trainer=fsdp) or use trainer=ddp"
    )


def shard_model(
    net: LanguageModel,
    device_mesh: DeviceMesh,
    *,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
    activation_checkpointing: bool = False,
    compile_blocks: bool = False,
) -> LanguageModel:
    """Split and shard ``net`` in place over the 2-D (data-parallel x tensor-parallel) ``device_mesh``.

    First, over the tensor-parallel dimension when it has more than one process, the model's
    tensor-parallel plan (:func:`tensor_parallelize`); then the block options (see
    :func:`apply_block_options`); then FSDP2 (``fully_shard``) over the data-parallel dimension:
    each transformer block becomes its own unit (gathered just before it runs, freed after),
    then the root takes the remaining parameters (embeddings, final norm, head). A network
    without blocks, such as the LSTM, is one unit: its memory at rest is sharded, and the
    whole model is gathered for each forward. ``param_dtype``/``reduce_dtype`` come from
    :func:`mixed_precision_dtypes`. Returns ``net``, now also an ``FSDPModule``.
    """
    if device_mesh[TENSOR_PARALLEL].size() > 1:
        tensor_parallelize(net, device_mesh[TENSOR_PARALLEL])
    apply_block_options(net, activation_checkpointing=activation_checkpointing, compile_blocks=compile_blocks)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    data_mesh = device_mesh[DATA_PARALLEL]
    for block in transformer_blocks(net):
        fully_shard(block, mesh=data_mesh, mp_policy=policy)
    fully_shard(net, mesh=data_mesh, mp_policy=policy)
    # Generation runs forward_step rather than forward: gather the root's parameters for it too.
    register_fsdp_forward_method(net, "forward_step")
    return net


def reshard(net: nn.Module) -> None:
    """Free the gathered parameters of an FSDP2 network before its state is saved.

    After a forward pass without backward (validation) the root unit keeps its parameters
    gathered; a network that is one unit (the LSTM) then holds no sharded parameter at all, and
    the sharded checkpoint writer finds no distributed model to save.
    """
    if isinstance(net, FSDPModule):
        net.reshard()


def data_parallel_groups(world_size: int, tensor_parallel_size: Any, setting: str) -> int:
    """The number of data-parallel groups of ``world_size`` processes split into tensor-parallel groups of
    ``tensor_parallel_size``; a size that does not divide them is one error naming ``setting``."""
    if not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1 or world_size % tensor_parallel_size:
        divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
        raise ConfigError(
            f"{setting}={tensor_parallel_size} must divide the {world_size} processes of the job; "
            f"pick one of {divisors}"
        )
    return world_size // tensor_parallel_size


def data_parallel_rank(strategy: Any) -> tuple[int, int]:
    """This process's data-parallel rank and the number of data-parallel groups, under a Trainer's or
    Fabric's ``strategy``: processes of one tensor-parallel group read the same batches."""
    sharding = getattr(strategy, "distributed_sampler_kwargs", None)
    return (sharding["rank"], sharding["num_replicas"]) if sharding else (0, 1)


def count_groups_as_devices(throughput: Any, strategy: Any, world_size: int) -> None:
    """Make a Lightning ``Throughput`` count each tensor-parallel group as one device: its processes
    work on the same tokens, so the "device" rates are the group's, the totals multiply them by the
    number of groups, and MFU is against the group's summed peak. A no-op without tensor parallelism."""
    groups = data_parallel_rank(strategy)[1]
    throughput.world_size = groups
    if throughput.available_flops:
        throughput.available_flops *= world_size // groups


def cpu_count() -> int:
    """CPU cores this process may run on (respects affinity masks and taskset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def limit_cpu_threads(processes_per_node: int) -> int:
    """Cap torch's intra-op threads at ``cores // processes_per_node`` so that ranks do not oversubscribe.

    Lightning only sets the thread count when ``OMP_NUM_THREADS`` is unset; launchers and
    users often set it (``fabric run`` sets it to the core count), and two ranks with all
    cores each run slower than with half each. Lowers, never raises, the current count.
    Returns the resulting number of threads.
    """
    threads = min(torch.get_num_threads(), max(1, cpu_count() // max(1, processes_per_node)))
    torch.set_num_threads(threads)
    return threads


def shut_down_process_group() -> None:
    """End a distributed run cleanly: wait for every rank, then destroy the default process group.

    A no-op outside ``torch.distributed`` (one process). Lightning destroys the group at exit
    only for NCCL (an atexit hook); under gloo (CPU DDP) the group and its C++ threads (the
    ``pt_gloo_runloop`` workers, gloo's ``gloo_tcp_loop`` I/O thread) were left to interpreter
    finalization, in a rank that may exit while its peer is still connected (rank 1 finishes
    first: rank 0 still writes the summary). That unordered teardown is where rank 1 sometimes
    aborted with "terminate called without an active exception". Barrier, then destroy: every
    rank is done with its collectives before any closes its connections and joins its threads.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
