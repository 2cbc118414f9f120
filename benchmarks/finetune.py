"""Fine-tuning for a task: English-to-French translation learned from scratch on the CPU.

A small character-level GPT trains on the Tatoeba English-French pairs (``data=sft``, the prompt
``Translate English to French: {source}\\nFrench: ``, loss on the French answer only) for a fixed
number of steps; a seeded random 500-pair test split (the file is sorted by length, so a slice
would not do) is answered greedily at steps 0, N/2 and N and scored with chrF and BLEU
(sacreBLEU) and exact match. Then the cost of task batches: training tokens/s on length-bucketed,
padded task micro-batches against corpus windows of the same batch size and block size, the two
alternating in one process (this machine's speed drifts), counting only real (non-padding) tokens.

    python benchmarks/finetune.py [--pairs ../shared/data/tatoeba-eng-fra/eng-fra.tsv] [--steps 1500]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import compose, markdown_table, write_results  # noqa: E402

from lmforge.cli.train import train  # noqa: E402
from lmforge.data.windows import TrainWindows  # noqa: E402
from lmforge.training.checkpoint import read_network  # noqa: E402
from lmforge.training.config import build_datamodule  # noqa: E402
from lmforge.training.loss import batch_loss  # noqa: E402
from lmforge.training.network import build_network  # noqa: E402
from lmforge.training.task_eval import TaskScores, validate_task  # noqa: E402

SHARED_PAIRS = Path(__file__).resolve().parents[2] / "shared" / "data" / "tatoeba-eng-fra" / "eng-fra.tsv"
PROMPT = "Translate English to French: {source}\nFrench: "


def overrides(pairs: Path, steps: int, log_dir: Path, test_pairs: int) -> list[str]:
    return [
        "data=sft",
        f"data.path={pairs}",
        f"data.prompt_template='{PROMPT}'",
        "data.tokenizer=char",
        "data.block_size=128",
        "data.batch_size=32",
        "data.val_size=200",
        f"data.test_size={test_pairs}",
        "data.metric_examples=0",  # scored below, on the test split
        "model=gpt",
        "model.n_layer=4",
        "model.n_head=4",
        "model.n_embd=128",
        "model.dropout=0.1",
        "optimizer.lr=2e-3",
        f"scheduler.warmup_steps={min(100, steps // 10)}",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps // 2}",
        f"callbacks.periodic_checkpoint.every_n_train_steps={steps // 2}",
        "callbacks.periodic_checkpoint.save_top_k=-1",
        "test=false",
        "logger=csv",
        "extras.print_config=false",
        f"paths.log_dir={log_dir}",
        f"paths.data_dir={log_dir.parent}/data",
    ]


def score(net: torch.nn.Module, datamodule, test_pairs: int) -> dict[str, float]:
    scores, answered = validate_task(net, datamodule, "test", TaskScores())
    assert len(answered) == test_pairs
    return scores


def tokens_per_second(net, datamodule, rounds: int, steps: int) -> dict[str, float]:
    """Training tokens/s (real tokens only) on task micro-batches and on corpus windows of the same shape."""
    examples = datamodule.examples("train")
    task = datamodule.train_loader(0, 0)
    tokens = np.concatenate([np.asarray(examples.ids[s:e]) for s, e in zip(examples.starts, examples.ends)])
    windows = TrainWindows(tokens, datamodule.block_size, datamodule.batch_size, seed=0, rank=0)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    batches = {"task": iter(task), "corpus": (windows[k] for k in range(10**9))}
    seconds = {"task": [], "corpus": []}
    counted = {"task": [], "corpus": []}
    for _ in range(rounds):
        for name in ("task", "corpus"):
            real, start = 0, time.perf_counter()
            for _ in range(steps):
                batch = next(batches[name])
                loss, _ = batch_loss(net, batch)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                real += real_tokens(batch[1])
            seconds[name].append(time.perf_counter() - start)
            counted[name].append(real)
    rates = {name: [c / s for c, s in zip(counted[name], seconds[name])] for name in seconds}
    return {name: statistics.median(values) for name, values in rates.items()}


def padding_share(datamodule, batches: int = 500) -> float:
    """The share of the computed positions that are padding, over the first ``batches`` task micro-batches."""
    loader = iter(datamodule.train_loader(0, 0))
    computed = real = 0
    for _ in range(batches):
        _, targets, _ = next(loader)
        computed += targets.numel()
        real += real_tokens(targets)
    return 1 - real / computed


def real_tokens(targets: torch.Tensor) -> int:
    """Positions of a batch that hold an example's tokens, not padding: up to the last target with a
    loss in each row (an answer ends its example; corpus windows have a loss everywhere)."""
    return sum(int(row.nonzero().max()) + 1 for row in (targets != -100) if row.any())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=Path, default=SHARED_PAIRS)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--test-pairs", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    if not args.pairs.is_file():
        sys.exit(f"error: no pairs file at {args.pairs}; pass --pairs <eng-fra.tsv>")

    with tempfile.TemporaryDirectory() as tmp:
        log_dir = Path(tmp) / "logs"
        cfg = compose(overrides(args.pairs, args.steps, log_dir, args.test_pairs))
        start = time.perf_counter()
        train(cfg)
        train_minutes = (time.perf_counter() - start) / 60
        checkpoints = sorted(Path(cfg.paths.output_dir).glob("checkpoints/periodic-step*.ckpt"))
        network = read_network(checkpoints[-1])
        data_config = {**network.data_config, "metric_examples": args.test_pairs}
        datamodule = build_datamodule(data_config, tokenizer_json=network.tokenizer_json)
        torch.manual_seed(cfg.seed)
        rows = [[0, *score(build_network(network.net_config).eval(), datamodule, args.test_pairs).values()]]
        for path in checkpoints:
            step_network = read_network(path)
            step = int(path.stem.split("step")[-1])
            rows.append([step, *score(step_network.build(), datamodule, args.test_pairs).values()])
        speed = tokens_per_second(network.build().train(), datamodule, args.rounds, steps=5)
        padding = padding_share(datamodule)

    quality = [[step, f"{em:.1f}", f"{chrf:.1f}", f"{bleu:.1f}"] for step, em, chrf, bleu in rows]
    markdown = (
        f"### Translation fine-tuning from scratch ({args.steps} steps, {train_minutes:.1f} min; "
        f"{args.test_pairs} test pairs, greedy)\n\n"
        + markdown_table(["step", "exact match", "chrF", "BLEU"], quality)
        + "\n"
        + markdown_table(
            ["batches", "real tokens/s", "vs corpus"],
            [
                ["task (bucketed, padded)", f"{speed['task']:,.0f}", f"{speed['task'] / speed['corpus']:.2f}"],
                ["corpus windows", f"{speed['corpus']:,.0f}", "1.00"],
            ],
        )
        + f"\nPadding: {100 * padding:.1f}% of the positions of the task micro-batches (batch 32, bucketed).\n"
    )
    print(markdown)
    write_results(
        "finetune",
        {"quality": rows, "tokens_per_second": speed, "padding_share": padding, "steps": args.steps},
        markdown,
    )


if __name__ == "__main__":
    main()
