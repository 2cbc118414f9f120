"""Which numeric precisions a run can use, checked before anything starts.

Lightning would silently turn ``16-mixed`` on a CPU into ``bf16-mixed``, or fail late (after data
preparation), and a CPU's bfloat16 support depends on the CPU and on the oneDNN kernels PyTorch
ships: the LSTM's bf16 kernel exists on some x86 CPUs and not on others (e.g. AMD EPYC Zen 3,
which has no AVX-512 or bf16 instructions). So the kernels a network needs are *run* once on a
tiny input (:func:`cpu_bf16_error`), never guessed from the CPU's name.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import PrecisionError

PRECISIONS = (
    "32-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true",
    "transformer-engine", "transformer-engine-float16",
)  # fmt: skip
# Lightning's short spellings of the precisions above.
_PRECISION_ALIASES = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed", "64": "64-true"}
CPU_PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "64-true")
# What FSDP2 (Lightning's ModelParallelStrategy) accepts.
FSDP2_PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-true")
# Strategy settings that mean FSDP2: the Trainer's config targets and the Fabric loop's name.
_FSDP2_STRATEGIES = ("FSDP2Strategy", "ModelParallelStrategy", "fsdp")


def normalize_precision(precision: str | int) -> str:
    """Lightning's full name of a precision (``"bf16"`` -> ``"bf16-mixed"``, ``32`` -> ``"32-true"``)."""
    name = _PRECISION_ALIASES.get(str(precision), str(precision))
    if name not in PRECISIONS:
        raise PrecisionError(f"trainer.precision={precision} is unknown; choose one of: {', '.join(PRECISIONS)}")
    return name


def device_type(accelerator: Any) -> str | None:
    """The torch device type an accelerator setting runs on ("cpu", "cuda", "mps"), None if not known here."""
    if accelerator in (None, "auto"):
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    return {"cpu": "cpu", "gpu": "cuda", "cuda": "cuda", "mps": "mps"}.get(str(accelerator))


def is_fsdp2(strategy: Any) -> bool:
    """Whether a strategy setting (a name or a config node with ``_target_``) is FSDP2."""
    name = strategy.get("_target_", "") if isinstance(strategy, Mapping) else str(strategy or "")
    return name.rsplit(".", 1)[-1] in _FSDP2_STRATEGIES


def _lstm_kernel(dtype_mode: str) -> None:
    lstm = nn.LSTM(8, 8, batch_first=True)
    _run_tiny(lstm, torch.randn(2, 3, 8), dtype_mode, lambda module, x: module(x)[0])


def _attention_kernels(dtype_mode: str) -> None:
    linear = nn.Linear(8, 8)

    def attend(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        q = module(x).view(2, 1, 3, 8)
        return F.scaled_dot_product_attention(q, q, q, is_causal=True)

    _run_tiny(linear, torch.randn(2, 3, 8), dtype_mode, attend)


def _run_tiny(module: nn.Module, x: torch.Tensor, dtype_mode: str, forward: Any) -> None:
    """Forward and backward of ``module`` in bf16: under autocast ("mixed"), or with bf16 weights ("true")."""
    if dtype_mode == "true":
        module, x = module.to(torch.bfloat16), x.to(torch.bfloat16)
    x.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype_mode == "mixed"):
        out = forward(module, x)
    out.float().sum().backward()


# Kernel family -> (does the network use it, the probe that runs it).
_CPU_BF16_PROBES = {
    "LSTM": (lambda net: any(isinstance(m, nn.LSTM) for m in net.modules()), _lstm_kernel),
    "matmul/attention": (lambda net: any(isinstance(m, nn.Linear) for m in net.modules()), _attention_kernels),
}


@functools.cache
def cpu_bf16_error(kernels: str, dtype_mode: str) -> str | None:
    """Run the bf16 ``kernels`` family once on this CPU; its error's first sentence, or None when it works.

    Cached per process: the probe costs a few milliseconds once.
    """
    try:
        _CPU_BF16_PROBES[kernels][1](dtype_mode)
    except RuntimeError as exc:  # oneDNN: "could not create a primitive descriptor for ... primitive. Run ..."
        return str(exc).strip().splitlines()[0].split(". ")[0][:160]
    return None


def check_cpu_bf16(precision: str, net: nn.Module) -> None:
    """Raise :class:`PrecisionError` when a bf16 ``precision`` cannot run ``net``'s kernels on this CPU."""
    dtype_mode = precision.removeprefix("bf16-")
    for kernels, (uses, _) in _CPU_BF16_PROBES.items():
        if uses(net) and (error := cpu_bf16_error(kernels, dtype_mode)):
            raise PrecisionError(
                f"trainer.precision={precision} cannot run {type(net).__name__} on this CPU: its bfloat16 "
                f"{kernels} kernel fails here ({error}); use trainer.precision=32-true"
            )


def check_precision(precision: str | int, accelerator: Any = "auto", strategy: Any = None, net: Any = None) -> str:
    """Fail early, in one line, on a precision that the accelerator, the strategy or the network cannot run.

    ``accelerator`` and ``strategy`` are the Trainer/Fabric settings (a strategy name or a config
    node with ``_target_``); ``net`` (e.g. built on the meta device) decides which bf16 kernels a
    CPU must have. Returns the full precision name.
    """
    name = normalize_precision(precision)
    device = device_type(accelerator)
    allowed, where = PRECISIONS, ""
    if device == "cpu":
        allowed, where = CPU_PRECISIONS, "on a CPU (float16 needs a GPU)"
    elif device == "cuda" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported(including_emulation=False):
        allowed = tuple(p for p in PRECISIONS if not p.startswith("bf16"))
        where = f"on {torch.cuda.get_device_name()} (no bfloat16)"
    if is_fsdp2(strategy):
        allowed = tuple(p for p in allowed if p in FSDP2_PRECISIONS)
        where = f"{where} with FSDP2".strip()
    if name not in allowed:
        raise PrecisionError(f"trainer.precision={name} cannot run {where}; choose one of: {', '.join(allowed)}")
    if device == "cpu" and name.startswith("bf16") and net is not None:
        check_cpu_bf16(name, net)
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
