"""The life of a training run, one implementation for ``lmforge train`` and ``lmforge fabric``.

1. :func:`check_run`: start-up extras, the batch plan (a global batch in tokens and a token
   budget become accumulation and steps, :mod:`lmforge.training.batching`), the ``init_from``
   source (its architecture replaces ``model``), every config check (data, network, optimizer,
   schedule, precision on this hardware, shared run settings) and the resume checks (``ckpt_path`` resolved, readable,
   written by this loop, the same network); nothing is written yet.
2. :func:`prepare_run`: seeding, data preparation (the tokenizer decides the vocabulary, unless
   ``init_from`` brings one), the resume checkpoint's tokenizer against the data's, the
   network's config and the metadata that every checkpoint carries
   (:func:`lmforge.training.checkpoint.checkpoint_metadata`).
3. The loop builds the network (:func:`load_initial_weights`) and trains: the Lightning Trainer
   (:mod:`lmforge.cli.train`) or the Fabric loop (:mod:`lmforge.fabric.loop`), logging on the
   steps :func:`is_logging_step` names.
4. :func:`finish_run`: a text sample (on task data, a validation prompt answered) and the summary
   table on rank 0.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from tokenizers import Tokenizer

from lmforge.data.datamodule import ServedData
from lmforge.data.sources import is_url
from lmforge.data.tasks import pretrained_chat_template
from lmforge.errors import CheckpointError, ConfigError
from lmforge.training.batching import apply_batch_plan
from lmforge.training.checkpoint import (
    check_model_matches,
    check_tokenizer_matches,
    checkpoint_metadata,
    loop_of,
    newest_matching_checkpoint,
    read_checkpoint,
    resolve_checkpoint,
)
from lmforge.training.config import apply_extras, build_datamodule, model_config, to_container
from lmforge.training.generation import generate_sample
from lmforge.training.initialization import RUN_SETTINGS, InitialWeights, read_initial_weights
from lmforge.training.mirror import RunDirMirror, local_log_dir, remote_run_dir
from lmforge.training.network import LORA_KEY
from lmforge.training.parallel import is_sharded, is_tensor_parallel, shut_down_process_group
from lmforge.training.report import print_run_summary
from lmforge.training.run_dir import is_rank_zero_process
from lmforge.training.task_eval import task_sample
from lmforge.training.validation import check_run_config

COMMANDS = {"train": "lmforge train", "fabric": "lmforge fabric"}


@dataclass
class Resume:
    """The checkpoint a run resumes from, already checked against the config."""

    path: str
    checkpoint: dict[str, Any]


@dataclass
class Start:
    """Where a run's weights come from, found and checked in step 1."""

    resume: Resume | None = None  # ckpt_path: weights, optimizer and loop state
    init: InitialWeights | None = None  # init_from: architecture, tokenizer and (unless resuming) weights


@dataclass
class Run:
    """What a prepared run hands to its loop."""

    cfg: DictConfig
    loop: str
    datamodule: ServedData  # a corpus (LMDataModule) or task data (SFTDataModule)
    net_config: dict
    metadata: dict  # checkpoint["lmforge"] of every checkpoint this run writes
    resume: Resume | None = None
    init: InitialWeights | None = None
    mirror: RunDirMirror | None = None  # rank 0's upload of the run directory when paths.log_dir is a URL

    @property
    def resume_from(self) -> str | None:
        return self.resume.path if self.resume else None

    @property
    def tokenizer(self) -> Tokenizer:
        return self.datamodule.tokenizer

    @property
    def hyperparameters(self) -> dict:
        """What TensorBoard's HParams tab lists for the run: network, optimizer, schedule, data (and LoRA)."""
        settings = {
            "model": self.net_config,
            "optimizer": to_container(self.cfg.optimizer),
            "scheduler": to_container(self.cfg.get("scheduler")),
            "data": self.metadata.get("data") or {},
            "lora": to_container(self.cfg.get("lora")),
        }
        return {key: value for key, value in settings.items() if value is not None}


@dataclass
class RunResult:
    """What the summary reports at the end of a run."""

    metrics: dict[str, float] = field(default_factory=dict)
    tokens_per_sec: float | None = None
    best_checkpoint: str | None = None
    last_checkpoint: str | None = None
    tensorboard_dir: str | None = None


def is_logging_step(step: int, every: int, max_steps: int | None) -> bool:
    """Whether the training values of optimizer step ``step`` (counted from 1) are logged: every
    ``every`` steps (the Trainer's ``log_every_n_steps``), and the last step, so that the run's
    final train loss is known."""
    return (every > 0 and step % every == 0) or step == max_steps


def check_run(cfg: DictConfig, loop: str) -> Start:
    """Step 1: check everything that can be checked before data is prepared or a file is written."""
    apply_extras(cfg)
    plan = apply_batch_plan(cfg)
    init = _initial_weights(cfg)
    if cfg.get("lora"):  # adapters are part of the network: its config carries them (lmforge.training.network)
        with open_dict(cfg):
            cfg.model[LORA_KEY] = cfg.lora
    check_run_config(cfg)
    start = Start(_resume_checkpoint(cfg, loop), init)
    if plan is not None and is_rank_zero_process():
        print(plan.describe())
    return start


