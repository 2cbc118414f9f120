"""TensorBoard as a person reads it (``logger=tensorboard``), the same for both loops.

TensorBoard orders its cards by tag, alphabetically, grouped by the part before the first ``/``.
Lightning's logger with lmforge's metric names would open on a flat ``epoch`` chart, then the
learning rate; this one shows what a run is for first:

* ``loss/train``, ``loss/val``, ``loss/test``, then ``perplexity/val``, ``perplexity/test``: the
  metrics ``<split>/loss`` and ``<split>/ppl`` under tags grouped by quantity, so the splits
  share a group and the groups come first (the CSV, W&B and MLflow loggers keep the metric names);
* the learning rate under ``train/`` (``train/lr...``), after them;
* no ``epoch`` chart: Lightning adds the epoch to every logged row, and lmforge trains on an
  endless stream of windows (one "epoch"), so the chart is a flat line;
* the HParams tab: at the end of training each run records its hyperparameters (model,
  optimizer, schedule, data) with ``loss/val`` and ``perplexity/val`` as its metrics, whose last
  values the tab shows, so the runs of a sweep can be sorted and compared there.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from lightning.fabric.utilities.logger import _flatten_dict
from lightning.pytorch.loggers import Logger
from lightning.pytorch.loggers import TensorBoardLogger as LightningTensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.tensorboard.summary import hparams

QUANTITY_GROUPS = {"loss": "loss", "ppl": "perplexity"}  # metric name -> TensorBoard group, in card order
SPLITS = ("train", "val", "test")
HPARAMS_METRICS = ("loss/val", "perplexity/val")


def tensorboard_tag(metric: str) -> str:
    """The TensorBoard tag of a logged metric: ``val/loss`` -> ``loss/val``, ``lr`` -> ``train/lr``."""
    split, _, name = metric.partition("/")
    if split in SPLITS and name in QUANTITY_GROUPS:
        return f"{QUANTITY_GROUPS[name]}/{split}"
    if metric.startswith("lr"):  # "lr" (Fabric loop), "lr-AdamW/decay" (Lightning's LR monitor)
        return f"train/{metric}"
    return metric


class TensorBoardLogger(LightningTensorBoardLogger):
    """Lightning's TensorBoard logger with lmforge's tags, without the ``epoch`` chart, and with
    :meth:`log_final_hparams`. Both training loops use it."""

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        tagged = {tensorboard_tag(key): value for key, value in metrics.items() if key != "epoch"}
        super().log_metrics(tagged, step)

    @rank_zero_only
    def log_final_hparams(self, params: Mapping[str, Any]) -> None:
        """Write the run's hyperparameters for the HParams tab, with :data:`HPARAMS_METRICS` as its metrics.

        Unlike Lightning's ``log_hyperparams(params, metrics)``, this writes no metric values: the tab
        reads each metric's last value from the run's own charts, so no stray point lands at step 0.
        """
        flat = self._sanitize_params(_flatten_dict(dict(params)))
        writer = self.experiment._get_file_writer()
        for summary in hparams(flat, dict.fromkeys(HPARAMS_METRICS, 0.0)):
            writer.add_summary(summary)
        writer.flush()


def log_final_hparams(loggers: Iterable[Logger], params: Mapping[str, Any]) -> None:
    """Each TensorBoard logger among ``loggers`` records the run's hyperparameters (end of training)."""
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_final_hparams(params)
