"""Train with your own loop on Lightning Fabric (``lmforge fabric``).

The run lifecycle (checks, data, resume, checkpoint metadata, summary), the model, loss,
optimizer, schedule and data are those of ``lmforge train`` (:mod:`lmforge.training`); what is
this loop's own is plain code: gradient accumulation, clipping, a per-step LR schedule,
periodic validation, logging, throughput, and checkpoints (model, optimizer, scheduler, step)
that resume exactly. As in ``lmforge train``, a NaN or infinite loss stops training (or skips
the update), SIGTERM or Ctrl-C saves a resumable checkpoint before exiting, and the ``debug``
modes (``fdr``, ``overfit``, ``profiler``) apply.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, fields
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.fabric.loggers import TensorBoardLogger
from lightning.fabric.strategies import DDPStrategy, ModelParallelStrategy
from lightning.fabric.utilities.throughput import ThroughputMonitor
from omegaconf import DictConfig
from torchmetrics import MeanMetric

from lmforge.errors import ConfigError
from lmforge.training.batching import PLANNED_SETTINGS
from lmforge.training.config import instantiate_all
from lmforge.training.loggers import log_final_hparams
from lmforge.training.loss import batch_loss, loss_and_perplexity
from lmforge.training.network import build_network
from lmforge.training.optim import build_optimizer, gradient_norm
from lmforge.training.parallel import (
    count_groups_as_devices,
    data_parallel_groups,
    data_parallel_rank,
    limit_cpu_threads,
    reshard,
    shard_model,
)
from lmforge.training.precision import mixed_precision_dtypes
from lmforge.training.report import describe_network
from lmforge.training.run import (
    Run,
    RunResult,
    check_run,
    finish_run,
    is_logging_step,
    load_initial_weights,
    prepare_run,
)
from lmforge.training.safety import AtomicCheckpointIO, NonFiniteLossPolicy, StopSignals, report_interruption
from lmforge.training.task_eval import TaskScores, log_answers, validate_task

Batch = tuple[torch.Tensor, torch.Tensor]

# The `trainer` settings that say how Fabric runs; `fabric run --<flag>` passes them to each process as LT_<NAME>.
HARDWARE_SETTINGS = ("accelerator", "strategy", "devices", "num_nodes", "precision")
# Processes per tensor-parallel group under strategy=fsdp (fabric run has no flag for it).
TENSOR_PARALLEL_SETTING = "tensor_parallel_size"


@dataclass(frozen=True)
class LoopSettings:
    """The loop's part of the ``trainer`` node of ``configs/fabric.yaml``; every count is in optimizer steps.

    ``fast_dev_run`` (``debug=fdr``) runs one step and one validation batch and writes no logs or
    checkpoints; ``profiler`` (``debug=profiler``) is a Lightning profiler config timing the
    loop's phases.
    """

    max_steps: int
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    val_check_interval: int = 150
    log_every_n_steps: int = 25
    checkpoint_every_n_steps: int = 100
    fast_dev_run: bool = False
    profiler: Any = None

    @classmethod
    def from_config(cls, node: DictConfig) -> LoopSettings:
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(node) - known - {*HARDWARE_SETTINGS, *PLANNED_SETTINGS, TENSOR_PARALLEL_SETTING})
        if unknown:
            raise ConfigError(
                f"trainer.{unknown[0]} is a Lightning Trainer setting the Fabric loop does not have; remove it "
                f"(the loop's settings: {', '.join(sorted(known | set(HARDWARE_SETTINGS)))})"
            )
        settings = cls(**{name: node[name] for name in known if name in node})
        for name in ("max_steps", "accumulate_grad_batches", "val_check_interval", "log_every_n_steps",
                     "checkpoint_every_n_steps"):  # fmt: skip
            if not isinstance(getattr(settings, name), int) or getattr(settings, name) < 1:
                raise ConfigError(f"trainer.{name}={getattr(settings, name)} must be an integer >= 1")
        if settings.gradient_clip_val is not None and not settings.gradient_clip_val > 0:
            raise ConfigError(
                f"trainer.gradient_clip_val={settings.gradient_clip_val} must be > 0, or null for no clipping"
            )
        return settings

    @property
    def steps(self) -> int:
        return 1 if self.fast_dev_run else self.max_steps


def launched_by_cli() -> bool:
    """Whether ``fabric run`` started this process: it has created the processes, so no ``launch()``."""
    return bool(int(os.environ.get("LT_CLI_USED", "0")))


def hardware_settings(trainer_cfg: DictConfig) -> dict[str, Any]:
    """Fabric's hardware settings from the ``trainer`` node; under ``fabric run`` its flags win."""
    settings = {name: trainer_cfg[name] for name in HARDWARE_SETTINGS}
    if launched_by_cli():
        for name in HARDWARE_SETTINGS:
            settings[name] = os.environ.get(f"LT_{name.upper()}", settings[name])
    return settings


