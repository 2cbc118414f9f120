"""Training throughput: the template's Trainer (and Fabric) path against a plain PyTorch loop.

The same model config, batch, data and number of steps run through
  (a) a minimal PyTorch loop written here (AdamW, warmup + cosine schedule, grad clipping),
  (b) `lmforge train` (the Lightning Trainer path, default callbacks and TensorBoard logger),
  (c) the Fabric loop (`lmforge fabric`), where the project has it.
Each path runs in its own worker process, and the workers take turns: after a warm-up, one
worker runs a window of steps while the others wait (blocked on a pipe, using no CPU), then
hands over to the next; a round is one window of every path. Each window starts with one
untimed step (the caches and threads settle after the hand-over), then times ``window`` steps
(25 at the small config: exactly one of them logs, as in a default run).

Shared machines change speed from one second to the next (this VM's step times vary by up
to 25%), so every path sees the same mix of fast and slow moments only when the turns are
short and many. Figures per path are the lower quartile of its window means: noise only
ever slows a step down, and the lower quartile is the least disturbed estimate that still
holds a quarter of the windows. Speed vs plain is the ratio of those figures; the same ratio
from the first and the second half of the rounds shows how far the noise moves it, and a
second, identical plain-loop process (the "control" row) shows how far two processes of the
same code differ in the same run: ratios within that distance of 1 are not told apart. MFU
is against the fp32 matmul peak measured by this script on this machine (or ``--peak-flops``).

    python benchmarks/throughput.py [--quick] [--configs shakespeare_char] [--rounds 15]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
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
    write_results,
)

CONFIGS = {
    # nanoGPT's shakespeare_char CPU configuration (without the GPT: the default model at its own size).
    "shakespeare_char": dict(
        model=dict(n_layer=4, n_head=4, n_embd=128),  # [gpt]
        block_size=64,
        batch_size=12,
        warmup=30,
        window=25,
        rounds=60,
    ),
    # [gpt]
    # A larger model: 6 layers, 384 dims, block 256.
    "gpt_6x384": dict(
        model=dict(n_layer=6, n_head=6, n_embd=384), block_size=256, batch_size=8, warmup=3, window=2, rounds=15
    ),
    # [/gpt]
}
PATHS = [
    "plain",
    "control",  # a second plain-loop process: how far two identical processes differ in this run
    "trainer",
    "fabric",  # [fabric]
]


class Baton(L.Callback):
    """Runs windows of ``window + 1`` training steps, taking turns with the other paths' workers.

    After ``warmup`` steps the worker reports ``ready`` on ``report`` and waits for a ``go`` line
    on ``go``; from then on, after each window it reports the wall time of the window's last
    ``window`` steps (seconds, comma-separated) and waits again. After ``rounds`` windows it
    waits once more, so that the end of its run (the Trainer's last checkpoint, ...) overlaps no
    other worker's window.
    """

    current: Baton | None = None

    def __init__(self, go, report, warmup: int, window: int, rounds: int) -> None:
        self.go, self.report = go, report
        self.warmup, self.turn, self.rounds = warmup, window + 1, rounds
        self.steps = 0
        self.step_ends: list[float] = []

    def step_done(self) -> None:
        self.steps += 1
        done = self.steps - self.warmup  # steps since the warm-up
        if done == 0:
            self._hand_over("ready")
        elif 0 < done <= self.turn * self.rounds:
            self.step_ends.append(time.perf_counter())
            if done % self.turn == 0:  # the first step of the turn settles, the others are timed
                self._hand_over(",".join(repr(b - a) for a, b in zip(self.step_ends, self.step_ends[1:])))

    def on_train_batch_end(self, *args, **kwargs) -> None:  # the Trainer's hook and the Fabric loop's alike
        self.step_done()

    def _hand_over(self, message: str) -> None:
        self.report.write(message + "\n")
        self.report.flush()
        if self.go.readline().strip() != "go":
            raise SystemExit("throughput worker: the benchmark process went away")
        self.step_ends = []


def current_baton() -> Baton:
    """The worker's :class:`Baton`, for a ``callbacks`` config node (``_target_`` of this function)."""
    return Baton.current


def total_steps(spec: dict) -> int:
    return spec["warmup"] + (spec["window"] + 1) * spec["rounds"]


ON_CPU = ("trainer.num_sanity_val_steps=0", "trainer.accelerator=cpu")  # the Trainer's settings


def overrides_for(spec: dict, corpus: Path, tmp: Path, device: tuple[str, ...] = ON_CPU) -> list[str]:
    """A run of config ``spec`` on ``corpus``, its output under ``tmp``; ``device``: where and how it runs."""
    model = [f"model.{key}={value}" for key, value in spec.get("model", {}).items()]
    steps = total_steps(spec)
    return [
        "data=text_files",
        f"data.path={corpus}",
        "data.tokenizer=char",
        "data.split=contiguous",
        f"data.block_size={spec['block_size']}",
        f"data.batch_size={spec['batch_size']}",
        "data.eval_windows=8",
        *model,
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps + 1}",
        *device,
        "test=false",
        "extras.print_config=false",
        f"scheduler.warmup_steps={min(10, steps // 2)}",
        "sample.max_new_tokens=1",
        f"paths.log_dir={tmp}/logs",
        f"paths.data_dir={tmp}/data",
    ]


