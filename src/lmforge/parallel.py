"""Scaling out: FSDP2 sharding, the ``trainer=fsdp`` strategy, precision checks, CPU threads per process.

The Lightning Trainer path (``LMModule.configure_model``) and the Fabric loop share these
functions, so both shard, check precision and size thread pools the same way.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from lmforge.errors import ConfigError
from lmforge.models.base import LanguageModel

PRECISIONS = (
    "32-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true",
    "transformer-engine", "transformer-engine-float16",
)
# Lightning's short spellings of the precisions above.
_PRECISION_ALIASES = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed", "64": "64-true"}
CPU_PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "64-true")
# What Lightning's ModelParallelStrategy (FSDP2) accepts.
FSDP2_PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-true")


class PrecisionError(ConfigError):
    """A ``trainer.precision`` the hardware or strategy cannot run; the message lists the ones it can."""


def normalize_precision(precision: str | int) -> str:
    """Lightning's full name of a precision (``"bf16"`` -> ``"bf16-mixed"``, ``32`` -> ``"32-true"``)."""
    name = _PRECISION_ALIASES.get(str(precision), str(precision))
    if name not in PRECISIONS:
        raise PrecisionError(f"trainer.precision={precision} is unknown; choose one of: {', '.join(PRECISIONS)}")
    return name


def _device_type(accelerator: Any) -> str | None:
    """The torch device type an accelerator setting runs on ("cpu", "cuda", "mps"), None if not known here."""
    if accelerator in (None, "auto"):
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    return {"cpu": "cpu", "gpu": "cuda", "cuda": "cuda", "mps": "mps"}.get(str(accelerator))


def _is_fsdp2(strategy: Any) -> bool:
    """Whether a strategy setting (a name or a config node) is FSDP2, which limits the precisions."""
    target = strategy.get("_target_", "") if isinstance(strategy, Mapping) else ""
    return target.rsplit(".", 1)[-1] in (FSDP2Strategy.__name__, ModelParallelStrategy.__name__)


def _has_bf16() -> bool:
    """Whether the current GPU computes in bfloat16 natively (Ampere and newer), not by emulation."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


def check_precision(precision: str | int, accelerator: Any = "auto", strategy: Any = None) -> str:
    """Fail early, in one line, on a precision that the accelerator or strategy cannot run.

    Lightning itself would silently turn ``16-mixed`` on a CPU into ``bf16-mixed``, or fail
    late (after data preparation). ``accelerator`` and ``strategy`` are the Trainer/Fabric
    settings (a strategy name or a config node with ``_target_``). Returns the full
    precision name.
    """
    name = normalize_precision(precision)
    device = _device_type(accelerator)
    allowed, where = PRECISIONS, ""
    if device == "cpu":
        allowed, where = CPU_PRECISIONS, "on a CPU (float16 needs a GPU)"
    elif device == "cuda" and torch.cuda.is_available() and not _has_bf16():
        allowed = tuple(p for p in PRECISIONS if not p.startswith("bf16"))
        where = f"on {torch.cuda.get_device_name()} (no bfloat16)"
    if _is_fsdp2(strategy):
        allowed = tuple(p for p in allowed if p in FSDP2_PRECISIONS)
        where = f"{where} with trainer=fsdp".strip()
    if name not in allowed:
        raise PrecisionError(f"trainer.precision={name} cannot run {where}; choose one of: {', '.join(allowed)}")
    return name


def mixed_precision_dtypes(precision: str | int) -> tuple[torch.dtype | None, torch.dtype | None]:
    """FSDP2 ``MixedPrecisionPolicy`` dtypes ``(param_dtype, reduce_dtype)`` for a Lightning precision.

    Mixed precisions gather parameters in 16 bits and reduce gradients in fp32; the
    ``-true`` precisions already store parameters in their dtype, so they need no policy
    (``(None, None)``).
    """
    name = normalize_precision(precision)
    if name == "bf16-mixed":
        return torch.bfloat16, torch.float32
    if name == "16-mixed":
        return torch.float16, torch.float32
    return None, None


def transformer_blocks(net: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a network (the GPT's ``net.blocks``); empty for one without (the LSTM)."""
    blocks = getattr(net, "blocks", None)
    return list(blocks) if isinstance(blocks, nn.ModuleList) else []


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
    from torch.distributed._composable import checkpoint

    for block in blocks:
        if activation_checkpointing:
            checkpoint(block)
        if compile_blocks:
            block.compile()


def is_sharded(net: nn.Module) -> bool:
    """Whether ``net`` was sharded with FSDP2 (its forward then needs every rank)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(net, FSDPModule)


def shard_model(
    net: LanguageModel,
    device_mesh: Any,
    *,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
    activation_checkpointing: bool = False,
    compile_blocks: bool = False,
) -> LanguageModel:
    """Shard ``net`` in place with FSDP2 (``fully_shard``) over the 1-D data-parallel ``device_mesh``.

    Each transformer block becomes its own unit (gathered just before it runs, freed after),
    then the root takes the remaining parameters (embeddings, final norm, head). A network
    without blocks, such as the LSTM, is one unit: its memory at rest is sharded, and the
    whole model is gathered for each forward. The block options are applied first (see
    :func:`apply_block_options`). ``param_dtype``/``reduce_dtype`` come from
    :func:`mixed_precision_dtypes`. Returns ``net``, now also an ``FSDPModule``.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    apply_block_options(net, activation_checkpointing=activation_checkpointing, compile_blocks=compile_blocks)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block in transformer_blocks(net):
        fully_shard(block, mesh=device_mesh, mp_policy=policy)
    fully_shard(net, mesh=device_mesh, mp_policy=policy)
    # Generation runs forward_step rather than forward: gather the root's parameters for it too.
    register_fsdp_forward_method(net, "forward_step")
    return net


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` as plain FSDP2: every process in one data-parallel group.

    Unlike Lightning's ``FSDPStrategy`` it also runs on CPUs (gloo). The LightningModule shards
    itself in ``configure_model`` (see :func:`shard_model`). Keyword arguments go to
    ``ModelParallelStrategy`` (e.g. ``save_distributed_checkpoint``).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


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
