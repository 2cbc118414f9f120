"""A multi-layer LSTM language model, the classic recurrent baseline."""

from __future__ import annotations

import torch
from torch import nn

from lmforge.models.base import LanguageModel

LSTMState = tuple[torch.Tensor, torch.Tensor]


class LSTMLanguageModel(LanguageModel):
    """Embedding -> dropout -> stacked LSTM -> dropout -> linear head over the vocabulary.

    ``tie_weights`` shares the embedding matrix with the head and needs
    ``hidden_size == n_embd``. ``block_size`` is only stored, so configs can pass
    the training window; the recurrence itself has no context limit.
    """

    def __init__(
        self,
        vocab_size: int,
        n_embd: int = 256,
        hidden_size: int = 512,
        n_layer: int = 2,
        dropout: float = 0.2,
        tie_weights: bool = False,
        block_size: int | None = None,
    ):
        super().__init__()
        sizes = {"vocab_size": vocab_size, "n_embd": n_embd, "hidden_size": hidden_size, "n_layer": n_layer}
        for name, value in sizes.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1 (got {value})")
        if block_size is not None and block_size < 1:
            raise ValueError(f"block_size must be >= 1 or None (got {block_size})")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1) (got {dropout}); use e.g. 0.0 or 0.2")
        if tie_weights and hidden_size != n_embd:
            raise ValueError(
                f"tie_weights=True needs hidden_size == n_embd (got hidden_size={hidden_size}, n_embd={n_embd}); "
                f"set hidden_size={n_embd} or tie_weights=False"
            )

        self.vocab_size = vocab_size
        self.n_embd = n_embd
        self.hidden_size = hidden_size
        self.n_layer = n_layer
        self.block_size = block_size

        self.embedding = nn.Embedding(vocab_size, n_embd)
        self.drop = nn.Dropout(dropout)
        # nn.LSTM applies its dropout between layers only, so it has no effect with one layer.
        self.lstm = nn.LSTM(n_embd, hidden_size, n_layer, batch_first=True, dropout=dropout if n_layer > 1 else 0.0)
        self.head = nn.Linear(hidden_size, vocab_size)
        if tie_weights:
            self.head.weight = self.embedding.weight

        # As in the classic PyTorch word-level language model example; the LSTM
        # keeps PyTorch's default initialisation.
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.uniform_(self.head.weight, -0.1, 0.1)
        nn.init.zeros_(self.head.bias)

    def _logits(self, idx: torch.Tensor, state: LSTMState | None) -> tuple[torch.Tensor, LSTMState]:
        x = self.drop(self.embedding(idx))
        out, state = self.lstm(x, state)
        return self.head(self.drop(out)), state

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) for token ids ``idx`` (B, T), starting from a zero state."""
        return self._logits(idx, None)[0]

    def init_state(self, batch_size: int, device: torch.device | str) -> LSTMState:
        """Zero hidden and cell states (h, c), each (n_layer, batch_size, hidden_size)."""
        dtype = self.head.weight.dtype
        h = torch.zeros(self.n_layer, batch_size, self.hidden_size, dtype=dtype, device=device)
        return h, torch.zeros_like(h)

    def forward_step(self, idx: torch.Tensor, state: LSTMState) -> tuple[torch.Tensor, LSTMState]:
        """Logits (B, T_new, V) for ``idx`` (B, T_new) continuing from ``state``, and the new (h, c)."""
        return self._logits(idx, state)