def run_plain(spec: dict, cfg, baton: Baton) -> None:
    """(a) The minimal loop: same model class, data windows, AdamW groups, schedule and clipping."""
    from hydra.utils import instantiate

    from lmforge.training.config import build_datamodule

    datamodule = build_datamodule(cfg.data)
    datamodule.prepare_data()
    tokens = datamodule.tokens("train")
    torch.manual_seed(cfg.seed)
    model = instantiate(cfg.model, vocab_size=datamodule.vocab_size)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.optimizer.lr,
        betas=tuple(cfg.optimizer.betas),
        fused=True,  # the kernel the template picks
    )
    steps, warmup = total_steps(spec), cfg.scheduler.warmup_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    block, batch = spec["block_size"], spec["batch_size"]
    rng = np.random.default_rng(0)
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
        baton.step_done()


def run_trainer(cfg) -> None:
    """(b) The template's Trainer path, as `lmforge train` runs it, plus the baton callback."""
    from omegaconf import open_dict

    from lmforge.cli.train import train

    with open_dict(cfg):
        cfg.callbacks.baton = {"_target_": f"{__name__}.current_baton"}
    train(cfg)


# [fabric]
def run_fabric(cfg) -> None:
    """(c) The Fabric loop, as `lmforge fabric` runs it, plus the baton callback."""
    from omegaconf import open_dict

    from lmforge.fabric.loop import fit

    with open_dict(cfg):
        cfg.callbacks.baton = {"_target_": f"{__name__}.current_baton"}
        cfg.trainer.checkpoint_every_n_steps = cfg.trainer.max_steps
    fit(cfg)


# [/fabric]


def worker(path: str, spec: dict, corpus: Path, tmp: Path, report_fd: int) -> None:
    """One path's training run in this process, timed by a :class:`Baton` on stdin / ``report_fd``."""
    Baton.current = baton = Baton(sys.stdin, os.fdopen(report_fd, "w"), spec["warmup"], spec["window"], spec["rounds"])
    if path in ("plain", "control"):
        run_plain(spec, compose(overrides_for(spec, corpus, tmp)), baton)
    elif path == "trainer":
        run_trainer(compose(overrides_for(spec, corpus, tmp)))
    # [fabric]
    elif path == "fabric":
        run_fabric(compose(overrides_for(spec, corpus, tmp, ("fabric.accelerator=cpu",)), "fabric"))
    # [/fabric]


class Worker:
    """A worker process of one path; ``windows`` collects the step times of its timed windows."""

    def __init__(self, path: str, spec: dict, corpus: Path, tmp: Path) -> None:
        self.path = path
        self.log = tmp / f"worker-{path}.log"
        read_fd, write_fd = os.pipe()
        command = [
            sys.executable,
            __file__,
            "--worker",
            path,
            "--spec",
            json.dumps(spec),
            "--corpus",
            str(corpus),
            "--tmp",
            str(tmp),
            "--report-fd",
            str(write_fd),
        ]
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, text=True, pass_fds=(write_fd,)
            )
        os.close(write_fd)
        self.reports = os.fdopen(read_fd)
        self.windows: list[list[float]] = []  # the step times of each timed window

    def wait_report(self) -> str:
        line = self.reports.readline().strip()
        if not line:
            self.process.wait()
            tail = self.log.read_text()[-3000:]
            raise RuntimeError(f"the {self.path} worker exited ({self.process.returncode}) early:\n{tail}")
        return line

    def go(self) -> None:
        self.process.stdin.write("go\n")
        self.process.stdin.flush()

    def timed_window(self) -> None:
        self.go()
        self.windows.append([float(seconds) for seconds in self.wait_report().split(",")])

    def finish(self) -> None:
        self.go()
        if self.process.wait() != 0:
            raise RuntimeError(
                f"the {self.path} worker failed ({self.process.returncode}):\n{self.log.read_text()[-3000:]}"
            )


