"""Task data for supervised fine-tuning: examples tokenized once into a cache, served in length buckets.

:func:`prepare_task_data` reads the examples of ``data.path`` (:mod:`lmforge.data.tasks`), splits
them by a seeded permutation, tokenizes them and writes::

    <cache_root>/sft-<key[:12]>/
        tokenizer.json
        <split>.ids.npy, <split>.answer.npy   # token ids and 1 where a token belongs to an answer
        <split>.offsets.npy                   # example i is ids[offsets[i]:offsets[i + 1]]
        meta.json                             # written last: its presence marks a complete cache

keyed, like the corpus cache, by the files' contents and every setting they are read with, built
in a temporary directory under a file lock and renamed into place.

Batches: an example of ``n <= block_size + 1`` tokens gives inputs ``ids[:-1]`` and targets
``ids[1:]``; targets that are not answer tokens are ``ignore_index`` (unless ``mask_prompt`` is
off), and every answer ends with the end-of-sequence token, so a model learns where to stop.
Longer examples are cut to ``block_size + 1`` tokens (counted in the log); one whose answer
starts beyond that is dropped. A micro-batch pads its examples to the longest of them, and
examples of similar length are batched together (length buckets), so padding wastes little
compute and no model needs an attention mask: the padding sits after every real token, where
causal attention keeps it from changing them. Packing several examples into one row would save
the rest of the padding but needs per-example attention masks in every model (see the benchmark
in ``benchmarks/RESULTS.md`` for what bucketing leaves).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, Dataset

from lmforge.data.cache import acquire_build_lock, cache_directory, token_dtype
from lmforge.data.datamodule import ServedData
from lmforge.data.tasks import (
    DEFAULT_PROMPT_TEMPLATE,
    ChatTemplate,
    ReadReport,
    Segment,
    TaskFormat,
    fingerprint,
    read_chat_template,
    read_examples,
    task_files,
)
from lmforge.data.tokenizer import EOT_TOKEN, TOKENIZER_KINDS, eot_id, load_tokenizer, save_tokenizer, train_tokenizer
from lmforge.data.windows import EVAL_STREAM, MicroBatchSampler
from lmforge.errors import DataError

SFT_CACHE_VERSION = 1
SPLITS = ("train", "val", "test")
BUCKET_BATCHES = 64  # examples are sorted by length within pools of this many micro-batches

log = logging.getLogger("lmforge.data")


def check_split_size(name: str, value: float) -> None:
    """``data.val_size`` / ``data.test_size``: a fraction in [0, 1) or a whole number of examples."""
    if value < 0 or (value >= 1 and value != int(value)):
        raise DataError(f"data.{name}={value} must be a fraction in [0, 1) (e.g. 0.1) or a number of examples (500)")


def split_counts(total: int, val_size: float, test_size: float) -> dict[str, int]:
    """How many of ``total`` examples each split gets; val and test are fractions or counts."""
    counts = {}
    for split, size in (("val", val_size), ("test", test_size)):
        counts[split] = int(size) if size >= 1 else round(total * size)
    counts["train"] = total - counts["val"] - counts["test"]
    if counts["train"] < 1 or (val_size > 0 and counts["val"] < 1):
        raise DataError(
            f"{total} examples cannot give {counts['val']} validation and {counts['test']} test examples and "
            "still train on some; use smaller data.val_size / data.test_size, or more examples"
        )
    return counts


@dataclass
class TaskCache:
    """A built task cache: its directory, tokenizer and metadata."""

    path: Path
    tokenizer: Tokenizer
    meta: dict

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    def split(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(ids, answer, offsets)`` of ``split`` (memory-mapped)."""
        return tuple(np.load(self.path / f"{split}.{part}.npy", mmap_mode="r") for part in ("ids", "answer", "offsets"))


