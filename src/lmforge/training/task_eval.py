"""Answers to task prompts and their scores: exact match, chrF and BLEU against the references.

One implementation for ``lmforge generate`` over a prompts file, ``lmforge eval`` and the validation
of both training loops on task data (``data=sft``).

chrF and BLEU are sacreBLEU's corpus scores (its defaults: chrF with character 6-grams, BLEU with
``13a`` tokenization), the figures papers report. torchmetrics' text metrics would keep corpus
statistics as metric states, but its ``CHRFScore`` leaves empty answers out of them: with one of
four answers empty it gave 88.7 where sacreBLEU gives 84.7, and an undertrained model answers
empty often. So each process keeps its answers and :meth:`TaskScores.compute` gathers them (a
few hundred strings) to score them at once.
"""

from __future__ import annotations

import html
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import sacrebleu
import torch
import torch.distributed as dist
from tokenizers import Tokenizer

from lmforge.data.sft import SFTDataModule, TaskExamples
from lmforge.data.tokenizer import eot_id
from lmforge.training.parallel import is_sharded

log = logging.getLogger("lmforge")


TASK_METRICS = ("exact_match", "chrf", "bleu")


@dataclass
class Answered:
    """One prompt with the model's answer (and the reference, when known)."""

    prompt: str
    output: str
    reference: str | None = None


def exact_match(output: str, reference: str) -> bool:
    """Whether two answers are equal up to surrounding whitespace and runs of inner whitespace."""
    return output.split() == reference.split()


class TaskScores:
    """Exact match, chrF and BLEU over every answer scored (by all processes) since the last compute."""

    def __init__(self) -> None:
        self.outputs: list[str] = []
        self.references: list[str] = []

    def update(self, outputs: list[str], references: list[str]) -> None:
        self.outputs += outputs
        self.references += references

    def compute(self) -> dict[str, float]:
        """The scores (0-100) of the answers of every process (a collective under torch.distributed), then a reset."""
        pairs = list(zip(self.outputs, self.references))
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            shares: list[list[tuple[str, str]]] = [[] for _ in range(dist.get_world_size())]
            dist.all_gather_object(shares, pairs)
            pairs = [pair for share in shares for pair in share]
        self.outputs, self.references = [], []
        if not pairs:
            return {}
        outputs, references = [o for o, _ in pairs], [r for _, r in pairs]
        values = (
            100 * sum(exact_match(o, r) for o, r in pairs) / len(pairs),
            sacrebleu.corpus_chrf(outputs, [references]).score,
            sacrebleu.corpus_bleu(outputs, [references]).score,
        )
        return dict(zip(TASK_METRICS, values))


def answer_prompts(
    net: torch.nn.Module,
    tokenizer: Tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    batch_size: int = 32,
) -> list[str]:
    """The answer to each prompt (token ids): text generated up to the end-of-sequence token.

    Prompts of equal length are batched together: no padding, so every model (whatever its
    attention or positions) computes exactly what it would for the prompt alone.
    """
    stop = eot_id(tokenizer)
    answers: list[str] = [""] * len(prompts)
    by_length: dict[int, list[int]] = {}
    for i, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(i)
    generator = torch.Generator(device=device).manual_seed(seed)
    for indices in by_length.values():
        for start in range(0, len(indices), batch_size):
            batch = indices[start : start + batch_size]
            idx = torch.tensor([prompts[i] for i in batch], dtype=torch.long, device=device)
            out = net.generate(
                idx, max_new_tokens, temperature, top_k, top_p, generator=generator, stop_token=stop
            ).tolist()
            for i, row in zip(batch, out):
                new = row[idx.size(1) :]
                answers[i] = tokenizer.decode(new[: new.index(stop)] if stop in new else new)
    return answers


