"""A global batch in tokens: the same optimization on 1 CPU or 64 GPUs.

``data.batch_size`` windows of ``data.block_size`` tokens are one micro-batch of one process. With
``data.global_batch_tokens`` the batch of an optimizer step is given for the whole job instead,
and lmforge derives the gradient accumulation for the number of data-parallel processes (all of
them, except that a tensor-parallel group of processes reads one batch together):

    accumulate_grad_batches = global_batch_tokens / (batch_size * block_size * data_parallel_size)

``trainer.max_tokens`` gives the run's length as a token budget: ``max_steps = max_tokens //
global_batch_tokens``. Both loops apply the plan the same way (:func:`apply_batch_plan`, called by
:func:`lmforge.training.run.check_run`), and the training windows are drawn by their index in the
global order (:class:`lmforge.data.windows.TrainWindows`), so equal global batches see the same
windows whatever the number of processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from lmforge.errors import ConfigError

# Trainer settings that lmforge turns into others before the Trainer or the Fabric loop sees them.
PLANNED_SETTINGS = ("max_tokens",)


@dataclass
class BatchPlan:
    """How a global batch splits into micro-batches across processes and accumulation steps."""

    micro_batch_tokens: int  # per process and micro-batch: batch_size * block_size
    data_parallel_size: int  # processes (tensor-parallel groups) reading distinct batches
    accumulate_grad_batches: int
    max_steps: int

    @property
    def global_batch_tokens(self) -> int:
        return self.micro_batch_tokens * self.data_parallel_size * self.accumulate_grad_batches

    def describe(self) -> str:
        return (
            f"global batch {self.global_batch_tokens} tokens = {self.micro_batch_tokens} tokens per micro-batch "
            f"x {self.data_parallel_size} data-parallel process(es) x {self.accumulate_grad_batches} "
            "accumulation step(s); "
            f"{self.max_steps} optimizer steps = {self.max_steps * self.global_batch_tokens} tokens"
        )


def planned_world_size(trainer_cfg: DictConfig) -> int:
    """The number of processes of this job: ``WORLD_SIZE`` in a launched process (torchrun, ``fabric
    run``, the Trainer's own launcher), else what the trainer settings ask for (``devices`` x
    ``num_nodes``). ``devices: auto`` (or -1) is every GPU where the accelerator uses them, else one
    process, as Lightning counts them; a list of device ids counts its entries.
    """
    if os.environ.get("WORLD_SIZE", "").isdigit():
        return int(os.environ["WORLD_SIZE"])
    devices, nodes = trainer_cfg.get("devices", 1), int(trainer_cfg.get("num_nodes", 1) or 1)
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if devices in ("auto", -1):
        uses_gpu = trainer_cfg.get("accelerator", "auto") in ("auto", "gpu", "cuda") and torch.cuda.is_available()
        count = torch.cuda.device_count() if uses_gpu else 1
    elif isinstance(devices, int):
        count = devices
    else:  # a list or a comma-separated string of device ids
        count = len([d for d in (devices.split(",") if isinstance(devices, str) else devices) if str(d).strip()])
    return max(1, count) * nodes


def planned_data_parallel_size(trainer_cfg: DictConfig) -> int:
    """The processes of this job (:func:`planned_world_size`) that read distinct batches: one per
    tensor-parallel group (``trainer.strategy.tensor_parallel_size`` of the Trainer's ``trainer=tp`` /
    ``fsdp_tp``, ``trainer.tensor_parallel_size`` of the Fabric loop's ``strategy=fsdp``)."""
    world_size = planned_world_size(trainer_cfg)
    strategy = trainer_cfg.get("strategy")
    if isinstance(strategy, DictConfig):
        size = strategy.get("tensor_parallel_size", 1)
    else:
        size = trainer_cfg.get("tensor_parallel_size", 1) if strategy == "fsdp" else 1
    if size == "auto":  # every process of a node
        return int(trainer_cfg.get("num_nodes", 1) or 1)
    return max(1, world_size // int(size))


def plan_batches(
    global_batch_tokens: int | None,
    max_tokens: int | None,
    micro_batch_tokens: int,
    data_parallel_size: int,
    accumulate_grad_batches: int,
    max_steps: int | None,
) -> BatchPlan:
    """The accumulation and run length for a global batch and token budget (each optional)."""
    per_accumulation_step = micro_batch_tokens * data_parallel_size
    if global_batch_tokens is not None:
        if accumulate_grad_batches != 1:
            raise ConfigError(
                f"data.global_batch_tokens={global_batch_tokens} sets trainer.accumulate_grad_batches itself; "
                f"remove trainer.accumulate_grad_batches={accumulate_grad_batches}"
            )
        if global_batch_tokens < 1 or global_batch_tokens % per_accumulation_step:
            lower = max(1, global_batch_tokens // per_accumulation_step) * per_accumulation_step
            raise ConfigError(
                f"data.global_batch_tokens={global_batch_tokens} is not a multiple of the {per_accumulation_step} "
                f"tokens of one micro-batch on every data-parallel process "
                f"({micro_batch_tokens} x {data_parallel_size}); "
                f"use {lower} or {lower + per_accumulation_step}, or change data.batch_size / data.block_size"
            )
        accumulate_grad_batches = global_batch_tokens // per_accumulation_step
    step_tokens = per_accumulation_step * accumulate_grad_batches
    if max_tokens is not None:
        if max_tokens < step_tokens:
            raise ConfigError(
                f"trainer.max_tokens={max_tokens} is less than one optimizer step of {step_tokens} tokens; "
                f"set it to at least {step_tokens}"
            )
        max_steps = max_tokens // step_tokens
    return BatchPlan(micro_batch_tokens, data_parallel_size, accumulate_grad_batches, max_steps or 0)


def apply_batch_plan(cfg: DictConfig) -> BatchPlan | None:
    """Turn ``data.global_batch_tokens`` and ``trainer.max_tokens`` into ``trainer.accumulate_grad_batches``
    and ``trainer.max_steps`` in ``cfg`` (in place); None when neither is set."""
    global_batch_tokens = cfg.data.get("global_batch_tokens")
    max_tokens = cfg.trainer.get("max_tokens")
    with open_dict(cfg):
        for key in PLANNED_SETTINGS:
            cfg.trainer.pop(key, None)
    if global_batch_tokens is None and max_tokens is None:
        return None
    plan = plan_batches(
        global_batch_tokens,
        max_tokens,
        micro_batch_tokens=int(cfg.data.batch_size) * int(cfg.data.block_size),
        data_parallel_size=planned_data_parallel_size(cfg.trainer),
        accumulate_grad_batches=int(cfg.trainer.get("accumulate_grad_batches", 1)),
        max_steps=cfg.trainer.get("max_steps"),
    )
    with open_dict(cfg):
        cfg.trainer.accumulate_grad_batches = plan.accumulate_grad_batches
        cfg.trainer.max_steps = plan.max_steps
    return plan


def trainer_settings(trainer_cfg: DictConfig) -> dict[str, Any]:
    """The trainer config without the settings lmforge plans itself (for building a Trainer outside a run)."""
    settings = OmegaConf.to_container(trainer_cfg, resolve=True)
    return {key: value for key, value in settings.items() if key not in PLANNED_SETTINGS}