def prepare_task_data(
    path: str | list[str],
    task_format: dict,
    tokenizer_kind: str = "bpe",
    vocab_size: int | None = 4096,
    val_size: float = 0.1,
    test_size: float = 0.0,
    seed: int = 1337,
    cache_root: str | Path = "data",
    tokenizer_json: str | None = None,
) -> TaskCache:
    """Build the task cache of the files at ``path``, or reuse it; safe to call from several processes.

    ``task_format`` holds ``prompt_template`` and ``chat_template`` (see :mod:`lmforge.data.tasks`).
    """
    files = task_files(path)
    settings = {
        "fingerprint": fingerprint(files),
        "format": task_format,
        "tokenizer": tokenizer_kind if tokenizer_json is None else None,
        "vocab_size": vocab_size if tokenizer_json is None and tokenizer_kind == "bpe" else None,
        "tokenizer_json_sha256": hashlib.sha256(tokenizer_json.encode()).hexdigest() if tokenizer_json else None,
        "val_size": val_size,
        "test_size": test_size,
        "seed": seed,
        "cache_version": SFT_CACHE_VERSION,
    }
    final = cache_directory(cache_root, "sft", settings)
    lock = acquire_build_lock(final, "task cache")
    try:
        if not (final / "meta.json").is_file():
            _build(files, settings, final, tokenizer_json)
        else:
            log.info("reusing task cache at %s", final)
    finally:
        lock.release()
    meta = json.loads((final / "meta.json").read_text(encoding="utf-8"))
    return TaskCache(final, load_tokenizer(final / "tokenizer.json"), meta)


def eos_text(tokenizer: Tokenizer | None) -> str:
    """The end-of-sequence token as text (what chat templates call ``eos_token``)."""
    return EOT_TOKEN if tokenizer is None else tokenizer.id_to_token(eot_id(tokenizer))


def task_format(settings: dict, tokenizer: Tokenizer | None) -> TaskFormat:
    """The :class:`TaskFormat` of ``{"prompt_template", "chat_template"}`` for ``tokenizer``'s EOS."""
    chat = ChatTemplate(read_chat_template(settings.get("chat_template")), eos_text(tokenizer))
    return TaskFormat(settings.get("prompt_template") or DEFAULT_PROMPT_TEMPLATE, chat)


def _build(files: list[Path], settings: dict, final: Path, tokenizer_json: str | None) -> None:
    tokenizer = Tokenizer.from_str(tokenizer_json) if tokenizer_json else None
    report = ReadReport()
    examples = list(read_examples(files, task_format(settings["format"], tokenizer), report))
    report.warn()
    if not examples:
        raise DataError(f"no usable example in {', '.join(map(str, files))} ({report.rows} rows read)")
    counts = split_counts(len(examples), settings["val_size"], settings["test_size"])
    order = np.random.default_rng([settings["seed"], 1]).permutation(len(examples))
    bounds = np.cumsum([0, counts["train"], counts["val"], counts["test"]])
    splits = {split: [examples[i] for i in order[bounds[j] : bounds[j + 1]]] for j, split in enumerate(SPLITS)}
    if tokenizer is None:
        eos = eos_text(None)
        texts = (segment.text.replace(eos, "") for example in splits["train"] for segment in example)
        tokenizer = train_tokenizer(settings["tokenizer"], texts, settings["vocab_size"])
    dtype = token_dtype(tokenizer.get_vocab_size())
    meta = {"vocab_size": tokenizer.get_vocab_size(), "rows": report.rows, "skipped": dict(report.skipped)}
    meta["splits"] = {}
    root = final.parent
    temp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=root))
    try:
        save_tokenizer(tokenizer, temp / "tokenizer.json")
        for split, split_examples in splits.items():
            ids, answer, offsets = encode_examples(tokenizer, split_examples)
            np.save(temp / f"{split}.ids.npy", ids.astype(dtype))
            np.save(temp / f"{split}.answer.npy", answer)
            np.save(temp / f"{split}.offsets.npy", offsets)
            meta["splits"][split] = {"examples": len(split_examples), "tokens": int(len(ids))}
        (temp / "meta.json").write_text(json.dumps({**meta, "settings": settings}, indent=2), encoding="utf-8")
        if final.exists():  # an incomplete earlier build
            shutil.rmtree(final)
        os.replace(temp, final)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    log.info("task cache at %s: %s", final, meta["splits"])