def measure(spec: dict, corpus: Path, tmp: Path) -> dict[str, list[list[float]]]:
    """The step times (seconds) of each path's windows, one window per round; the paths take turns."""
    from lmforge.training.config import build_datamodule

    build_datamodule(compose(overrides_for(spec, corpus, tmp)).data).prepare_data()  # the workers share the cache
    workers = [Worker(path, spec, corpus, tmp) for path in PATHS]
    try:
        for w in workers:
            if w.wait_report() != "ready":
                raise RuntimeError(f"the {w.path} worker did not get ready")
        for r in range(spec["rounds"]):
            for w in workers[r % len(workers) :] + workers[: r % len(workers)]:  # rotate who goes first
                w.timed_window()
        for w in workers:
            w.finish()
    finally:
        for w in workers:
            if w.process.poll() is None:
                w.process.kill()
    return {w.path: w.windows for w in workers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer and shorter rounds, for a smoke test")
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS))
    parser.add_argument("--rounds", type=int, default=None, help="rounds per config (default: the config's)")
    parser.add_argument("--peak-flops", type=float, default=None, help="device peak FLOP/s (default: measured)")
    parser.add_argument("--worker", choices=PATHS, help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tmp", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--report-fd", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, json.loads(args.spec), args.corpus, args.tmp, args.report_fd)
        return

    from hydra.utils import instantiate

    peak = args.peak_flops or matmul_peak_flops()
    rows, payload = [], {"peak_flops": peak, "configs": {}}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        corpus = corpus_file(tmp)
        for name in args.configs:
            spec = dict(CONFIGS[name])
            if args.quick:
                spec.update(warmup=2, window=max(1, spec["window"] // 4), rounds=4)
            if args.rounds:
                spec["rounds"] = args.rounds
            step_times = measure(spec, corpus, tmp)
            net = instantiate(compose(overrides_for(spec, corpus, tmp)).model, vocab_size=65)
            tokens_per_step = spec["batch_size"] * spec["block_size"]
            flops_per_step = net.flops_per_token(spec["block_size"]) * tokens_per_step
            window_means = {path: np.array([np.mean(w) for w in windows]) for path, windows in step_times.items()}
            half = spec["rounds"] // 2
            result = {}
            for path, means in window_means.items():
                seconds = float(np.quantile(means, 0.25))
                plain = window_means["plain"]
                halves = [
                    float(np.quantile(plain[part], 0.25) / np.quantile(means[part], 0.25))
                    for part in (slice(None, half), slice(half, None))
                ]
                result[path] = {
                    "ms_per_step": seconds * 1e3,
                    "median_ms_per_step": float(np.median(means)) * 1e3,
                    "tokens_per_s": tokens_per_step / seconds,
                    "mfu": flops_per_step / seconds / peak,
                    "ratio_vs_plain": float(np.quantile(plain, 0.25)) / seconds,
                    "ratio_halves": halves,
                    "step_times": step_times[path],
                }
                rows.append(
                    [
                        name,
                        path,
                        f"{seconds * 1e3:.1f}",
                        f"{float(np.median(means)) * 1e3:.1f}",
                        f"{tokens_per_step / seconds:,.0f}",
                        f"{100 * result[path]['mfu']:.1f}%",
                        f"{result[path]['ratio_vs_plain']:.3f}",
                        "" if path == "plain" else f"{halves[0]:.3f} / {halves[1]:.3f}",
                    ]
                )
            payload["configs"][name] = {"spec": spec, **result}
    headers = ["config", "path", "ms/step", "median ms/step", "tokens/s", "MFU", "speed vs plain", "halves"]
    table = markdown_table(headers, rows)
    rounds = ", ".join(
        f"{n}: {c['spec']['rounds']} rounds of {c['spec']['window']} timed steps" for n, c in payload["configs"].items()
    )
    text = (
        f"### Throughput (fp32 matmul peak measured here: {peak / 1e9:.0f} GFLOP/s)\n\n{table}\n"
        "Each path runs in its own process; the processes take turns, one window of steps each per round "
        f"({rounds}). ms/step: the lower quartile of the window means (tokens/s and MFU from it); "
        "speed vs plain: the ratio of those, and the same ratio from the first / second half of the rounds; "
        "control: a second process of the plain loop, the noise floor of the ratios. "
        f"Machine: {machine()['cpu']}, torch {torch.__version__}.\n"
    )
    print(text)
    write_results("throughput", payload, text)


if __name__ == "__main__":
    main()
