"""Optimizers and learning-rate schedules shared by the Trainer and the Fabric loops.

Both are built from Hydra configs with the network passed in at call time:
``build_optimizer(cfg.optimizer, net, precision)`` and ``instantiate(cfg.scheduler, optimizer=opt)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from hydra.utils import instantiate
from torch import nn

from lmforge.models.base import LanguageModel
from lmforge.training.muon import Muon


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name}={value} must be > 0; set e.g. {name}=1e-3")


def weight_decay_groups(model: LanguageModel, weight_decay: float, exclude: set[str] = frozenset()) -> list[dict]:
    """Split parameters into a decayed group (matrices) and a non-decayed one.

    Matrices (``ndim >= 2``) are decayed, except those the model lists in
    ``no_weight_decay_param_names()`` (e.g. a learned position table); biases,
    norm gains and other vectors are not. Parameters named in ``exclude`` are left out.
    """
    excluded = model.no_weight_decay_param_names()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad or name in exclude:
            continue
        (decay if param.ndim >= 2 and name not in excluded else no_decay).append(param)
    return [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(config: Any, model: nn.Module, precision: str) -> torch.optim.Optimizer:
    """Instantiate an optimizer config for ``model`` trained at ``precision``.

    An automatic ``fused: null`` becomes ``False`` under mixed precision: a fused kernel
    unscales gradients itself, which Lightning's gradient clipping cannot work with.
    """
    overrides = {"fused": False} if "fused" in config and config["fused"] is None and "mixed" in str(precision) else {}
    return instantiate(config, model=model, **overrides)


def gradient_norm(parameters: Iterable[nn.Parameter]) -> torch.Tensor | None:
    """Total 2-norm of the gradients of ``parameters`` as a plain tensor; ``None`` when none has a gradient.

    Under FSDP2 the gradients are sharded DTensors: the norm is reduced over all shards.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return None
    norm = torch.nn.utils.get_total_norm(grads)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def adamw(
    model: nn.Module,
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only.

    ``fused=None`` picks PyTorch's fused kernel when every parameter is a plain CPU or CUDA
    float tensor (several times faster than the per-tensor loop PyTorch falls back to on CPU).
    """
    _check_positive("optimizer.lr", lr)
    if weight_decay < 0:
        raise ValueError(f"optimizer.weight_decay={weight_decay} must be >= 0")
    if fused is None:
        fused = all(_fusable(p) for p in model.parameters())
    return torch.optim.AdamW(weight_decay_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps, fused=fused)


def _fusable(param: torch.Tensor) -> bool:
    plain = type(param.data) is torch.Tensor  # not a DTensor shard
    return plain and param.device.type in ("cpu", "cuda") and param.is_floating_point()


def muon(
    model: LanguageModel,
    lr: float = 0.02,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    ns_dtype: str = "float32",
    muon_weight_decay: float = 0.0,
    adamw_lr: float = 1e-3,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
) -> Muon:
    """Muon (``lr``, ``momentum``) on the hidden matrices, AdamW (``adamw_lr``) on the rest.

    The optimizer's base learning rate is ``adamw_lr``: a scheduler's ``min_lr`` is relative
    to it, and the Muon group decays by the same factor.
    """
    _check_positive("optimizer.lr", lr)
    _check_positive("optimizer.adamw_lr", adamw_lr)
    hidden = model.hidden_matrix_names()
    if not hidden:
        raise ValueError(f"{type(model).__name__} has no hidden matrices for Muon; use optimizer=adamw")
    named = dict(model.named_parameters())
    muon_group = {
        "name": "muon",
        "params": [named[n] for n in sorted(hidden)],
        "use_muon": True,
        "lr": lr,
        "weight_decay": muon_weight_decay,
    }
    rest = [g for g in weight_decay_groups(model, weight_decay, exclude=hidden) if g["params"]]
    return Muon(
        [muon_group, *rest],
        lr=adamw_lr,
        betas=tuple(betas),
        eps=eps,
        momentum=momentum,
        nesterov=nesterov,
        ns_steps=ns_steps,
        ns_dtype=ns_dtype,
    )


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    max_steps: int,
    warmup_steps: int = 0,
    min_lr: float = 0.0,
    decay: str = "cosine",
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup for ``warmup_steps`` optimizer steps, then cosine decay to ``min_lr``.

    ``decay="constant"`` keeps the learning rate flat after warmup. ``min_lr`` is
    relative to the optimizer's default ``lr``; every parameter group is scaled by
    the same factor, so groups with their own learning rate decay proportionally.
    The scheduler must be stepped once per optimizer step.
    """
    if max_steps is None or max_steps <= 0:
        raise ValueError(
            f"trainer.max_steps={max_steps} must be > 0 for an LR schedule; set e.g. trainer.max_steps=2000"
        )
    if warmup_steps < 0:
        raise ValueError(f"scheduler.warmup_steps={warmup_steps} must be >= 0")
    if warmup_steps > max_steps:
        raise ValueError(
            f"scheduler.warmup_steps={warmup_steps} is larger than trainer.max_steps={max_steps}; "
            "lower the warmup or train longer"
        )
    if decay not in ("cosine", "constant"):
        raise ValueError(f"scheduler.decay={decay!r} is unknown; use 'cosine' or 'constant'")
    base_lr = optimizer.defaults["lr"]
    if not 0 <= min_lr <= base_lr:
        raise ValueError(f"scheduler.min_lr={min_lr} must be between 0 and the optimizer lr ({base_lr})")
    floor = min_lr / base_lr

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if decay == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