def split_answer(examples: TaskExamples, index: int) -> tuple[list[int], list[int]]:
    """An example's prompt (everything before its last answer) and that answer without its EOS, as ids
    (the whole example, also where training truncates it)."""
    start, end = examples.span(index)
    ids = np.asarray(examples.ids[start:end], dtype=np.int64)
    answer = np.asarray(examples.answer[start:end], dtype=bool)
    answer_end = int(np.flatnonzero(answer)[-1]) + 1
    before = np.flatnonzero(~answer[:answer_end])
    answer_start = int(before[-1]) + 1 if len(before) else 0
    reference = ids[answer_start:answer_end].tolist()
    if reference[-1] == examples.eos_id:
        reference = reference[:-1]
    return ids[:answer_start].tolist(), reference


def score_examples(
    net: torch.nn.Module,
    tokenizer: Tokenizer,
    examples: TaskExamples,
    indices: list[int],
    scores: TaskScores,
    max_new_tokens: int,
    device: torch.device | str = "cpu",
    batch_size: int = 32,
) -> list[Answered]:
    """Answer examples ``indices`` greedily, add them to ``scores`` and return them."""
    pairs = [split_answer(examples, i) for i in indices]
    prompts = [prompt for prompt, _ in pairs]
    outputs = answer_prompts(net, tokenizer, prompts, max_new_tokens, device=device, batch_size=batch_size)
    references = [tokenizer.decode(r) for _, r in pairs]
    scores.update(outputs, references)
    return [Answered(tokenizer.decode(p), o, r) for (p, _), o, r in zip(pairs, outputs, references)]


def metric_sample(examples: TaskExamples, count: int, seed: int, rank: int, world_size: int) -> list[int]:
    """This process's share of a fixed, seeded sample of ``count`` examples (the same at every validation)."""
    chosen = np.arange(len(examples))
    if count < len(examples):
        chosen = np.sort(np.random.default_rng([seed, 0x5C0E]).choice(len(examples), count, replace=False))
    return chosen[rank::world_size].tolist()


def validate_task(
    net: torch.nn.Module,
    datamodule: Any,
    split: str,
    scores: TaskScores,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, float], list[Answered]] | None:
    """Task scores of a fixed sample of ``split`` (``data.metric_examples`` of them, shared out over the
    processes) and this process's answers; None for corpus data, when the setting is 0, or for a
    sharded network (its forward passes are collectives, which answers of unequal length cannot match)."""
    if not isinstance(datamodule, SFTDataModule) or not datamodule.metric_examples:
        return None
    if is_sharded(net):
        log.warning("task metrics are skipped for a sharded network; evaluate the consolidated checkpoint instead")
        return None
    examples = datamodule.examples(split)
    indices = metric_sample(examples, datamodule.metric_examples, datamodule.seed, rank, world_size)
    answered = score_examples(
        net, datamodule.tokenizer, examples, indices, scores, datamodule.max_answer_tokens, device
    )
    return scores.compute(), answered


def log_answers(loggers: list[Any], tag: str, answered: list[Answered], step: int, count: int = 4) -> None:
    """Write the first ``count`` prompt / reference / output triples as a text card to every logger that
    takes text (TensorBoard's ``add_text``; call on rank 0)."""
    rows = ["| prompt | reference | output |", "| --- | --- | --- |"]
    for item in answered[:count]:
        cells = (
            html.escape(text).replace("\n", "<br>").replace("|", "&#124;")
            for text in (item.prompt, item.reference or "", item.output)
        )
        rows.append("| " + " | ".join(cells) + " |")
    for logger in loggers:
        writer = getattr(logger, "experiment", None)
        if hasattr(writer, "add_text"):
            writer.add_text(tag, "\n".join(rows), global_step=step)


def task_sample(net: torch.nn.Module, datamodule: Any, device: torch.device | str = "cpu") -> str | None:
    """For task data, the run summary's sample: the first validation prompt with the model's greedy
    answer; None for a corpus (which continues ``sample.prompt`` instead)."""
    if not isinstance(datamodule, SFTDataModule):
        return None
    prompt, _ = split_answer(datamodule.examples("val"), 0)
    tokenizer = datamodule.tokenizer
    (answer,) = answer_prompts(net, tokenizer, [prompt], datamodule.max_answer_tokens, device=device)
    return tokenizer.decode(prompt, skip_special_tokens=False) + answer
