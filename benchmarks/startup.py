"""Start-up: wall time from `lmforge train ...` to the end of the first optimizer step (warm cache).

A callback passed on the command line prints the wall clock at the end of the first
training batch; the figure is that minus the moment the process was started. Also reports
the time to import the entry point alone.

    python benchmarks/startup.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, write_results  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent


class FirstStepClock(L.Callback):
    """Prints ``FIRST_STEP <unix time>`` once, after the first training batch."""

    def __init__(self) -> None:
        self.done = False

    def on_train_batch_end(self, *args, **kwargs) -> None:
        if not self.done:
            print(f"FIRST_STEP {time.time():.6f}", flush=True)
            self.done = True


def time_to_first_step(tmp: Path) -> float:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCH_DIR), os.environ.get("PYTHONPATH", "")])}
    args = [
        sys.executable,
        "-m",
        "lmforge",
        "train",
        "trainer.max_steps=2",
        "scheduler.warmup_steps=1",
        "test=false",
        "+callbacks.first_step._target_=startup.FirstStepClock",
        f"paths.log_dir={tmp}/logs",
        f"paths.data_dir={tmp}/data",
    ]
    started = time.time()
    run = subprocess.run(args, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"lmforge train failed:\n{run.stderr[-3000:]}")
    out = run.stdout
    first = next(float(line.split()[1]) for line in out.splitlines() if line.startswith("FIRST_STEP"))
    return first - started


def import_seconds() -> float:
    started = time.time()
    subprocess.run([sys.executable, "-c", "import lmforge.cli.train"], check=True)
    return time.time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        cold = time_to_first_step(tmp)  # builds the token cache
        warm = [time_to_first_step(tmp) for _ in range(args.repeats)]
    imports = [import_seconds() for _ in range(args.repeats)]
    rows = [
        ["first step, cold token cache (default experiment)", f"{cold:.1f}"],
        ["first step, warm cache (median)", f"{statistics.median(warm):.1f}"],
        ["`import lmforge.cli.train` (median)", f"{statistics.median(imports):.1f}"],
    ]
    text = "### Start-up (seconds, `lmforge train` to the end of the first optimizer step)\n\n"
    text += markdown_table(["measurement", "seconds"], rows) + f"\nMachine: {machine()['cpu']}.\n"
    print(text)
    write_results("startup", {"cold": cold, "warm": warm, "import": imports}, text)


if __name__ == "__main__":
    main()
