"""Every option of every config group composes, and what it describes instantiates."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import OPTION_NEEDS, compose_config, write_task_data
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lmforge.data import LMDataModule, SFTDataModule
from lmforge.models.base import LanguageModel
from lmforge.training.batching import trainer_settings
from lmforge.training.config import CONFIG_PATH, build_datamodule, instantiate_all
from lmforge.training.run_dir import LABEL_CHARS, run_label

GROUPS = sorted(p.name for p in Path(CONFIG_PATH).iterdir() if p.is_dir() and p.name != "hydra")


def group_options() -> list[tuple[str, str]]:
    return [(group, option.stem) for group in GROUPS for option in sorted((Path(CONFIG_PATH) / group).glob("*.yaml"))]


@pytest.mark.parametrize("group,option", group_options(), ids=lambda v: str(v))
def test_group_option_composes_and_instantiates(group, option, tmp_path, corpus_dir):
    # [gpt]
    if (group, option) == ("trainer", "fsdp1") and not torch.cuda.is_available():
        # The config composes and its strategy builds; a Trainer with it needs CUDA.
        strategy = instantiate(compose_config("train", ["trainer=fsdp1"], tmp_path).trainer.strategy)
        assert type(strategy).__name__ == "FSDPStrategy"
        pytest.skip("trainer=fsdp1 (Lightning's FSDPStrategy) needs a CUDA GPU; this machine has none")
    # [/gpt]
    overrides = [f"{group}={option}"]
    if (group, option) == ("trainer", "gpu") and not torch.cuda.is_available():
        # Composes as written; the Trainer is built on the CPU because this machine has no GPU.
        overrides.append("trainer.accelerator=cpu")
    overrides += OPTION_NEEDS.get((group, option), [])
    cfg = compose_config("train", overrides, tmp_path)
    if OmegaConf.is_missing(cfg.data, "path"):
        # Your own files (data=text_files or data=sft, an experiment, or the default): test data.
        is_task_data = cfg.data._target_ == "lmforge.data.SFTDataModule"
        path = write_task_data(tmp_path / "tasks.jsonl") if is_task_data else corpus_dir
        cfg = compose_config("train", [*overrides, f"data.path={path}"], tmp_path)

    datamodule = build_datamodule(cfg.data)
    assert isinstance(datamodule, (LMDataModule, SFTDataModule))
    net = instantiate(cfg.model, vocab_size=97)
    assert isinstance(net, LanguageModel)
    logits = net(torch.zeros(2, min(8, cfg.data.block_size), dtype=torch.long))
    assert logits.shape[-1] == 97
    optimizer = instantiate(cfg.optimizer, model=net)
    assert isinstance(optimizer, torch.optim.Optimizer)
    scheduler = instantiate(cfg.scheduler, optimizer=optimizer)
    assert scheduler.get_last_lr()[0] > 0
    callbacks = instantiate_all(cfg.get("callbacks"))
    loggers = instantiate_all(cfg.get("logger"))
    trainer = instantiate(trainer_settings(cfg.trainer), callbacks=callbacks, logger=loggers)
    assert isinstance(trainer, L.Trainer)
    if group == "callbacks" and option == "default":
        assert trainer.checkpoint_callback is not None
    if group == "logger" and option != "none":
        assert trainer.loggers


@pytest.mark.parametrize("config_name", ["train", "eval", "generate", "prepare"])
def test_primary_configs_compose(config_name, tmp_path):
    cfg = compose_config(config_name, ["ckpt_path=x.ckpt"] if config_name in ("eval", "generate") else [], tmp_path)
    assert cfg.task_name == config_name
    assert str(tmp_path) in cfg.paths.log_dir


def test_every_target_exists():
    """Each `_target_` in the config tree points at an importable object."""
    import importlib

    import yaml

    for path in Path(CONFIG_PATH).rglob("*.yaml"):
        for target in _targets(yaml.safe_load(path.read_text()) or {}):
            module_name, _, attr = target.rpartition(".")
            assert hasattr(importlib.import_module(module_name), attr), f"{path}: {target}"


def _targets(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "_target_":
                yield value
            else:
                yield from _targets(value)
    elif isinstance(node, list):
        for value in node:
            yield from _targets(value)


def test_run_dirs_of_same_second_differ(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        first = compose("train", return_hydra_config=True).hydra.run.dir
        second = compose("train", return_hydra_config=True).hydra.run.dir
    assert first != second


def test_run_dirs_say_which_overrides_they_ran_with(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = ["optimizer.lr=0.002", f"paths.log_dir={tmp_path}", "data=text_files", f"data.path={tmp_path}/x.txt"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
        # Hydra sets job.override_dirname from the overrides when it launches a job
        cfg.hydra.job.override_dirname = "data.path=/somewhere/x.txt,data=text_files,optimizer.lr=0.002"
        run_dir = Path(OmegaConf.to_container(cfg.hydra.run, resolve=True)["dir"])
    assert run_dir.parent == tmp_path / "train" / "runs"
    assert run_dir.name.endswith("_data.path-x.txt__data-text_files__optimizer.lr-0.002")


def test_run_label_keeps_whole_overrides_and_counts_the_rest():
    assert run_label("") == ""
    assert run_label("trainer=ddp,data.path=/data/corpus/") == "_trainer-ddp__data.path-corpus"
    label = run_label(",".join(f"model.option_{i}=value{i}" for i in range(20)))
    assert len(label) <= LABEL_CHARS + 1 and label.endswith("__model.option_4-value4__+15")
    # a run folder goes back on the command line as ckpt_path=<folder>: Hydra reads it as one string
    folder = f"/logs/train/runs/2026-12-02_14-35-01-123456{run_label('data=sft,data.path=/a/b.jsonl,lora.r=8')}{label}"
    (parsed,) = OverridesParser.create().parse_overrides([f"ckpt_path={folder}"])
    assert parsed.value() == folder