def encode_examples(tokenizer: Tokenizer, examples: list[list[Segment]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token ids, answer flags and offsets of ``examples``; each answer ends with the EOS token.

    User text is encoded literally (a ``<|endoftext|>`` typed in a prompt is text); a chat
    template's own text may hold special tokens, which it means as such.
    """
    eos = eot_id(tokenizer)
    ids: list[int] = []
    answer: list[int] = []
    offsets = [0]
    for example in examples:
        for segment in example:
            tokenizer.encode_special_tokens = not segment.template
            tokens = tokenizer.encode(segment.text, add_special_tokens=False).ids
            if segment.answer and (not tokens or tokens[-1] != eos):
                tokens.append(eos)
            ids += tokens
            answer += [int(segment.answer)] * len(tokens)
        offsets.append(len(ids))
    tokenizer.encode_special_tokens = False
    return np.array(ids, np.int64), np.array(answer, np.uint8), np.array(offsets, np.int64)


class TaskExamples:
    """The examples of one split, cut to the context: per example its token range and loss-token count."""

    def __init__(
        self, cache: TaskCache, split: str, block_size: int, mask_prompt: bool, ignore_index: int = -100
    ) -> None:
        self.ids, self.answer, offsets = cache.split(split)
        self.block_size = block_size
        self.mask_prompt = mask_prompt
        self.ignore_index = ignore_index
        self.eos_id = eot_id(cache.tokenizer)  # also pads the batches
        starts, full_ends = offsets[:-1], offsets[1:]
        self.truncated = int(np.sum(full_ends - starts > block_size + 1))
        ends = np.minimum(full_ends, starts + block_size + 1)
        targets = np.array([self._targets(s, e).sum() for s, e in zip(starts, ends)], dtype=np.int64)
        usable = targets > 0
        self.dropped = int(np.sum(~usable))
        self.starts, self.ends, self.targets = starts[usable], ends[usable], targets[usable]
        self.full_ends = full_ends[usable]
        self.total = len(starts)

    def _targets(self, start: int, end: int) -> np.ndarray:
        """Which targets of the example at ``[start, end)`` carry loss (the tokens after the first)."""
        if not self.mask_prompt:
            return np.ones(end - start - 1, dtype=bool)
        return np.asarray(self.answer[start + 1 : end], dtype=bool)

    def __len__(self) -> int:
        return len(self.starts)

    def span(self, i: int) -> tuple[int, int]:
        """Where example ``i`` lies in the token ids, before it is cut to the context."""
        return int(self.starts[i]), int(self.full_ends[i])

    @property
    def lengths(self) -> np.ndarray:
        return self.ends - self.starts - 1

    def describe(self, split: str) -> str:
        return (
            f"{split}: {len(self)} examples of {self.total}; {self.truncated} longer than block_size+1="
            f"{self.block_size + 1} tokens truncated, {self.dropped} dropped (no answer token within it)"
        )

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of examples ``indices``, padded to the longest of them."""
        width = int(self.lengths[indices].max())
        inputs = np.full((len(indices), width), self.eos_id, dtype=np.int64)
        targets = np.full((len(indices), width), self.ignore_index, dtype=np.int64)
        for row, i in enumerate(indices):
            start, end = self.starts[i], self.ends[i]
            tokens = np.asarray(self.ids[start:end], dtype=np.int64)
            inputs[row, : end - start - 1] = tokens[:-1]
            targets[row, : end - start - 1] = np.where(self._targets(start, end), tokens[1:], self.ignore_index)
        return torch.from_numpy(inputs), torch.from_numpy(targets)


class TaskTrainBatches(Dataset):
    """Training micro-batches of length-bucketed examples; item ``k`` is ``(inputs, targets, step_mean_targets)``.

    As for corpora (:class:`~lmforge.data.windows.TrainWindows`), micro-batch ``k`` of rank ``rank`` is
    number ``g = k * world_size + rank`` of the job, and its examples are a pure function of
    ``(seed, g)``: epoch ``g // batches_per_epoch`` shuffles the examples by its own seed, sorts pools
    of :data:`BUCKET_BATCHES` micro-batches by length, cuts them into micro-batches and shuffles those.

    Micro-batches hold different numbers of answer tokens, so each carries the mean number of loss
    tokens per micro-batch of its optimizer step (all ranks and accumulation steps): a loss summed
    over the micro-batch and divided by it makes accumulation's and data parallelism's averages a
    mean over every answer token of the step (:func:`lmforge.training.loss.batch_loss`).
    """

    def __init__(
        self,
        examples: TaskExamples,
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int = 1,
        accumulate_grad_batches: int = 1,
    ) -> None:
        if len(examples) < batch_size:
            raise DataError(
                f"the train split has {len(examples)} usable examples, fewer than data.batch_size={batch_size}; "
                "use a smaller data.batch_size or more examples"
            )
        self.examples = examples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.accumulate_grad_batches = accumulate_grad_batches
        self.batches_per_epoch = len(examples) // batch_size
        self._epoch_plan: tuple[int, np.ndarray] | None = None

    def _plan(self, epoch: int) -> np.ndarray:
        """The micro-batches of ``epoch``: an array of example indices, one row per micro-batch."""
        if self._epoch_plan is None or self._epoch_plan[0] != epoch:
            rng = np.random.default_rng([self.seed, 0, epoch])
            order = rng.permutation(len(self.examples))[: self.batches_per_epoch * self.batch_size]
            pool = BUCKET_BATCHES * self.batch_size
            lengths = self.examples.lengths
            for start in range(0, len(order), pool):
                chunk = order[start : start + pool]
                order[start : start + pool] = chunk[np.argsort(lengths[chunk], kind="stable")]
            batches = order.reshape(self.batches_per_epoch, self.batch_size)
            self._epoch_plan = (epoch, batches[rng.permutation(self.batches_per_epoch)])
        return self._epoch_plan[1]

    def _indices(self, g: int) -> np.ndarray:
        return self._plan(g // self.batches_per_epoch)[g % self.batches_per_epoch]

    def __len__(self) -> int:
        raise TypeError("training batches are endless; use MicroBatchSampler")

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = k * self.world_size + self.rank
        per_step = self.accumulate_grad_batches * self.world_size
        step_start = g // per_step * per_step
        step_targets = sum(
            int(self.examples.targets[self._indices(h)].sum()) for h in range(step_start, step_start + per_step)
        )
        inputs, targets = self.examples.batch(self._indices(g))
        return inputs, targets, torch.tensor(step_targets / per_step, dtype=torch.float32)


class TaskEvalBatches(Dataset):
    """Fixed evaluation batches: rank ``rank`` takes examples ``rank::world_size`` (of a seeded sample of
    ``num_examples``, or all), sorted by length and cut into batches of ``batch_size``."""

    def __init__(
        self,
        examples: TaskExamples,
        batch_size: int,
        num_examples: int | None,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        chosen = np.arange(len(examples))
        if num_examples is not None and num_examples < len(examples):
            chosen = np.sort(np.random.default_rng([seed, EVAL_STREAM]).choice(len(examples), num_examples, False))
        mine = chosen[rank::world_size]
        mine = mine[np.argsort(examples.lengths[mine], kind="stable")]
        self.examples = examples
        self.batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.examples.batch(self.batches[i])


class SFTDataModule(ServedData):
    """Task data for fine-tuning (``data=sft``): prompt/answer examples with the loss on the answers.

    The same interface as :class:`~lmforge.data.datamodule.LMDataModule`, so both loops, resume
    and the global batch plan work unchanged; the training loader is endless and its batches
    are a function of ``(seed, rank, micro-batch index)``. ``block_size`` is the longest example
    (prompt + answer + EOS) trained on; ``batch_size`` counts examples. ``val_size`` and
    ``test_size`` are fractions or numbers of examples (``test_size=0``: the test split is the
    validation split). ``mask_prompt=False`` trains on the whole sequence. ``eval_examples`` caps
    the (seeded, fixed) sample whose loss validation measures; ``metric_examples`` of them (0: none)
    are also answered greedily, up to ``max_answer_tokens``, and scored
    (:mod:`lmforge.training.task_eval`).
    """

    def __init__(
        self,
        path: str | list[str],
        tokenizer: str = "bpe",
        vocab_size: int = 4096,
        block_size: int = 256,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        val_size: float = 0.1,
        test_size: float = 0.0,
        seed: int = 1337,
        eval_examples: int | None = None,
        mask_prompt: bool = True,
        metric_examples: int = 32,
        max_answer_tokens: int = 64,
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
        chat_template: str | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        cache_dir: str = "data",
        tokenizer_json: str | None = None,
    ) -> None:
        super().__init__()
        if tokenizer not in TOKENIZER_KINDS:
            raise DataError(f"data.tokenizer={tokenizer!r} is not one of {', '.join(TOKENIZER_KINDS)}")
        positive = {"block_size": block_size, "batch_size": batch_size, "eval_batch_size": eval_batch_size}
        positive["max_answer_tokens"] = max_answer_tokens
        for name, value in {**positive, "eval_examples": eval_examples}.items():
            if value is not None and value < 1:
                raise DataError(f"data.{name}={value} must be >= 1")
        for name, value in {"num_workers": num_workers, "metric_examples": metric_examples}.items():
            if value < 0:
                raise DataError(f"data.{name}={value} must be >= 0")
        check_split_size("val_size", val_size)
        check_split_size("test_size", test_size)
        if val_size == 0:
            raise DataError("data.val_size=0 leaves nothing to validate on; use e.g. 0.1 or 200")
        TaskFormat(prompt_template)  # checks the template
        self.path = path
        self.tokenizer_kind = tokenizer
        self.requested_vocab_size = vocab_size
        self.block_size = block_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.val_size = val_size
        self.test_size = test_size
        self.seed = seed
        self.eval_examples = eval_examples
        self.mask_prompt = mask_prompt
        self.metric_examples = metric_examples
        self.max_answer_tokens = max_answer_tokens
        self.format_settings = {"prompt_template": prompt_template, "chat_template": chat_template}
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.cache_dir = Path(cache_dir).absolute()
        self.tokenizer_json_override = tokenizer_json
        self._cache: TaskCache | None = None
        self._examples: dict[str, TaskExamples] = {}

    def prepare_data(self) -> None:
        """Build the task cache, or reuse it."""
        if self._cache is not None:
            return
        self._cache = prepare_task_data(
            self.path,
            self.format_settings,
            tokenizer_kind=self.tokenizer_kind,
            vocab_size=self.requested_vocab_size,
            val_size=self.val_size,
            test_size=self.test_size,
            seed=self.seed,
            cache_root=self.cache_dir,
            tokenizer_json=self.tokenizer_json_override,
        )

    @property
    def cache(self) -> TaskCache:
        if self._cache is None:
            self.prepare_data()
        return self._cache

    @property
    def vocab_size(self) -> int:
        return self.cache.vocab_size

    @property
    def tokenizer(self) -> Tokenizer:
        return self.cache.tokenizer

    @property
    def tokenizer_json(self) -> str:
        return self.cache.tokenizer.to_str()

    @property
    def cache_path(self) -> Path:
        return self.cache.path

    def examples(self, split: str) -> TaskExamples:
        """The examples of ``split`` cut to the context (the test split is val's when ``test_size`` is 0)."""
        if split == "test" and self.test_size == 0:
            split = "val"
        if split not in self._examples:
            examples = TaskExamples(self.cache, split, self.block_size, self.mask_prompt)
            level = logging.WARNING if examples.truncated or examples.dropped else logging.INFO
            log.log(level, examples.describe(split))
            if len(examples) == 0:
                raise DataError(f"the {split} split has no usable example; use a larger data.block_size")
            self._examples[split] = examples
        return self._examples[split]

    def setup(self, stage: str | None = None) -> None:
        needed = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], None: ["train", "val", "test"]}
        for split in needed.get(stage, []):
            self.examples(split)

    def train_loader(
        self, start_micro_batch: int, rank: int, world_size: int = 1, accumulate_grad_batches: int = 1
    ) -> DataLoader:
        """An endless loader of rank ``rank``'s training micro-batches, from number ``start_micro_batch`` on."""
        dataset = TaskTrainBatches(
            self.examples("train"), self.batch_size, self.seed, rank, world_size, accumulate_grad_batches
        )
        return self._loader(dataset, batch_size=None, sampler=MicroBatchSampler(start_micro_batch))

    def eval_loader(self, split: str, rank: int = 0, world_size: int = 1) -> DataLoader:
        """A loader of the fixed evaluation batches of ``split`` for ``rank``."""
        dataset = TaskEvalBatches(
            self.examples(split), self.eval_batch_size, self.eval_examples, self.seed, rank, world_size
        )
        if len(dataset) == 0:
            raise DataError(
                f"the {split} split has fewer examples than the {world_size} processes; use a larger data.val_size"
            )
        return self._loader(dataset, batch_size=None, shuffle=False)