def fsdp_strategy(cfg: DictConfig, settings: dict[str, Any], timeout: timedelta) -> ModelParallelStrategy:
    """FSDP2 over data-parallel groups of ``trainer.tensor_parallel_size`` processes (1: every process in one
    data-parallel group), splitting and sharding with :func:`lmforge.training.parallel.shard_model`."""
    try:
        world_size = int(settings["devices"]) * int(settings["num_nodes"])
    except ValueError:
        raise ConfigError(
            f"trainer.strategy=fsdp needs a number of devices, not devices={settings['devices']!r}; "
            "set trainer.devices=<N> (or --devices=<N>)"
        ) from None
    tensor_parallel_size = cfg.trainer.get(TENSOR_PARALLEL_SETTING, 1)
    groups = data_parallel_groups(world_size, tensor_parallel_size, f"trainer.{TENSOR_PARALLEL_SETTING}")
    param_dtype, reduce_dtype = mixed_precision_dtypes(settings["precision"])
    options = {
        "param_dtype": param_dtype,
        "reduce_dtype": reduce_dtype,
        "activation_checkpointing": cfg.activation_checkpointing,
        "compile_blocks": cfg.compile_blocks,
    }

    def shard(net: torch.nn.Module, device_mesh: Any) -> torch.nn.Module:
        return shard_model(net, device_mesh, **options)

    return ModelParallelStrategy(
        parallelize_fn=shard,
        data_parallel_size=groups,
        tensor_parallel_size=tensor_parallel_size,
        timeout=timeout,
    )


def build_fabric(cfg: DictConfig, loop: LoopSettings) -> L.Fabric:
    """The Fabric of the ``trainer`` node (or of ``fabric run``'s flags) with the configured loggers.

    Objects in the ``callbacks`` node receive ``on_train_batch_end(fabric, step, loss)`` after
    each optimizer step and ``on_validation_results(fabric, step, metrics)`` after each validation.
    Checkpoint files are written atomically (:class:`~lmforge.training.safety.AtomicCheckpointIO`);
    under FSDP each rank writes its own shard. Under ``ddp`` and ``fsdp`` a collective that
    waits longer than ``process_group_timeout`` seconds fails the job.
    """
    settings = hardware_settings(cfg.trainer)
    plugins = [AtomicCheckpointIO()]
    timeout = timedelta(seconds=cfg.process_group_timeout)
    if settings["strategy"] == "fsdp":
        settings["strategy"], plugins = fsdp_strategy(cfg, settings, timeout), []
    elif settings["strategy"] == "ddp":
        settings["strategy"] = DDPStrategy(timeout=timeout)
    if not isinstance(settings["strategy"], str):
        # Fabric refuses a strategy object that differs from a --strategy flag; the object is that flag.
        os.environ.pop("LT_STRATEGY", None)
    return L.Fabric(
        **settings,
        plugins=plugins,
        loggers=[] if loop.fast_dev_run else instantiate_all(cfg.get("logger")),
        callbacks=instantiate_all(cfg.get("callbacks")),
    )


