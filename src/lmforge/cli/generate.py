"""``lmforge generate ckpt_path=<checkpoint> prompt="..."``: sample text from a checkpoint of either loop.

With ``prompts_file=<file>`` it answers every prompt of a task file (JSONL prompt or chat rows,
or TSV pairs; see :mod:`lmforge.data.tasks`) with the checkpoint's own prompt and chat
templates, and writes ``output_file``: one JSON line per prompt, its row plus ``"output"``.
Rows that carry a reference answer are scored (exact match, chrF, BLEU).
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig

from lmforge.data.sft import encode_examples, task_format
from lmforge.data.tasks import read_prompts, reference
from lmforge.errors import ConfigError, reported_errors
from lmforge.training.checkpoint import NetworkCheckpoint, read_network, resolve_checkpoint
from lmforge.training.config import CONFIG_PATH
from lmforge.training.generation import generate_sample
from lmforge.training.safety import atomic_write
from lmforge.training.task_eval import TaskScores, answer_prompts
from lmforge.training.validation import check_generate_config


def generate(cfg: DictConfig) -> list[str]:
    """Print and return ``num_samples`` continuations of the prompt, or the answers to ``prompts_file``."""
    check_generate_config(cfg)
    network = read_network(resolve_checkpoint(cfg.ckpt_path, cfg.paths.log_dir), cfg.allow_unsafe_checkpoint)
    if cfg.get("prompts_file"):
        return answer_file(cfg, network)
    net, tokenizer = network.build(cfg.device), network.tokenizer
    samples = []
    for i in range(cfg.num_samples):
        text = generate_sample(net, tokenizer, cfg, cfg.device, seed=cfg.seed + i)
        if cfg.num_samples > 1:
            print(f"----- sample {i + 1}/{cfg.num_samples} -----")
        print(text)
        samples.append(text)
    return samples


def answer_file(cfg: DictConfig, network: NetworkCheckpoint) -> list[str]:
    """Answer every prompt of ``cfg.prompts_file``, write them to ``cfg.output_file`` and score them."""
    if not cfg.get("output_file"):
        raise ConfigError("prompts_file needs output_file=<path.jsonl> for the answers")
    source = Path(cfg.prompts_file)
    if not source.is_file():
        raise ConfigError(f"prompts_file={cfg.prompts_file} is not a file; give a JSONL or TSV file of prompts")
    tokenizer = network.tokenizer
    templates = task_format(network.data_config or {}, tokenizer)
    rows, prompts = [], []
    for _, row, segments in read_prompts(source, templates):
        rows.append(row)
        prompts.append(encode_examples(tokenizer, [segments])[0].tolist())
    net = network.build(cfg.device)
    settings = {"temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p, "seed": cfg.seed}
    outputs = answer_prompts(
        net, tokenizer, prompts, cfg.max_new_tokens, device=cfg.device, batch_size=cfg.batch_size, **settings
    )
    lines = [json.dumps({**row, "output": output}, ensure_ascii=False) for row, output in zip(rows, outputs)]
    text = "\n".join(lines) + "\n"
    atomic_write(Path(cfg.output_file), lambda handle: handle.write(text.encode("utf-8")))
    print(f"{len(outputs)} answers written to {cfg.output_file}")
    scored = [(output, reference(row)) for row, output in zip(rows, outputs) if reference(row) is not None]
    if scored:
        scores = TaskScores()
        scores.update([o for o, _ in scored], [r for _, r in scored])
        values = "  ".join(f"{key} {value:.2f}" for key, value in scores.compute().items())
        print(f"{len(scored)} answers against the references in {source.name}: {values}")
    return outputs


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="generate")
def main(cfg: DictConfig) -> None:
    with reported_errors():
        generate(cfg)


if __name__ == "__main__":
    main()
