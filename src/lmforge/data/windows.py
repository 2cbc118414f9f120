"""Datasets of token windows for training and evaluation.

A window of ``block_size + 1`` consecutive tokens gives the inputs ``x = window[:-1]`` and the
targets ``y = window[1:]`` (both int64).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from lmforge.errors import DataError

EVAL_STREAM = 0x5EED_E7A1  # separates the eval window draw from the training draws of the same seed


def check_fits(tokens: np.ndarray, block_size: int, split: str) -> None:
    """Raise :class:`DataError` when ``split`` is shorter than one window of ``block_size + 1`` tokens."""
    if len(tokens) < block_size + 1:
        raise DataError(
            f"the {split} split has {len(tokens)} tokens, fewer than one window of block_size+1={block_size + 1}; "
            "use a smaller data.block_size, a larger corpus, or a larger data.val_fraction"
        )


class _TokenWindows(Dataset):
    """Base class holding the token array; a memmap is pickled as its file name, not its contents."""

    def __init__(self, tokens: np.ndarray, block_size: int, split: str) -> None:
        check_fits(tokens, block_size, split)
        self.tokens = tokens
        self.block_size = block_size

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if isinstance(self.tokens, np.memmap):  # e.g. for DataLoader workers started with spawn
            state["tokens"] = (self.tokens.filename, self.tokens.dtype, len(self.tokens))
        return state

    def __setstate__(self, state: dict) -> None:
        if isinstance(state["tokens"], tuple):
            filename, dtype, length = state["tokens"]
            state["tokens"] = np.memmap(filename, dtype=dtype, mode="r", shape=(length,))
        self.__dict__.update(state)

    def _windows(self, offsets: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        index = offsets[..., None] + np.arange(self.block_size + 1)
        window = torch.from_numpy(self.tokens[index].astype(np.int64))
        return window[..., :-1], window[..., 1:]


class TrainWindows(_TokenWindows):
    """Random training micro-batches: item ``k`` is ``(x, y)``, each of shape ``(batch_size, block_size)``.

    Micro-batch ``k`` of rank ``rank`` (of ``world_size``) is number ``g = k * world_size + rank`` in
    the job's global order, and its window offsets are drawn by ``np.random.default_rng([seed, 0, g])``:
    a pure function of ``(seed, g)``. A resumed run that starts at the same ``k`` sees the same
    batches; every rank sees different ones; and an optimizer step of ``A`` accumulated micro-batches
    on ``W`` processes covers the global numbers ``step * A * W`` to ``(step + 1) * A * W - 1``
    whatever ``A`` and ``W`` are, so the same global batch gives the same windows on 1 or 64 processes.
    Use with :class:`MicroBatchSampler`.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        block_size: int,
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int = 1,
        split: str = "train",
    ) -> None:
        super().__init__(tokens, block_size, split)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, 0, k * self.world_size + self.rank])
        offsets = rng.integers(0, len(self.tokens) - self.block_size, size=self.batch_size)
        return self._windows(offsets)


class MicroBatchSampler(Sampler[int]):
    """Yields micro-batch indices ``start, start + 1, ...``: ``length`` of them, or forever when None.

    With ``period`` the indices are taken modulo ``period``: the same few micro-batches repeat.

    Use as ``DataLoader(TrainWindows(...), batch_size=None, sampler=MicroBatchSampler(start))``. The
    global micro-batch index of a Trainer is ``global_step * accumulate_grad_batches + micro_index``,
    so ``start = global_step * accumulate_grad_batches`` continues an interrupted run exactly.
    """

    def __init__(self, start: int = 0, length: int | None = None, period: int | None = None) -> None:
        self.start = start
        self.length = length
        self.period = period

    def __iter__(self) -> Iterator[int]:
        if self.length is None:
            indices = itertools.count(self.start)
        else:
            indices = iter(range(self.start, self.start + self.length))
        if self.period is None:
            return indices
        return (k % self.period for k in indices)

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("an infinite MicroBatchSampler has no length")
        return self.length


class EvalWindows(_TokenWindows):
    """Fixed evaluation windows, the same on every call; item ``i`` is ``(x, y)`` of shape ``(block_size,)``.

    ``num_windows=None`` takes every non-overlapping window (offsets ``0, T, 2T, ...`` with
    ``T = block_size``); an integer draws that many offsets uniformly from a generator seeded by
    ``seed``. Rank ``r`` of ``world_size`` takes windows ``r::world_size`` without padding, so the
    mean loss over all ranks equals the single-process mean.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        block_size: int,
        num_windows: int | None,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        split: str = "val",
    ) -> None:
        super().__init__(tokens, block_size, split)
        if num_windows is None:
            offsets = np.arange((len(tokens) - 1) // block_size) * block_size
        else:
            rng = np.random.default_rng([seed, EVAL_STREAM])
            offsets = rng.integers(0, len(tokens) - block_size, size=num_windows)
        self.offsets = offsets[rank::world_size]

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._windows(self.offsets[i])
