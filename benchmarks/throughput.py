"""Training throughput: the template's Trainer (and Fabric) path against a plain PyTorch loop.

The same model config, batch, data and number of steps run through
  (a) a minimal PyTorch loop written here (AdamW, warmup + cosine schedule, grad clipping),
  (b) `lmforge train` (the Lightning Trainer path, default callbacks and TensorBoard logger),
  (c) the Fabric loop (`lmforge fabric`), where the project has it.
The paths alternate (a b c a b c ...) so that machine noise hits all of them alike; each
figure is the median over windows of steps after warm-up. MFU is against the fp32 matmul
peak measured by this script on this machine (or ``--peak-flops`` on GPUs).

    python benchmarks/throughput.py [--quick]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    compose,
    corpus_file,
    machine,
    markdown_table,
    matmul_peak_flops,
    median_window_seconds,
    write_results,
)

CONFIGS = {
    # nanoGPT's shakespeare_char CPU configuration (without the GPT: the default model at its own size).
    "shakespeare_char": dict(
        model=dict(n_layer=4, n_head=4, n_embd=128),  # [gpt]
        block_size=64, batch_size=12, steps=240, warmup=40, window=20,
    ),
    # [gpt]
    # A larger model: 6 layers, 384 dims, block 256.
    "gpt_6x384": dict(
        model=dict(n_layer=6, n_head=6, n_embd=384), block_size=256, batch_size=8, steps=26, warmup=6, window=5
    ),
    # [/gpt]
}


class StepTimer(L.Callback):
    """Wall-clock time of every training step; the newest instance is ``StepTimer.latest``."""

    latest: StepTimer | None = None

    def __init__(self) -> None:
        self.times: list[float] = []
        self._last: float | None = None
        StepTimer.latest = self

    def on_train_batch_end(self, *args, **kwargs) -> None:  # Trainer and Fabric loop alike
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now


ON_CPU = ("trainer.num_sanity_val_steps=0", "trainer.accelerator=cpu")  # the Trainer's settings


def overrides_for(name: str, corpus: Path, tmp: Path, device: tuple[str, ...] = ON_CPU) -> list[str]:
    """A run of ``CONFIGS[name]`` on ``corpus``, its output under ``tmp``; ``device``: where and how it runs."""
    spec = CONFIGS[name]
    model = [f"model.{key}={value}" for key, value in spec.get("model", {}).items()]
    return [
        "data=text_files", f"data.path={corpus}", "data.tokenizer=char", "data.split=contiguous",
        f"data.block_size={spec['block_size']}", f"data.batch_size={spec['batch_size']}", "data.eval_windows=8",
        *model, f"trainer.max_steps={spec['steps']}", f"trainer.val_check_interval={spec['steps'] + 1}",
        *device,
        "test=false", "extras.print_config=false",
        "scheduler.warmup_steps=10", "sample.max_new_tokens=1",
        f"paths.log_dir={tmp}/logs", f"paths.data_dir={tmp}/data",
    ]


def run_plain(name: str, cfg) -> list[float]:
    """(a) The minimal loop: same model class, data windows, AdamW groups, schedule and clipping."""
    from hydra.utils import instantiate

    from lmforge.config import build_datamodule

    spec = CONFIGS[name]
    datamodule = build_datamodule(cfg.data)
    datamodule.prepare_data()
    tokens = datamodule.tokens("train")
    torch.manual_seed(cfg.seed)
    model = instantiate(cfg.model, vocab_size=datamodule.vocab_size)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.optimizer.lr, betas=tuple(cfg.optimizer.betas), fused=True,  # the kernel the template picks
    )
    steps, warmup = spec["steps"], cfg.scheduler.warmup_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    block, batch = spec["block_size"], spec["batch_size"]
    rng = np.random.default_rng(0)
    times, last = [], None
    model.train()
    for _ in range(steps):
        offsets = rng.integers(0, len(tokens) - block - 1, batch)
        window = torch.from_numpy(tokens[offsets[:, None] + np.arange(block + 1)].astype(np.int64))
        x, y = window[:, :-1], window[:, 1:]
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        now = time.perf_counter()
        if last is not None:
            times.append(now - last)
        last = now
    return times


def run_trainer(cfg) -> list[float]:
    """(b) The template's Trainer path, as `lmforge train` runs it, plus a step timer."""
    from omegaconf import open_dict

    from lmforge.train import train

    with open_dict(cfg):
        cfg.callbacks.step_timer = {"_target_": f"{StepTimer.__module__}.StepTimer"}
    train(cfg)
    return StepTimer.latest.times


