"""TensorBoard as a person reads it (``logger=tensorboard``).

Lightning's TensorBoard logger with two changes:

* no ``epoch`` chart: Lightning adds the epoch to every logged row, and lmforge trains on an
  endless stream of windows (one "epoch"), so the chart is a flat line that TensorBoard shows
  before the loss, its first card alphabetically;
* the HParams tab: at the end of training each run records its hyperparameters (model,
  optimizer, schedule, data) with its final validation loss as ``hparams/val_loss``, so the runs
  of a sweep can be sorted and compared there.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger as LightningTensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

FINAL_METRIC = "hparams/val_loss"


class TensorBoardLogger(LightningTensorBoardLogger):
    """Lightning's TensorBoard logger without the ``epoch`` chart, with :meth:`log_final_hparams`."""

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        super().log_metrics({key: value for key, value in metrics.items() if key != "epoch"}, step)

    @rank_zero_only
    def log_final_hparams(self, params: Mapping[str, Any], val_loss: float) -> None:
        """Write the run's hyperparameters with its final validation loss for the HParams tab."""
        super().log_hyperparams(dict(params), {FINAL_METRIC: val_loss})