def _initial_weights(cfg: DictConfig) -> InitialWeights | None:
    """The ``init_from`` source, whose architecture replaces ``cfg.model`` (all but the run settings)."""
    source = cfg.get("init_from")
    if not source:
        return None
    log_dir = local_log_dir(cfg.paths.log_dir) / cfg.task_name
    init = read_initial_weights(
        str(source), cfg.data.block_size, log_dir, cfg.allow_unsafe_checkpoint, cfg.model.get("_target_")
    )
    architecture = dict(init.net_config)
    for key in RUN_SETTINGS:  # e.g. fine-tuning may want another dropout than pretraining
        if key in cfg.model:
            architecture[key] = cfg.model[key]
    with open_dict(cfg):
        cfg.model = OmegaConf.create(architecture)
        if "chat_template" in cfg.data and cfg.data.chat_template is None:
            # task data renders chat rows as the pretrained chat model was trained to read them
            cfg.data.chat_template = pretrained_chat_template(init.source)
    return init


def _resume_checkpoint(cfg: DictConfig, loop: str) -> Resume | None:
    """The checkpoint named by ``ckpt_path``: a file, a run directory, a sharded directory or ``last``
    (the newest checkpoint of this task with this run's network and data)."""
    allow_unsafe = cfg.allow_unsafe_checkpoint
    if str(cfg.get("ckpt_path")) == "last":
        search_dir = local_log_dir(cfg.paths.log_dir) / cfg.task_name
        path = str(
            newest_matching_checkpoint(search_dir, to_container(cfg.model), to_container(cfg.data), allow_unsafe)
        )
    else:
        path = resolve_checkpoint(cfg.get("ckpt_path"), local_log_dir(cfg.paths.log_dir) / cfg.task_name)
    if path is None:
        return None
    checkpoint = read_checkpoint(path, allow_unsafe)
    written_by = loop_of(checkpoint)
    if written_by != loop:
        raise CheckpointError(
            f"checkpoint {path} was written by {COMMANDS[written_by]}, whose optimizer and loop state "
            f"{COMMANDS[loop]} cannot resume; resume it with {COMMANDS[written_by]}, or evaluate it with "
            "lmforge eval / lmforge generate"
        )
    check_model_matches(checkpoint, to_container(cfg.model), path)
    return Resume(path, checkpoint)


def prepare_run(cfg: DictConfig, start: Start, loop: str) -> Run:
    """Step 2: seed, prepare the data and describe the network; same order in both loops, so the same
    seed gives the same weights and batches."""
    L.seed_everything(cfg.seed, workers=True)
    init, resume = start.init, start.resume
    pretrained_tokenizer = init.tokenizer_json if init is not None else None
    datamodule = build_datamodule(cfg.data, tokenizer_json=pretrained_tokenizer)
    datamodule.prepare_data()  # before the model: the tokenizer decides the vocabulary size
    if resume is not None:
        check_tokenizer_matches(resume.checkpoint, datamodule.tokenizer_json, resume.path)
    vocab_size = datamodule.vocab_size
    if init is not None:
        vocab_size = init.net_config["vocab_size"]
        if datamodule.vocab_size > vocab_size:
            raise ConfigError(
                f"the data's tokenizer has {datamodule.vocab_size} tokens but init_from={init.source} embeds only "
                f"{vocab_size}; use the model's own tokenizer (a tokenizer.json in its directory)"
            )
    net_config = model_config(cfg.model, vocab_size)
    metadata = checkpoint_metadata(loop, net_config, datamodule.tokenizer_json, to_container(cfg.data))
    return Run(cfg, loop, datamodule, net_config, metadata, resume, init, _start_mirror(cfg))


def _start_mirror(cfg: DictConfig) -> RunDirMirror | None:
    """Rank 0 of a run whose ``paths.log_dir`` is a URL starts mirroring its run directory there."""
    log_dir = str(cfg.paths.log_dir)
    if not is_url(log_dir) or not is_rank_zero_process():
        return None
    run_dir = Path(cfg.paths.output_dir)
    url = remote_run_dir(log_dir, run_dir, cfg.task_name)
    return RunDirMirror(run_dir, url, float(cfg.paths.sync_every_seconds)).start()


def load_initial_weights(run: Run, net: torch.nn.Module) -> None:
    """Put the ``init_from`` weights into the freshly built network (before it is sharded or wrapped).

    A resumed run skips this: its checkpoint holds newer weights. The weights are dropped afterwards.
    """
    if run.init is None or run.resume is not None:
        return
    net.load_state_dict(run.init.weights)
    run.init.weights = {}
    if is_rank_zero_process():
        print(f"initialized from {run.init.source}: its architecture, tokenizer and weights; step 0, new optimizer")


def finish_run(
    run: Run, net: torch.nn.Module, device: torch.device | str, is_global_zero: bool, result: RunResult
) -> None:
    """Step 4: rank 0 prints the summary with a text sample (a sharded network samples on every rank; a
    tensor-parallel one cannot split a prompt over its processes and leaves it to ``lmforge generate``),
    then the processes of a distributed run end together (:func:`shut_down_process_group`)."""
    sample = None
    if (is_global_zero or is_sharded(net)) and not is_tensor_parallel(net):
        sample = task_sample(net, run.datamodule, device)
        if sample is None:
            sample = generate_sample(net, run.tokenizer, run.cfg.sample, device)
    if is_global_zero:
        print_run_summary(
            result.metrics,
            result.tokens_per_sec,
            best_checkpoint=result.best_checkpoint,
            last_checkpoint=result.last_checkpoint,
            tensorboard_dir=result.tensorboard_dir,
            sample=sample,
        )
    if run.mirror is not None:
        _close_mirror(run.mirror)
    shut_down_process_group()


def _close_mirror(mirror: RunDirMirror) -> None:
    """Upload the rest of the run directory; a store that refuses leaves the run's local copy and one line."""
    try:
        mirror.close()
    except Exception as exc:
        print(
            f"warning: could not upload the run directory to {mirror.url} ({exc}); it is complete in {mirror.local}",
            file=sys.stderr,
        )
    else:
        print(f"run directory uploaded to {mirror.url}")
