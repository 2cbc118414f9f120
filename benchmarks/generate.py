"""Generation speed: tokens/s for 512 new tokens, GPT with and without the KV cache, and the LSTM.

Models are freshly initialized (speed does not depend on the weights) at the default
experiment's size and at a larger GPT; greedy decoding of one sequence on the CPU, the
way `lmforge generate` runs it. Without the cache every new token re-runs the whole context,
which is at most ``block_size`` tokens: the cache's speed-up grows with the context, so the
default model is also measured with a 512-token context (``block_size=512``), where all 512
new tokens stay in view.

    python benchmarks/generate.py [--new-tokens 512]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, write_results  # noqa: E402

from lmforge.models import (
    GPT,  # noqa: E402  # [gpt]
    LSTMLanguageModel,  # noqa: E402  # [lstm]
)

# name -> (build the model, whether it has a KV cache to compare with recomputing the context)
MODELS = {
    # [gpt]
    "gpt default (4x192, block 128)": (lambda: GPT(4096, block_size=128, n_layer=4, n_head=4, n_embd=192), True),
    # [/gpt]
    "gpt 4x192, block 512": (lambda: GPT(4096, block_size=512, n_layer=4, n_head=4, n_embd=192), True),  # [gpt]
    "gpt 6x384, block 256": (lambda: GPT(4096, block_size=256, n_layer=6, n_head=6, n_embd=384), True),  # [gpt]
    "lstm default (2x256)": (lambda: LSTMLanguageModel(4096, n_embd=256, hidden_size=256, n_layer=2), False),  # [lstm]
}


def tokens_per_second(model, new_tokens: int, use_cache: bool, repeats: int) -> float:
    prompt = torch.randint(0, 4096, (1, 8))
    model.generate(prompt, new_tokens, temperature=0, use_cache=use_cache)  # warm-up: kernels for every shape
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.generate(prompt, new_tokens, temperature=0, use_cache=use_cache)
        seconds.append(time.perf_counter() - start)
    return new_tokens / statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows, payload = [], {}
    for name, (build, has_kv_cache) in MODELS.items():
        model = build().eval()
        cached = tokens_per_second(model, args.new_tokens, True, args.repeats)
        if has_kv_cache:
            uncached = tokens_per_second(model, args.new_tokens, False, args.repeats)
            rows.append([name, f"{cached:,.0f}", f"{uncached:,.0f}", f"{cached / uncached:.1f}x"])
            payload[name] = {"cached": cached, "uncached": uncached}
        else:
            rows.append([name, f"{cached:,.0f}", "n/a (carries its state)", ""])
            payload[name] = {"stateful": cached}
    text = f"### Generation ({args.new_tokens} new tokens, greedy, batch 1, tokens/s)\n\n"
    text += markdown_table(["model", "with cache", "without cache", "speed-up"], rows)
    text += f"\nMachine: {machine()['cpu']}.\n"
    print(text)
    write_results("generate", payload, text)


if __name__ == "__main__":
    main()
