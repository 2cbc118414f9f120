"""A decoder-only transformer (GPT) with a few switchable modern variants.

Pre-norm blocks (norm -> causal self-attention -> residual, norm -> MLP ->
residual), then a final norm and a linear head over the vocabulary. Options:
learned or rotary (RoPE) positions, LayerNorm or RMSNorm, GELU / squared-ReLU /
SwiGLU MLPs, per-head RMSNorm of queries and keys (QK-norm), grouped-query
attention (fewer key/value heads than query heads), weight tying between the
token embedding and the head. The options cover the GPT-2 and Llama-family
layouts, so their Hugging Face weights load into this class (see ``gpt_hf.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.models.base import LanguageModel

POS_EMBEDDINGS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "gelu_tanh", "swiglu", "relu2")
DEFAULT_NORM_EPS = {"layernorm": 1e-5, "rmsnorm": 1e-6}


def make_norm(kind: str, dim: int, bias: bool, eps: float) -> nn.Module:
    """A LayerNorm (with a bias if ``bias``) or an RMSNorm over the last ``dim`` features."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    return nn.RMSNorm(dim, eps=eps)


def rope_tables(head_dim: int, max_len: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, each (max_len, head_dim // 2).

    Feature pair i of position t is rotated by t * base ** (-2i / head_dim).
    """
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the feature pairs (x[..., i], x[..., i + d/2]) of x (B, H, T, d) by the angles of cos, sin (T, d/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


@dataclass
class KVCache:
    """GPT generation state: per-layer keys and values (B, n_kv_head, block_size, head_dim), ``pos`` filled."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    pos: int = 0


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each position attends to itself and the positions before it.

    With ``n_kv_head`` < ``n_head`` (grouped-query attention), each group of n_head / n_kv_head
    query heads shares one key/value head, which shrinks the KV cache by that factor.
    """

    def __init__(
        self, n_embd: int, n_head: int, n_kv_head: int, dropout: float, bias: bool, qkv_bias: bool, qk_norm: bool
    ):
        super().__init__()
        self.n_head = n_head
        self.n_kv_head = n_kv_head
        self.head_dim = n_embd // n_head
        self.dropout = dropout
        # Separate query (n_head heads), key and value (n_kv_head heads each) projections rather than one
        # fused matrix: tensor parallelism splits each by heads (see gpt_parallelize.py).
        self.c_q = nn.Linear(n_embd, n_head * self.head_dim, bias=qkv_bias)
        self.c_k = nn.Linear(n_embd, n_kv_head * self.head_dim, bias=qkv_bias)
        self.c_v = nn.Linear(n_embd, n_kv_head * self.head_dim, bias=qkv_bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        kv_cache: tuple[torch.Tensor, torch.Tensor] | None,
        pos: int,
    ) -> torch.Tensor:
        """Attend over x (B, T, C), whose first token is at position ``pos``.

        Without a cache, x is the whole sequence (``pos`` is 0). With one, the new
        keys and values are written into the cache at ``pos`` and the queries
        attend to everything cached so far.
        """
        B, T, _ = x.shape
        # Head counts come from the projections' outputs: under tensor parallelism a process holds some heads.
        q = self.c_q(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, n_head, T, head_dim)
        k = self.c_k(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, n_kv_head, T, head_dim)
        v = self.c_v(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)

        dropout_p = self.dropout if self.training else 0.0
        gqa = q.size(1) != k.size(1)
        if kv_cache is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=gqa)
        else:
            keys, values = kv_cache
            keys[:, :, pos : pos + T] = k
            values[:, :, pos : pos + T] = v
            k, v = keys[:, :, : pos + T], values[:, :, : pos + T]
            # A single new token may see the whole cache. A block of T new tokens
            # needs a causal mask shifted right by the pos cached tokens:
            # new token i sees keys 0 .. pos + i.
            mask = None
            if T > 1:
                mask = torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(diagonal=pos)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa)

        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward network.

    "gelu", "gelu_tanh" (GPT-2's tanh approximation of GELU) and "relu2" (relu(x)^2)
    use two matrices with a hidden size of 4 * n_embd by default. "swiglu" computes
    silu(x W_gate) * (x W_fc) W_proj with three matrices, so its default hidden size
    is 8/3 * n_embd (rounded up to a multiple of 8) to keep about the same parameter
    count and FLOPs. ``hidden`` overrides the default (e.g. a pretrained model's
    intermediate size).
    """

    def __init__(self, n_embd: int, kind: str, dropout: float, bias: bool, hidden: int | None = None):
        super().__init__()
        self.kind = kind
        if hidden is None:
            hidden = default_mlp_hidden(n_embd, kind)
        # SwiGLU's gate is its own matrix (not fused with c_fc): tensor parallelism splits both by columns.
        self.c_gate = nn.Linear(n_embd, hidden, bias=bias) if kind == "swiglu" else None
        self.c_fc = nn.Linear(n_embd, hidden, bias=bias)
        self.c_proj = nn.Linear(hidden, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Transform each position of x (B, T, C) independently."""
        h = self.c_fc(x)
        if self.kind == "gelu":
            h = F.gelu(h)
        elif self.kind == "gelu_tanh":
            h = F.gelu(h, approximate="tanh")
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:
            h = F.silu(self.c_gate(x)) * h
        return self.dropout(self.c_proj(h))


def default_mlp_hidden(n_embd: int, kind: str) -> int:
    """The MLP's hidden size when none is given: 4 * n_embd, or 8/3 * n_embd (to a multiple of 8) for SwiGLU."""
    return 8 * math.ceil(n_embd / 3) if kind == "swiglu" else 4 * n_embd


class Block(nn.Module):
    """One pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(
        self,
        n_embd: int,
        n_head: int,
        n_kv_head: int,
        dropout: float,
        bias: bool,
        qkv_bias: bool,
        norm: str,
        norm_eps: float,
        mlp: str,
        mlp_hidden: int | None,
        qk_norm: bool,
    ):
        super().__init__()
        self.norm_1 = make_norm(norm, n_embd, bias, norm_eps)
        self.attn = CausalSelfAttention(n_embd, n_head, n_kv_head, dropout, bias, qkv_bias, qk_norm)
        self.norm_2 = make_norm(norm, n_embd, bias, norm_eps)
        self.mlp = MLP(n_embd, mlp, dropout, bias, mlp_hidden)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        kv_cache: tuple[torch.Tensor, torch.Tensor] | None,
        pos: int,
    ) -> torch.Tensor:
        """Apply the block to x (B, T, C); see ``CausalSelfAttention.forward`` for the other arguments."""
        x = x + self.attn(self.norm_1(x), rope, kv_cache, pos)
        return x + self.mlp(self.norm_2(x))


def shorten_context(state: dict[str, torch.Tensor], block_size: int) -> dict[str, torch.Tensor]:
    """A GPT state dict for a context of ``block_size`` tokens: a learned position table keeps its first
    ``block_size`` rows (RoPE has no table). The table cannot grow: positions beyond it were never learned."""
    table = state.get("wpe.weight")
    if table is not None and table.shape[0] < block_size:
        raise ValueError(f"the learned position table has {table.shape[0]} rows, fewer than block_size={block_size}")
    return state if table is None else {**state, "wpe.weight": table[:block_size]}


class GPT(LanguageModel):
    """Decoder-only transformer language model with a context of ``block_size`` tokens.

    ``pos_embedding`` is "learned" or "rope" (rotary, base ``rope_base``), ``norm``
    "layernorm" or "rmsnorm" (epsilon ``norm_eps``, by default 1e-5 and 1e-6), ``mlp``
    "gelu", "gelu_tanh", "swiglu" or "relu2" (hidden size ``mlp_hidden``, by default
    4 * n_embd, or 8/3 * n_embd for SwiGLU); ``qk_norm`` RMS-normalises each head's
    queries and keys; ``n_kv_head`` (default ``n_head``) key/value heads are shared by
    groups of query heads; ``bias`` adds biases to the linear layers and LayerNorms,
    ``qkv_bias`` (default ``bias``) to the query/key/value projection alone;
    ``tie_weights`` shares the token embedding with the output head;
    ``zero_init_proj`` zero-initialises the residual projections.
    """

    def __init__(
        self,
        vocab_size: int,
        block_size: int = 256,
        n_layer: int = 6,
        n_head: int = 6,
        n_embd: int = 384,
        dropout: float = 0.0,
        bias: bool = False,
        pos_embedding: str = "learned",
        norm: str = "layernorm",
        mlp: str = "gelu",
        qk_norm: bool = False,
        tie_weights: bool = True,
        zero_init_proj: bool = False,
        rope_base: float = 10000.0,
        n_kv_head: int | None = None,
        mlp_hidden: int | None = None,
        norm_eps: float | None = None,
        qkv_bias: bool | None = None,
    ):
        super().__init__()
        sizes = {
            "vocab_size": vocab_size,
            "block_size": block_size,
            "n_layer": n_layer,
            "n_head": n_head,
            "n_embd": n_embd,
        }
        for name, value in sizes.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1 (got {value})")
        if n_embd % n_head != 0:
            fitting_head = max(h for h in range(1, n_head + 1) if n_embd % h == 0)
            raise ValueError(
                f"n_embd ({n_embd}) must be divisible by n_head ({n_head}); "
                f"pick e.g. n_embd={math.ceil(n_embd / n_head) * n_head} or n_head={fitting_head}"
            )
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1) (got {dropout}); use e.g. 0.0 or 0.1")
        choices = {"pos_embedding": (pos_embedding, POS_EMBEDDINGS), "norm": (norm, NORMS), "mlp": (mlp, MLPS)}
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))} (got {value!r})")
        head_dim = n_embd // n_head
        if pos_embedding == "rope" and head_dim % 2 != 0:
            raise ValueError(
                f"pos_embedding='rope' needs an even head size, but n_embd / n_head = {head_dim}; "
                "choose n_embd and n_head so that n_embd // n_head is even"
            )
        if not rope_base > 0:
            raise ValueError(f"rope_base must be > 0 (got {rope_base}); the usual value is 10000.0")
        n_kv_head = n_head if n_kv_head is None else n_kv_head
        if n_kv_head < 1 or n_head % n_kv_head != 0:
            divisors = [h for h in range(1, n_head + 1) if n_head % h == 0]
            raise ValueError(
                f"n_kv_head ({n_kv_head}) must divide n_head ({n_head}); pick one of {divisors}, or null for n_head"
            )
        if mlp_hidden is not None and mlp_hidden < 1:
            raise ValueError(f"mlp_hidden must be >= 1 (got {mlp_hidden}), or null for the default size")
        norm_eps = DEFAULT_NORM_EPS[norm] if norm_eps is None else norm_eps
        if not norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0 (got {norm_eps}), or null for {DEFAULT_NORM_EPS[norm]}")
        qkv_bias = bias if qkv_bias is None else qkv_bias

        self.vocab_size = vocab_size
        self.block_size = block_size
        self.n_layer = n_layer
        self.n_head = n_head
        self.n_kv_head = n_kv_head
        self.n_embd = n_embd
        self.pos_embedding = pos_embedding

        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd) if pos_embedding == "learned" else None
        if pos_embedding == "rope":
            cos, sin = rope_tables(head_dim, block_size, rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(n_embd, n_head, n_kv_head, dropout, bias, qkv_bias, norm, norm_eps, mlp, mlp_hidden, qk_norm)
            for _ in range(n_layer)
        )
        self.norm_f = make_norm(norm, n_embd, bias, norm_eps)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        if tie_weights:
            self.lm_head.weight = self.wte.weight

        # GPT-2 initialisation; the projections that write into the residual
        # stream are scaled down with depth (or zeroed, so each block starts as
        # the identity).
        self.apply(self._init_weights)
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                if zero_init_proj:
                    nn.init.zeros_(param)
                else:
                    nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def context_limit(self) -> int:
        """The model attends to at most ``block_size`` tokens."""
        return self.block_size

    def repeated_blocks(self) -> list[nn.Module]:
        return list(self.blocks)

    def position_parameters(self) -> list[nn.Parameter]:
        """The learned position table, if positions are learned."""
        return [] if self.wpe is None else [self.wpe.weight]

    def no_weight_decay_param_names(self) -> set[str]:
        """The learned position table ("wpe.weight") is not decayed."""
        return set() if self.wpe is None else {"wpe.weight"}

    def hidden_matrix_names(self) -> set[str]:
        """The 2-D weights inside the transformer blocks."""
        return {name for name, p in self.blocks.named_parameters(prefix="blocks") if p.ndim == 2}

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """6 * N plus attention's 12 * n_layer * n_embd * seq_len (seq_len defaults to block_size)."""
        seq_len = self.block_size if seq_len is None else seq_len
        return super().flops_per_token() + 12.0 * self.n_layer * self.n_embd * seq_len

    def _logits(self, idx: torch.Tensor, pos: int, cache: KVCache | None) -> torch.Tensor:
        """Run tokens idx (B, T) starting at position ``pos`` through the network, reading/writing ``cache``."""
        T = idx.size(1)
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(pos, pos + T, device=idx.device))
        rope = None
        if self.pos_embedding == "rope":
            rope = (self.rope_cos[pos : pos + T], self.rope_sin[pos : pos + T])
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            kv = None if cache is None else (cache.keys[i], cache.values[i])
            x = block(x, rope, kv, pos)
        return self.lm_head(self.norm_f(x))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) for token ids ``idx`` (B, T), T <= block_size."""
        T = idx.size(1)
        if T > self.block_size:
            raise ValueError(
                f"sequence length T={T} exceeds block_size={self.block_size}; "
                "crop the input to the last block_size tokens or build the model with a larger block_size"
            )
        return self._logits(idx, 0, None)

    def init_state(self, batch_size: int, device: torch.device | str) -> KVCache:
        """An empty KV cache with room for ``block_size`` tokens.

        It is stored in the autocast dtype when autocast is on for ``device``,
        otherwise in the model's dtype.
        """
        device = torch.device(device)
        if torch.is_autocast_enabled(device.type):
            dtype = torch.get_autocast_dtype(device.type)
        else:
            dtype = self.wte.weight.dtype
        shape = (batch_size, self.n_kv_head, self.block_size, self.n_embd // self.n_head)
        return KVCache(
            keys=[torch.empty(shape, dtype=dtype, device=device) for _ in self.blocks],
            values=[torch.empty(shape, dtype=dtype, device=device) for _ in self.blocks],
        )

    def forward_step(self, idx: torch.Tensor, state: KVCache) -> tuple[torch.Tensor, KVCache]:
        """Logits (B, T_new, V) for ``idx`` (B, T_new) following the cached tokens; updates ``state`` in place."""
        T = idx.size(1)
        if state.pos + T > self.block_size:
            raise ValueError(
                f"the KV cache holds {state.pos} tokens and cannot take {T} more (block_size={self.block_size}); "
                "start a fresh state with init_state() on a shorter context"
            )
        logits = self._logits(idx, state.pos, state)
        state.pos += T
        return logits, state
