"""Tensor parallelism with sequence parallelism for the GPT (the Megatron-LM layout) on a 1-D device mesh.

Inside each block, attention is split by heads and the MLP by hidden units over the mesh's
processes: the query/key/value and MLP input projections are column-parallel (a process computes
its heads or hidden units from the whole sequence), the two output projections row-parallel
(their partial sums are reduce-scattered). Between blocks the residual stream, the norms and
dropout are sequence-parallel: each process holds its T / tp positions, so those activations are
split too instead of repeated. The token embedding is split by vocabulary rows; the head is split
the same way (the two stay tied) and gathers the full logits on every process, so the loss is the
one of an unsplit model (docs/scaling.md says why the loss is replicated rather than parallel).

Parameter names do not change: checkpoints written under tensor parallelism are the state dict of
the plain GPT, sharded, and ``lmforge consolidate`` turns them into one file.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from lmforge.errors import ConfigError
from lmforge.models.gpt import GPT

# The sequence (token) dimension of a (B, T, C) activation.
SEQUENCE = 1


def check_tensor_parallel(net: GPT, degree: int) -> None:
    """Refuse, in one line, a GPT that cannot be split over ``degree`` processes."""
    mlp = net.blocks[0].mlp
    attn = net.blocks[0].attn
    splits = {
        "model.n_head": net.n_head,
        "model.n_kv_head": net.n_kv_head,
        "the MLP hidden size (model.mlp_hidden)": mlp.c_fc.out_features,
    }
    for name, size in splits.items():
        if size % degree:
            raise ConfigError(
                f"tensor parallelism over {degree} processes splits {name}={size} into equal parts; "
                f"pick a value divisible by {degree} or a tensor_parallel_size that divides it"
            )
    if net.block_size % degree:
        raise ConfigError(
            f"tensor parallelism over {degree} processes splits each sequence into equal parts; "
            f"pick a data.block_size divisible by {degree} (got {net.block_size})"
        )
    for name, module in net.blocks[0].named_modules():
        if name.rsplit(".", 1)[-1].startswith("c_") and type(module) is not nn.Linear:
            raise ConfigError(
                f"tensor parallelism splits plain linear layers, and blocks.0.{name} is a {type(module).__name__} "
                "(LoRA adapters?); LoRA is not supported under tensor parallelism yet: use trainer=fsdp or ddp"
            )
    if attn.q_norm is not None:
        raise ConfigError(
            "model.qk_norm=true is not supported under tensor parallelism yet (its per-head norm weights would "
            "see only the local heads); set model.qk_norm=false or use trainer=fsdp"
        )


def check_sequence_length(net: GPT, args: tuple[torch.Tensor, ...], degree: int) -> None:
    """Refuse, in one line, a batch whose sequences cannot be split into equal parts (before any collective)."""
    length = args[0].size(1)
    if length % degree:
        raise ConfigError(
            f"tensor parallelism over {degree} processes splits each sequence into equal parts, and a batch has "
            f"{length} positions; corpus windows of a data.block_size divisible by {degree} can be split "
            "(task data, whose batches vary in length, cannot yet)"
        )


def tensor_parallelize(net: GPT, mesh: DeviceMesh) -> GPT:
    """Split ``net`` in place over the 1-D tensor-parallel ``mesh``; see the module docstring for the layout."""
    check_tensor_parallel(net, mesh.size())
    tied = net.lm_head.weight is net.wte.weight
    outer = {
        # Partial sums of the vocabulary shards, reduce-scattered into each process's positions.
        "wte": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(SEQUENCE)),
        "norm_f": SequenceParallel(),
        "lm_head": ColwiseParallel(input_layouts=Shard(SEQUENCE), output_layouts=Replicate()),
    }
    if net.wpe is not None:  # (T, C) position rows, split by position like the token embeddings
        outer["wpe"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(0))
    parallelize_module(net, mesh, outer)
    net.register_forward_pre_hook(partial(check_sequence_length, degree=mesh.size()))
    if tied:  # each of wte and lm_head got its own sharded copy of the one table: share it again
        net.lm_head.weight = net.wte.weight

    for block in net.blocks:
        gather_sequence = {"input_layouts": (Shard(SEQUENCE),), "desired_input_layouts": (Replicate(),)}
        plan = {
            "norm_1": SequenceParallel(),
            # forward(x, rope, kv_cache, pos): only x is split
            "attn": PrepareModuleInput(
                input_layouts=(Shard(SEQUENCE), None, None, None),
                desired_input_layouts=(Replicate(), None, None, None),
            ),
            "attn.c_q": ColwiseParallel(),
            "attn.c_k": ColwiseParallel(),
            "attn.c_v": ColwiseParallel(),
            "attn.c_proj": RowwiseParallel(output_layouts=Shard(SEQUENCE)),
            "norm_2": SequenceParallel(),
            "mlp": PrepareModuleInput(**gather_sequence),
            "mlp.c_fc": ColwiseParallel(),
            "mlp.c_proj": RowwiseParallel(output_layouts=Shard(SEQUENCE)),
        }
        if block.mlp.c_gate is not None:
            plan["mlp.c_gate"] = ColwiseParallel()
        parallelize_module(block, mesh, plan)
    return net
