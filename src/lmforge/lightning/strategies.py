"""Trainer strategies lmforge adds to Lightning's."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy

from lmforge.training.parallel import data_parallel_groups


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` as FSDP2 over data-parallel groups of ``tensor_parallel_size``
    processes each (1: plain FSDP2, every process in one data-parallel group; "auto": every process of a
    node in one tensor-parallel group, nodes data-parallel).

    Unlike Lightning's ``FSDPStrategy`` it also runs on CPUs (gloo), and unlike
    ``ModelParallelStrategy`` it derives the data-parallel size from the tensor-parallel one. The
    LightningModule splits and shards itself in ``configure_model`` (see
    :func:`lmforge.training.parallel.shard_model`). Keyword arguments go to ``ModelParallelStrategy``
    (e.g. ``save_distributed_checkpoint``).
    """

    def __init__(self, tensor_parallel_size: int | str = 1, **kwargs: Any) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=tensor_parallel_size, **kwargs)

    def setup_environment(self) -> None:
        size = self.num_processes if self._tensor_parallel_size == "auto" else self._tensor_parallel_size
        world_size = self.num_nodes * self.num_processes
        self._data_parallel_size = data_parallel_groups(world_size, size, "trainer.strategy.tensor_parallel_size")
        self._tensor_parallel_size = size
        super().setup_environment()
