"""Turning next-token logits into tokens: greedy, temperature, top-k and nucleus (top-p) sampling."""

from __future__ import annotations

import torch


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ValueError if the sampling settings are out of range."""
    if not temperature >= 0:
        raise ValueError(
            f"temperature must be >= 0 (got {temperature}); use 0 for greedy decoding or e.g. 1.0 to sample"
        )
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (got {top_k}); use None to disable top-k filtering")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (got {top_p}); use None or 1.0 to disable nucleus sampling")


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row of ``logits`` (B, V); returns a LongTensor (B, 1).

    ``temperature == 0`` is greedy (argmax). Otherwise the logits are divided by
    the temperature, restricted to the ``top_k`` most likely tokens (ties with the
    k-th are kept), then to the smallest set of most likely tokens whose total
    probability reaches ``top_p`` (always at least one), and a token is drawn with
    ``torch.multinomial``; pass a seeded ``generator`` on the logits' device for
    reproducible draws.
    """
    check_sampling_args(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature

    if top_k is not None and top_k < logits.size(-1):
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))

    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the more likely tokens before it already reach top_p;
        # the most likely token has nothing before it, so it always stays.
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)

    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)
