"""The maximum-likelihood objective: next-token cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of ``targets`` (B, T) under ``logits`` (B, T, V), over non-ignored positions.

    ``targets`` are the inputs shifted left by one token, so this is the negative
    log-likelihood per token of P(w_i | w_<i).
    """
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=ignore_index)


def count_targets(targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Number of target tokens that contribute to the loss."""
    return (targets != ignore_index).sum()


def batch_loss(
    net: torch.nn.Module, batch: tuple[torch.Tensor, ...], ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token loss of ``net`` on a batch and the number of targets it covers.

    A batch ``(inputs, targets)`` gives the mean over its targets. Task batches (whose micro-batches
    hold different numbers of answer tokens) are ``(inputs, targets, step_mean_targets)``: their
    summed loss divided by the mean loss-token count per micro-batch of the optimizer step, so that
    the averages over accumulation steps and processes come out as the mean over all the step's
    tokens (:class:`lmforge.data.sft.TaskTrainBatches`).
    """
    inputs, targets, *step_mean_targets = batch
    count = count_targets(targets, ignore_index)
    if not step_mean_targets:
        return next_token_loss(net(inputs), targets, ignore_index), count
    logits = net(inputs)
    total = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=ignore_index, reduction="sum"
    )
    return total / step_mean_targets[0], count


def loss_and_perplexity(metric: MeanMetric) -> tuple[torch.Tensor, torch.Tensor]:
    """Compute and reset a token-weighted mean-loss metric (synced across ranks): ``(loss, exp(loss))``.

    Perplexity is the exponential of the token-level mean loss, not a mean of per-batch perplexities.
    """
    loss = metric.compute()
    metric.reset()
    return loss, torch.exp(loss)
