"""Trainer strategies lmforge adds to Lightning's."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` as plain FSDP2: every process in one data-parallel group.

    Unlike Lightning's ``FSDPStrategy`` it also runs on CPUs (gloo). The LightningModule shards
    itself in ``configure_model`` (see :func:`lmforge.training.parallel.shard_model`). Keyword arguments go to
    ``ModelParallelStrategy`` (e.g. ``save_distributed_checkpoint``).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()
