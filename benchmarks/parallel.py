"""Two CPU processes three ways: DDP, FSDP2 and tensor parallelism, on a 6-layer, 384-wide GPT.

Each strategy trains the same character-level model (6 x 384, block 256) on tiny-shakespeare with
the same global batch of 16 windows (4,096 tokens) per optimizer step: DDP and FSDP2 give each
process 8 windows; under tensor parallelism both processes work on the same windows, so they
accumulate 2 micro-batches of 8. Figures per run: training tokens/s of the whole job (the run
summary's, from the throughput monitor, which counts a tensor-parallel group once) and the peak
resident memory of a process (the largest over the job's processes: ``ru_maxrss`` of the waited-for
descendants of a fresh wrapper process). The runs alternate, strategy after strategy, for
``--rounds`` rounds (this machine's speed drifts); tokens/s is the best round of each, peak memory
the largest. About half of each process's resident memory is Python, torch and Lightning themselves
(the ``one process`` row shows the baseline with the full model).

    python benchmarks/parallel.py [--steps 20] [--rounds 2]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import corpus_file, markdown_table, write_results  # noqa: E402

HERE = Path(__file__).resolve().parent
MODEL = ["model=gpt", "model.n_layer=6", "model.n_head=6", "model.n_embd=384", "model.dropout=0.0"]
STRATEGIES = {
    "one process": ["trainer=cpu"],
    "DDP": ["trainer=ddp", "trainer.devices=2"],
    "FSDP2": ["trainer=fsdp", "trainer.devices=2"],
    "tensor parallel": ["trainer=tp", "trainer.devices=2"],
}
# Runs `lmforge train` and prints the peak RSS (KiB on Linux) of the processes it waited for.
MEASURE = (
    "import resource, subprocess, sys; "
    "code = subprocess.run(sys.argv[1:]).returncode; "
    "print('peak_rss_kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)"
)


def run(name: str, corpus: Path, work: Path, steps: int) -> tuple[float, float]:
    """Train once with strategy ``name``; returns (tokens/s, peak RSS in MiB)."""
    overrides = [
        *MODEL,
        *STRATEGIES[name],
        "trainer.accelerator=cpu",
        "data=text_files",
        f"data.path={corpus}",
        "data.tokenizer=char",
        "data.block_size=256",
        "data.batch_size=8",
        "data.global_batch_tokens=4096",
        "data.eval_windows=16",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
        "trainer.num_sanity_val_steps=0",
        "trainer.log_every_n_steps=5",
        f"callbacks.throughput.window_size={steps // 2}",
        "scheduler.warmup_steps=2",
        "test=false",
        "logger=csv",
        "sample.max_new_tokens=8",
        "callbacks.text_samples.max_new_tokens=8",
        "extras.print_config=false",
        f"paths.log_dir={work}/logs",
        f"paths.data_dir={work}/data",
    ]
    command = [sys.executable, "-c", MEASURE, sys.executable, "-m", "lmforge", "train", *overrides]
    result = subprocess.run(command, capture_output=True, text=True, cwd=HERE.parent)
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    rate = re.search(r"train tokens/s\s*│\s*([\d,.]+)", result.stdout)
    rss = re.search(r"peak_rss_kib (\d+)", result.stdout)
    return float(rate.group(1).replace(",", "")), int(rss.group(1)) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus = corpus_file(work)
        figures: dict[str, list[tuple[float, float]]] = {name: [] for name in STRATEGIES}
        for round_ in range(args.rounds):
            for name in STRATEGIES:
                figures[name].append(run(name, corpus, work, args.steps))
                print(f"round {round_ + 1} {name}: {figures[name][-1][0]:,.0f} tokens/s, "
                      f"{figures[name][-1][1]:,.0f} MiB", flush=True)  # fmt: skip
    best = {name: (max(r for r, _ in runs), max(m for _, m in runs)) for name, runs in figures.items()}
    ddp_rate = best["DDP"][0]
    rows = [[name, f"{rate:,.0f}", f"{rate / ddp_rate:.2f}", f"{memory:,.0f}"] for name, (rate, memory) in best.items()]
    table = markdown_table(["2 CPU processes", "tokens/s", "vs DDP", "peak RSS per process (MiB)"], rows)
    markdown = (
        f"### Two processes: DDP, FSDP2, tensor parallel (GPT 6 x 384, block 256, 4,096 tokens per step, "
        f"{args.steps} steps, best of {args.rounds})\n\n{table}\n"
    )
    print(markdown)
    write_results("parallel", {"steps": args.steps, "rounds": args.rounds, "figures": figures}, markdown)


if __name__ == "__main__":
    main()
