"""Text in, text out: a prompt continued by a network, as the CLI, the summary and the callbacks use it."""

from __future__ import annotations

from typing import Any

import torch
from tokenizers import Tokenizer


def generate_text(
    net: torch.nn.Module,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> str:
    """Continue ``prompt`` with ``net`` and return prompt + continuation as text."""
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    if not ids:
        raise ValueError("the prompt encodes to no tokens; give a non-empty prompt")
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    out = net.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    return tokenizer.decode(out[0].tolist(), skip_special_tokens=False)


def generate_sample(
    net: torch.nn.Module, tokenizer: Tokenizer, sample: Any, device: torch.device | str, seed: int | None = None
) -> str:
    """:func:`generate_text` with the settings of ``sample``: a ``sample`` or ``generate`` config node,
    or any object with ``prompt``, ``max_new_tokens``, ``temperature``, ``top_k``, ``seed`` (and
    optionally ``top_p``); ``seed`` replaces its seed."""
    return generate_text(
        net,
        tokenizer,
        sample.prompt,
        sample.max_new_tokens,
        temperature=sample.temperature,
        top_k=sample.top_k,
        top_p=getattr(sample, "top_p", None),
        seed=sample.seed if seed is None else seed,
        device=device,
    )
