"""Hugging Face interop: import time, training and generation speed of lmforge vs `transformers`.

A GPT-2 of the 124M shape (12 layers, 768 wide, 50257 tokens; random weights, speed does not
depend on them) is saved with ``save_pretrained``, then, side by side in one run (this machine's
speed drifts, so the two sides alternate and the ratio is the median of per-round ratios):

- the time to import it into lmforge (``read_pretrained`` + building the network);
- training tokens/s of the same plain AdamW loop around lmforge's imported GPT and around
  ``GPT2LMHeadModel`` (fp32, SDPA attention in both);
- greedy generation tokens/s of lmforge's KV-cache ``generate`` (what ``lmforge generate
  temperature=0`` runs) and of ``transformers``' ``generate(do_sample=False)``, on the same weights.

    python benchmarks/hf.py [--rounds 3] [--steps 4] [--batch 4] [--block 128] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, write_results  # noqa: E402

from lmforge.training.pretrained import read_pretrained  # noqa: E402


def train_seconds_per_step(model, logits_of, batch: int, block: int, steps: int) -> float:
    """Median seconds of one optimizer step (forward, next-token loss, backward, AdamW) after a warm-up step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    generator = torch.Generator().manual_seed(0)
    seconds = []
    for step in range(steps + 1):
        ids = torch.randint(0, 50257, (batch, block + 1), generator=generator)
        start = time.perf_counter()
        logits = logits_of(model, ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:  # the first step allocates the optimizer state
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def generate_seconds(generate, prompt: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        generate(prompt)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()

    torch.manual_seed(0)
    no_dropout = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}  # lmforge's import has none either
    hf_model = GPT2LMHeadModel(GPT2Config(**no_dropout))
    with tempfile.TemporaryDirectory() as tmp:
        hf_model.save_pretrained(tmp)
        start = time.perf_counter()
        net = read_pretrained(tmp, block_size=1024).build().train()
        import_seconds = time.perf_counter() - start
    hf_model.train()
    prompt = torch.randint(0, 50257, (1, 16), generator=torch.Generator().manual_seed(1))
    new = args.new_tokens

    def lmforge_generate(ids):
        return net.generate(ids, new, temperature=0)

    def hf_generate(ids):
        return hf_model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=50256,
        )

    train_ratios, gen_ratios, train, gen = [], [], {"lmforge": [], "hf": []}, {"lmforge": [], "hf": []}
    for _ in range(args.rounds):
        ours = train_seconds_per_step(net, lambda m, x: m(x), args.batch, args.block, args.steps)
        theirs = train_seconds_per_step(hf_model, lambda m, x: m(x).logits, args.batch, args.block, args.steps)
        train["lmforge"].append(ours)
        train["hf"].append(theirs)
        train_ratios.append(theirs / ours)  # > 1: lmforge is faster
        net.eval(), hf_model.eval()
        ours, theirs = generate_seconds(lmforge_generate, prompt), generate_seconds(hf_generate, prompt)
        gen["lmforge"].append(ours)
        gen["hf"].append(theirs)
        gen_ratios.append(theirs / ours)
        net.train(), hf_model.train()

    tokens_per_step = args.batch * args.block
    rows = [
        [
            f"training, plain AdamW loop, batch {args.batch} x {args.block}",
            f"{tokens_per_step / statistics.median(train['lmforge']):,.0f}",
            f"{tokens_per_step / statistics.median(train['hf']):,.0f}",
            f"{statistics.median(train_ratios):.2f}",
        ],
        [
            f"greedy generation, {new} new tokens, batch 1",
            f"{new / statistics.median(gen['lmforge']):,.1f}",
            f"{new / statistics.median(gen['hf']):,.1f}",
            f"{statistics.median(gen_ratios):.2f}",
        ],
    ]
    text = "### Hugging Face interop (GPT-2 124M shape, fp32, tokens/s)\n\n"
    text += markdown_table(["what", "lmforge", "transformers", "lmforge / transformers"], rows)
    text += (
        f"\nImport into lmforge (read_pretrained + build): {import_seconds:.1f} s. "
        f"Ratios: median of {args.rounds} alternating rounds. Machine: {machine()['cpu']}.\n"
    )
    print(text)
    write_results(
        "hf",
        {"import_seconds": import_seconds, "train_ratios": train_ratios, "generate_ratios": gen_ratios, **vars(args)},
        text,
    )


if __name__ == "__main__":
    main()