def accumulate_gradients(
    fabric: L.Fabric, model: torch.nn.Module, batches: Iterator[Batch], loop: LoopSettings, ignore_index: int
) -> torch.Tensor:
    """Forward and backward passes over ``accumulate_grad_batches`` micro-batches; returns their mean loss."""
    losses = []
    for micro_batch in range(loop.accumulate_grad_batches):
        # Gradients are all-reduced only in the backward pass of the last micro-batch.
        last = micro_batch == loop.accumulate_grad_batches - 1
        with fabric.no_backward_sync(model, enabled=not last):
            loss, _ = batch_loss(model, next(batches), ignore_index)
            fabric.backward(loss / loop.accumulate_grad_batches)
        losses.append(loss.detach())
    return torch.stack(losses).mean()


def optimizer_step(
    fabric: L.Fabric,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loop: LoopSettings,
    measure_grad_norm: bool,
) -> torch.Tensor | None:
    """Clip the gradients (if configured) and update; returns the gradient norm before clipping when asked."""
    norm = unscaled_gradient_norm(fabric, model) if measure_grad_norm else None
    if loop.gradient_clip_val is not None:
        fabric.clip_gradients(model, optimizer, max_norm=loop.gradient_clip_val)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def unscaled_gradient_norm(fabric: L.Fabric, model: torch.nn.Module) -> torch.Tensor | None:
    """The gradient norm, corrected for fp16 loss scaling (``16-mixed`` on GPUs)."""
    norm = gradient_norm(model.parameters())
    scaler = getattr(fabric.strategy.precision, "scaler", None)
    return norm / scaler.get_scale() if norm is not None and scaler is not None else norm