# [fabric]
def run_fabric(cfg) -> list[float]:
    """(c) The Fabric loop, as `lmforge fabric` runs it, plus a step timer."""
    from omegaconf import open_dict

    from lmforge.fabric_train import fit

    with open_dict(cfg):
        cfg.callbacks.step_timer = {"_target_": f"{StepTimer.__module__}.StepTimer"}
        cfg.trainer.checkpoint_every_n_steps = cfg.trainer.max_steps
    fit(cfg)
    return StepTimer.latest.times
# [/fabric]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps, for a smoke test")
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds per path")
    parser.add_argument("--peak-flops", type=float, default=None, help="device peak FLOP/s (default: measured)")
    args = parser.parse_args()
    if args.quick:
        for spec in CONFIGS.values():
            spec.update(steps=max(12, spec["steps"] // 6), warmup=2, window=3)

    peak = args.peak_flops or matmul_peak_flops()
    rows, payload = [], {"peak_flops": peak, "configs": {}}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        corpus = corpus_file(tmp)
        for name in args.configs:
            spec = CONFIGS[name]
            step_times: dict[str, list[float]] = {
                "plain": [],
                "trainer": [],
                "fabric": [],  # [fabric]
            }
            flops_per_step = None
            for _ in range(args.repeats):
                cfg = compose(overrides_for(name, corpus, tmp))
                times = run_plain(name, cfg)
                step_times["plain"].append(median_window_seconds(times, spec["warmup"], spec["window"]))
                cfg = compose(overrides_for(name, corpus, tmp))
                times = run_trainer(cfg)
                step_times["trainer"].append(median_window_seconds(times, spec["warmup"], spec["window"]))
                # [fabric]
                times = run_fabric(compose(overrides_for(name, corpus, tmp, ("fabric.accelerator=cpu",)), "fabric"))
                step_times["fabric"].append(median_window_seconds(times, spec["warmup"], spec["window"]))
                # [/fabric]
                if flops_per_step is None:
                    from hydra.utils import instantiate

                    net = instantiate(cfg.model, vocab_size=65)
                    tokens = spec["batch_size"] * spec["block_size"]
                    flops_per_step = net.flops_per_token(spec["block_size"]) * tokens
            tokens_per_step = spec["batch_size"] * spec["block_size"]
            result = {}
            for path, values in step_times.items():
                if not values:
                    continue
                seconds = float(np.median(values))
                result[path] = {
                    "ms_per_step": seconds * 1e3,
                    "tokens_per_s": tokens_per_step / seconds,
                    "mfu": flops_per_step / seconds / peak,
                    "rounds": values,
                }
            # Ratios within each round, then their median: the machine's speed drifts between rounds.
            for path in result.keys() - {"plain"}:
                ratios = [a / b for a, b in zip(step_times["plain"], step_times[path])]
                result[path]["ratio_vs_plain"] = float(np.median(ratios))
                result[path]["round_ratios"] = ratios
            payload["configs"][name] = result
            for path, r in result.items():
                rows.append([
                    name, path, f"{r['ms_per_step']:.1f}", f"{r['tokens_per_s']:,.0f}", f"{100 * r['mfu']:.1f}%",
                    f"{r.get('ratio_vs_plain', 1.0):.3f}",
                ])
    headers = ["config", "path", "ms/step", "tokens/s", "MFU", "speed vs plain"]
    table = markdown_table(headers, rows)
    text = (
        f"### Throughput (fp32 matmul peak measured here: {peak / 1e9:.0f} GFLOP/s)\n\n{table}\n"
        f"Speed vs plain: the median over {args.repeats} alternating rounds of the per-round ratio of "
        f"ms/step. Machine: {machine()['cpu']}, torch {torch.__version__}.\n"
    )
    print(text)
    write_results("throughput", payload, text)


if __name__ == "__main__":
    main()
