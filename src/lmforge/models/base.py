"""The interface every lmforge language model implements, and the generation loop they share.

A model maps token ids (B, T) to next-token logits (B, T, V). Besides the full
``forward`` used in training, it exposes an incremental API for generation:
``init_state`` creates an empty state (a KV cache for a transformer, the (h, c)
pair for an LSTM) and ``forward_step`` consumes new tokens given that state.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from lmforge.models.sampling import check_sampling_args, sample_next_token


class LanguageModel(nn.Module, ABC):
    """Base class of the autoregressive language models."""

    @abstractmethod
    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) for every position of the token ids ``idx`` (B, T)."""

    @abstractmethod
    def init_state(self, batch_size: int, device: torch.device | str) -> Any:
        """An empty generation state for ``batch_size`` sequences on ``device``."""

    @abstractmethod
    def forward_step(self, idx: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        """Logits (B, T_new, V) for new tokens ``idx`` (B, T_new) following those already in ``state``.

        Returns the logits and the state updated to include ``idx``.
        """

    @property
    def context_limit(self) -> int | None:
        """The longest context the model can condition on, or None if unbounded."""
        return None

    def repeated_blocks(self) -> list[nn.Module]:
        """The repeated layers (transformer blocks), each sharded, checkpointed and compiled on its own;
        empty for a network without them (the LSTM)."""
        return []

    def position_parameters(self) -> list[nn.Parameter]:
        """Learned position-embedding parameters, left out of the non-embedding count."""
        return []

    def num_params(self, non_embedding: bool = True) -> int:
        """Number of parameters; tied weights count once.

        With ``non_embedding`` the learned position table (if any) is left out, as
        it does no matrix multiplication; the token embedding stays in because,
        tied or not, the output head multiplies by a matrix of the same size.
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(p.numel() for p in self.position_parameters())
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs (forward + backward) per token: 6 per non-embedding parameter.

        Subclasses add terms that grow with the context length ``seq_len``.
        """
        return 6.0 * self.num_params(non_embedding=True)

    def no_weight_decay_param_names(self) -> set[str]:
        """Names of matrices (``ndim >= 2``) in ``named_parameters()`` that must not be weight-decayed."""
        return set()

    def hidden_matrix_names(self) -> set[str]:
        """Names of the hidden weight matrices (not embeddings or head): what Muon optimizes."""
        return set()

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        stop_token: int | None = None,
    ) -> torch.Tensor:
        """Extend the prompts ``idx`` (B, T) by ``max_new_tokens`` sampled tokens; returns (B, T + max_new_tokens).

        With ``stop_token`` it may return fewer new tokens: it stops once every row has produced that
        token (what a row generates after it is meaningless: cut it there).

        Sampling follows ``sample_next_token`` (``temperature=0`` is greedy). The
        model runs in eval mode for the call and its previous mode is restored.

        With ``use_cache`` each step feeds only the new token through
        ``forward_step``; without it the whole context is re-run through
        ``forward`` (slower, kept to measure the cache's speed-up). Both condition
        on the same context, so greedy outputs agree:

        * a prompt longer than ``context_limit`` is cut to its last ``context_limit`` tokens;
        * when the context is full, it restarts from the last ``context_limit // 2``
          tokens (at least 1) and grows again. Restarting by half a window, instead
          of sliding by one token, lets the cache be rebuilt once per
          ``context_limit // 2`` steps rather than at every step; with learned
          positions the restarted context starts again at position 0.
        """
        check_sampling_args(temperature, top_k, top_p)
        if idx.dim() != 2 or idx.size(1) == 0:
            raise ValueError(f"idx must be a (batch, time) tensor with time >= 1 (got shape {tuple(idx.shape)})")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0 (got {max_new_tokens})")

        limit = self.context_limit
        start = 0 if limit is None else max(0, idx.size(1) - limit)  # context = idx[:, start:]
        state, cached_from, cached_to = None, 0, 0  # the state holds idx[:, cached_from:cached_to]
        stopped = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        was_training = self.training
        self.eval()
        try:
            for _ in range(max_new_tokens):
                if limit is not None and idx.size(1) - start > limit:
                    start = idx.size(1) - max(1, limit // 2)
                if use_cache:
                    if state is None or cached_from != start:
                        state, cached_from, cached_to = self.init_state(idx.size(0), idx.device), start, start
                    logits, state = self.forward_step(idx[:, cached_to:], state)
                    cached_to = idx.size(1)
                else:
                    logits = self(idx[:, start:])
                next_token = sample_next_token(logits[:, -1, :], temperature, top_k, top_p, generator)
                idx = torch.cat((idx, next_token), dim=1)
                if stop_token is not None:
                    stopped |= next_token[:, 0] == stop_token
                    if stopped.all():
                        break
        finally:
            self.train(was_training)
        return idx