@torch.no_grad()
def evaluate(
    fabric: L.Fabric,
    model: torch.nn.Module,
    loader: Any,
    metric: MeanMetric,
    ignore_index: int,
    limit_batches: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-weighted mean loss over the loaders of all ranks (at most ``limit_batches`` each), and its perplexity.

    Ranks may hold one batch more than others, but a sharded (FSDP2) forward pass is a
    collective: a rank that has run out repeats its last batch without counting it.
    """
    num_batches = int(fabric.all_reduce(torch.tensor(len(loader), device=fabric.device), reduce_op="max"))
    batches, last_batch = iter(loader), None
    model.eval()
    for _ in range(min(num_batches, limit_batches or num_batches)):
        batch = next(batches, None)
        if batch is None:
            batch_loss(model, last_batch, ignore_index)
            continue
        loss, count = batch_loss(model, batch, ignore_index)
        metric.update(loss, weight=count)
        last_batch = batch
    model.train()
    return loss_and_perplexity(metric)


def fit(cfg: DictConfig) -> dict[str, float]:
    """Train (then test) the configured experiment with Fabric; returns the final metrics."""
    start = check_run(cfg, "fabric")  # before any process is started or any file is written
    loop = LoopSettings.from_config(cfg.trainer)
    fabric = build_fabric(cfg, loop)
    if not launched_by_cli():
        fabric.launch()
    # `fabric run` sets OMP_NUM_THREADS to all the cores in every process: share them out.
    threads = limit_cpu_threads(getattr(fabric.strategy, "num_processes", 1))
    fabric.print(
        f"{fabric.world_size} process(es), strategy {type(fabric.strategy).__name__}, {threads} CPU threads each"
    )
    return _train(fabric, prepare_run(cfg, start, "fabric"), loop)


def score_answers(
    fabric: L.Fabric, net: torch.nn.Module, datamodule: Any, split: str, scores: TaskScores, step: int
) -> dict[str, float]:
    """Task metrics of ``split`` (task data only), logged with a few answers as text; {} otherwise."""
    result = validate_task(net, datamodule, split, scores, fabric.global_rank, fabric.world_size, fabric.device)
    if result is None:
        return {}
    values, answered = result
    logged = {f"{split}/{key}": value for key, value in values.items()}
    fabric.log_dict(logged, step=step)
    if fabric.is_global_zero:
        log_answers(fabric.loggers, f"{split}/answers", answered, step)
    return logged


def _train(fabric: L.Fabric, run: Run, loop: LoopSettings) -> dict[str, float]:
    cfg, datamodule = run.cfg, run.datamodule
    net = build_network(run.net_config)
    load_initial_weights(run, net)
    flops_per_token = net.flops_per_token(datamodule.block_size)
    fabric.print(describe_network(net, datamodule.block_size))
    model = fabric.setup_module(net)
    # Optimizer after setup: FSDP2 replaces the parameters with sharded ones.
    optimizer = build_optimizer(cfg.optimizer, net, str(fabric.strategy.precision.precision))
    scheduler = instantiate(cfg.scheduler, optimizer=optimizer) if cfg.get("scheduler") else None
    optimizer = fabric.setup_optimizers(optimizer)

    # The scheduler travels as its state dict: Fabric restores objects other than the model and
    # optimizer in place from single-file checkpoints only, not from FSDP's sharded ones.
    state = {"model": model, "optimizer": optimizer, "scheduler": None, "step": 0, "skipped_steps": 0}
    if run.resume_from:
        fabric.load(run.resume_from, state, weights_only=not cfg.allow_unsafe_checkpoint)
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        fabric.print(f"resumed from {run.resume_from} at step {state['step']}")
    start_step = state["step"]
    nonfinite = NonFiniteLossPolicy(cfg.nonfinite_loss)
    nonfinite.skipped_steps = state["skipped_steps"]
    profiler = instantiate(loop.profiler) if loop.profiler else None
    if profiler is not None:
        profiler.setup("fit", local_rank=fabric.local_rank)

    def profile(action: str) -> Any:
        return profiler.profile(action) if profiler is not None else nullcontext()

    def loader(dataloader: torch.utils.data.DataLoader) -> Any:
        return fabric.setup_dataloaders(dataloader, use_distributed_sampler=False)  # each rank shards itself

    rank, world_size = data_parallel_rank(fabric.strategy)  # the data-parallel ones
    # Batches are a function of the micro-batch index, so a resumed run continues the same sequence.
    start_micro_batch = start_step * loop.accumulate_grad_batches
    batches = iter(loader(datamodule.train_loader(start_micro_batch, rank, world_size, loop.accumulate_grad_batches)))
    val_loader = loader(datamodule.eval_loader("val", rank, world_size))
    eval_batches = 1 if loop.fast_dev_run else None
    eval_loss = MeanMetric().to(fabric.device)
    task_scores = TaskScores()
    throughput = ThroughputMonitor(fabric, window_size=cfg.throughput.window_size)
    if cfg.throughput.peak_flops:
        throughput.available_flops = cfg.throughput.peak_flops
    count_groups_as_devices(throughput, fabric.strategy, fabric.world_size)
    tokens_per_step = datamodule.batch_size * datamodule.block_size * loop.accumulate_grad_batches  # on each rank
    checkpoint_dir = Path(cfg.paths.output_dir) / "checkpoints"
    metrics: dict[str, float] = {}
    last_checkpoint = None
    train_seconds = 0.0
    any_rank = partial(fabric.strategy.reduce_boolean_decision, all=False)  # a collective: every rank calls it
    signals = StopSignals()
    signals.install()
    try:
        for step in range(start_step, loop.steps):
            done = step + 1
            log_now = is_logging_step(done, loop.log_every_n_steps, loop.steps)
            lr = optimizer.param_groups[0]["lr"]
            started = time.perf_counter()
            with profile("training_step"):
                loss = accumulate_gradients(fabric, model, batches, loop, cfg.ignore_index)
                if any_rank(not torch.isfinite(loss).item()):
                    nonfinite.handle(step, last_checkpoint)  # raises, unless the action is skip
                    optimizer.zero_grad(set_to_none=True)
                    norm = None
                else:
                    norm = optimizer_step(fabric, model, optimizer, loop, log_now)
                if scheduler is not None:
                    scheduler.step()
            train_seconds += time.perf_counter() - started
            fabric.call("on_train_batch_end", fabric=fabric, step=done, loss=loss)

            steps_run = done - start_step
            throughput.update(
                time=train_seconds,
                batches=steps_run * loop.accumulate_grad_batches,
                samples=steps_run * loop.accumulate_grad_batches * datamodule.batch_size,
                lengths=steps_run * tokens_per_step,
                flops=flops_per_token * tokens_per_step,
            )
            if log_now:
                logged = {"train/loss": loss, "lr": lr, "train/tokens": float(done * tokens_per_step * world_size)}
                if norm is not None:
                    logged["train/grad_norm"] = norm
                if nonfinite.skipped_steps:
                    logged["train/skipped_steps"] = float(nonfinite.skipped_steps)
                logged.update({f"train/{key}": value for key, value in throughput.compute().items()})
                fabric.log_dict(logged, step=step)
                metrics["train/loss"] = loss.item()
                fabric.print(f"step {done}/{loop.steps}  train/loss {metrics['train/loss']:.4f}  lr {lr:.3g}")
            if done % loop.val_check_interval == 0 or done == loop.steps:
                with profile("validation"):
                    val_loss, val_ppl = evaluate(fabric, model, val_loader, eval_loss, cfg.ignore_index, eval_batches)
                    metrics.update(score_answers(fabric, net, datamodule, "val", task_scores, done))
                metrics.update({"val/loss": val_loss.item(), "val/ppl": val_ppl.item()})
                fabric.log_dict({"val/loss": val_loss, "val/ppl": val_ppl}, step=done)
                fabric.print(f"step {done}/{loop.steps}  val/loss {val_loss:.4f}  val/ppl {val_ppl:.2f}")
                fabric.call("on_validation_results", fabric=fabric, step=done, metrics=metrics)
            stop = signals.stop_now(any_rank)  # SIGTERM or Ctrl-C on any rank
            periodic = done % loop.checkpoint_every_n_steps == 0 or done == loop.steps
            if (stop or periodic) and not loop.fast_dev_run:
                scheduler_state = scheduler.state_dict() if scheduler is not None else None
                state.update(step=done, scheduler=scheduler_state, skipped_steps=nonfinite.skipped_steps)
                last_checkpoint = checkpoint_dir / f"step{done:06d}.ckpt"
                reshard(net)
                fabric.save(last_checkpoint, {**state, "lmforge": run.metadata})
            if stop:
                if fabric.is_global_zero:
                    report_interruption(signals.signum, done, last_checkpoint, "fabric")
                raise SystemExit(128 + signals.signum)
    finally:
        signals.uninstall()

    log_final_hparams(fabric.loggers, run.hyperparameters)
    if cfg.test:
        test_loader = loader(datamodule.eval_loader("test", rank, world_size))
        test_loss, test_ppl = evaluate(fabric, model, test_loader, eval_loss, cfg.ignore_index, eval_batches)
        metrics.update({"test/loss": test_loss.item(), "test/ppl": test_ppl.item()})
        fabric.log_dict({"test/loss": test_loss, "test/ppl": test_ppl}, step=loop.steps)
        metrics.update(score_answers(fabric, net, datamodule, "test", task_scores, loop.steps))
    for logger in fabric.loggers:
        logger.finalize("success")
    if profiler is not None:
        profiler.describe()

    tokens = (loop.steps - start_step) * tokens_per_step * world_size
    tensorboard = next((lg for lg in fabric.loggers if isinstance(lg, TensorBoardLogger)), None)
    result = RunResult(
        metrics=metrics,
        tokens_per_sec=tokens / train_seconds if train_seconds else None,
        last_checkpoint=str(last_checkpoint) if last_checkpoint else None,
        tensorboard_dir=tensorboard.log_dir if tensorboard else None,
    )
    finish_run(run, net, fabric.device, fabric.is_global_zero, result)
    return metrics
