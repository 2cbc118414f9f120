"""The Lightning data module of lmforge."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
from tokenizers import Tokenizer
from torch.utils.data import DataLoader

from lmforge.data.cache import (
    DEFAULT_TOKENIZER_TRAIN_BYTES,
    CachedCorpus,
    check_split_params,
    check_tokenizer_train_bytes,
    prepare_corpus,
)
from lmforge.data.sources import CorpusSource
from lmforge.data.tokenizer import TOKENIZER_KINDS
from lmforge.data.windows import EvalWindows, MicroBatchSampler, TrainWindows, check_fits
from lmforge.errors import DataError

log = logging.getLogger("lmforge.data")


class ServedData(pl.LightningDataModule):
    """The loaders both data modules (corpora and task data) serve the same way.

    A subclass builds ``train_loader(start_micro_batch, rank, world_size, accumulate_grad_batches)``
    and ``eval_loader(split, rank, world_size)``; the Trainer's hooks and the Fabric loop call them.
    Each rank shards the data itself: create the Trainer with ``use_distributed_sampler=False``.
    """

    num_workers: int
    pin_memory: bool

    def _loader(self, dataset, **kwargs) -> DataLoader:
        return DataLoader(
            dataset,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            **kwargs,
        )

    def _rank_and_world(self) -> tuple[int, int]:
        """This process's data-parallel rank and the number of data-parallel groups: the processes of one
        tensor-parallel group read the same batches."""
        sharding = None if self.trainer is None else self.trainer.distributed_sampler_kwargs
        if not sharding:
            return 0, 1
        return sharding["rank"], sharding["num_replicas"]

    def train_dataloader(self) -> DataLoader:
        # Batches are a function of the micro-batch index: a resumed run continues the sequence.
        accumulation = self.trainer.accumulate_grad_batches
        start = self.trainer.global_step * accumulation
        return self.train_loader(start, *self._rank_and_world(), accumulate_grad_batches=accumulation)

    def val_dataloader(self) -> DataLoader:
        return self.eval_loader("val", *self._rank_and_world())

    def test_dataloader(self) -> DataLoader:
        return self.eval_loader("test", *self._rank_and_world())


class LMDataModule(ServedData):
    """Language-model data: a corpus source, tokenized once into a token cache, served as windows.

    Training batches are ``(x, y)`` int64 tensors of shape ``(batch_size, block_size)`` with
    ``y`` the next tokens of ``x``, drawn at random positions as a pure function of
    ``(seed, rank, micro-batch index)``; the training loader is infinite, so set the Trainer's
    ``max_steps`` and an integer ``val_check_interval``. A resumed run continues the batch
    sequence from the restored ``global_step``. Evaluation uses fixed windows (see
    :class:`~lmforge.data.windows.EvalWindows`), sharded over ranks.

    ``vocab_size`` only applies to the ``"bpe"`` tokenizer; ``"char"`` and ``"bytes"`` have a
    vocabulary fixed by the corpus or by the 256 byte values. ``tokenizer_train_bytes`` bounds the
    text BPE is trained on, and so the memory and time that takes: a fixed sample spread over the
    train split (None: all of it). When ``test_fraction`` is 0 the test split is the validation
    split. Relative ``cache_dir`` paths are resolved at construction.
    ``tokenizer_json`` (e.g. a checkpoint's tokenizer) is used instead of training a tokenizer;
    ``tokenizer`` and ``vocab_size`` are then ignored. ``overfit_batches > 0`` (debugging) makes
    training repeat its first ``overfit_batches`` micro-batches forever.
    """

    def __init__(
        self,
        source: CorpusSource,
        tokenizer: str = "bpe",
        vocab_size: int = 4096,
        block_size: int = 256,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.0,
        split: str = "auto",
        seed: int = 1337,
        eval_windows: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        cache_dir: str = "data",
        tokenizer_json: str | None = None,
        overfit_batches: int = 0,
        tokenizer_train_bytes: int | None = DEFAULT_TOKENIZER_TRAIN_BYTES,
    ) -> None:
        super().__init__()
        if tokenizer not in TOKENIZER_KINDS:
            raise DataError(f"data.tokenizer={tokenizer!r} is not one of {', '.join(TOKENIZER_KINDS)}")
        positive = {"block_size": block_size, "batch_size": batch_size, "eval_batch_size": eval_batch_size}
        for name, value in {**positive, "eval_windows": eval_windows}.items():
            if value is not None and value < 1:
                raise DataError(f"data.{name}={value} must be >= 1")
        if seed < 0:
            raise DataError(f"data.seed={seed} must be >= 0")
        for name, value in {"num_workers": num_workers, "overfit_batches": overfit_batches}.items():
            if value < 0:
                raise DataError(f"data.{name}={value} must be >= 0")
        check_split_params(val_fraction, test_fraction, split)
        check_tokenizer_train_bytes(tokenizer_train_bytes)
        self.source = source
        self.tokenizer_kind = tokenizer
        self.requested_vocab_size = vocab_size
        self.tokenizer_train_bytes = tokenizer_train_bytes
        self.block_size = block_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split = split
        self.seed = seed
        self.eval_windows = eval_windows
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.cache_dir = Path(cache_dir).absolute()
        self.tokenizer_json_override = tokenizer_json
        self.overfit_batches = overfit_batches
        self._corpus: CachedCorpus | None = None
        self._tokens: dict[str, np.ndarray] = {}

    def prepare_data(self) -> None:
        """Build the token cache, or reuse it (cheap). Safe to call from every process; a no-op once done
        (Lightning calls it again before fitting and testing)."""
        if self._corpus is not None:
            return
        self._corpus = prepare_corpus(
            self.source,
            tokenizer_kind=self.tokenizer_kind,
            vocab_size=self.requested_vocab_size,
            val_fraction=self.val_fraction,
            test_fraction=self.test_fraction,
            split=self.split,
            seed=self.seed,
            cache_root=self.cache_dir,
            tokenizer_json=self.tokenizer_json_override,
            tokenizer_train_bytes=self.tokenizer_train_bytes,
        )

    @property
    def corpus(self) -> CachedCorpus:
        """The token cache (prepared on first access)."""
        if self._corpus is None:
            self.prepare_data()
        return self._corpus

    @property
    def vocab_size(self) -> int:
        """The real vocabulary size of the tokenizer (may be below the requested BPE size)."""
        return self.corpus.vocab_size

    @property
    def tokenizer(self) -> Tokenizer:
        return self.corpus.tokenizer

    @property
    def tokenizer_json(self) -> str:
        """The tokenizer serialized as JSON, e.g. to store it in a checkpoint."""
        return self.corpus.tokenizer.to_str()

    @property
    def cache_path(self) -> Path:
        """The directory of the token cache."""
        return self.corpus.path

    def setup(self, stage: str | None = None) -> None:
        """Open the token files and check that the splits used by ``stage`` hold at least one window."""
        needed = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], None: ["train", "val", "test"]}
        for split in needed.get(stage, []):
            self.tokens(split)

    def tokens(self, split: str) -> np.ndarray:
        """The token ids of ``split`` (memory-mapped), checked to hold at least one window."""
        if split == "test" and self.test_fraction == 0:
            if "test" not in self._tokens:
                log.info("test_fraction is 0: the test split is the validation split")
                self._tokens["test"] = self.tokens("val")
            return self._tokens["test"]
        if split not in self._tokens:
            tokens = self.corpus.tokens(split)
            check_fits(tokens, self.block_size, split)
            self._tokens[split] = tokens
        return self._tokens[split]

    def train_loader(
        self, start_micro_batch: int, rank: int, world_size: int = 1, accumulate_grad_batches: int = 1
    ) -> DataLoader:
        """An infinite loader of rank ``rank``'s training micro-batches, from number ``start_micro_batch`` on.

        ``accumulate_grad_batches`` is part of the data modules' shared interface; windows all hold
        ``block_size`` targets, so their losses need no step-wide weighting and ignore it.
        """
        dataset = TrainWindows(self.tokens("train"), self.block_size, self.batch_size, self.seed, rank, world_size)
        sampler = MicroBatchSampler(start_micro_batch, period=self.overfit_batches or None)
        return self._loader(dataset, batch_size=None, sampler=sampler)

    def eval_loader(self, split: str, rank: int = 0, world_size: int = 1) -> DataLoader:
        """A loader of the fixed evaluation windows of ``split`` ("val" or "test") for ``rank``."""
        tokens = self.tokens(split)
        dataset = EvalWindows(tokens, self.block_size, self.eval_windows, self.seed, rank, world_size, split)
        if len(dataset) == 0:
            raise DataError(
                f"the {split} split gives fewer eval windows than the {world_size} processes; "
                "use more data.eval_windows, a smaller data.block_size, or a larger data.val_fraction"
            )
        return self._loader(dataset, batch_size=self.eval_batch_size, shuffle=False)
