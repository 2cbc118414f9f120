"""Run the 2-process CPU DDP jobs many times and count the runs that exit non-zero.

Why: a rare race at process exit (rank 1 aborting with "terminate called without an active
exception" after the test phase, about 1 run in 7 under load) made a finished training job
exit non-zero, and one run of a test says little about such a flake. This script runs

  * the Fabric loop under Lightning's launcher: ``fabric run <FABRIC_ENTRY> --strategy=ddp``
  * the Lightning Trainer with 2 CPU processes: ``python -m lmforge train trainer=ddp_sim``

``--runs`` times each (a tiny model, a few steps, a corpus it writes itself, everything under
a temporary directory), prints one line per run, the stderr tail of every failed run, and a
summary; it exits 1 if any run failed.

    python scripts/stress_multiprocess.py [--runs 20] [--only fabric|trainer] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# The script `fabric run` launches.
FABRIC_ENTRY = REPO_ROOT / "src" / "lmforge" / "cli" / "fabric.py"

STDERR_TAIL_LINES = 40
RUN_TIMEOUT_S = 300

CORPUS_LINES = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "for i in range(10):\n    print(i * i)\n",
    "import math\nprint(math.pi)  # pi\n",
]

# Both paths: a 1-layer model on a character tokenizer, 4 steps, validation twice, then test.
TINY = [
    "data=text_files",
    "data.tokenizer=char",
    "data.block_size=32",
    "data.batch_size=8",
    "data.eval_batch_size=16",
    "data.eval_windows=32",
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_embd=32",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.log_every_n_steps=2",
    "scheduler.warmup_steps=1",
    "sample.max_new_tokens=16",
    "extras.print_config=false",
]
TRAINER_EXTRA = ["trainer=ddp_sim", "callbacks.text_samples.max_new_tokens=16"]


def write_corpus(directory: Path, n_files: int = 8, repeats: int = 30) -> Path:
    directory.mkdir(parents=True)
    for i in range(n_files):
        text = "".join(CORPUS_LINES[(i + j) % len(CORPUS_LINES)] for j in range(repeats))
        (directory / f"doc_{i:03d}.py").write_text(f"# document {i}\n{text}", encoding="utf-8")
    return directory


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def fabric_command(overrides: list[str]) -> list[str]:
    """``fabric run`` (the console script next to this Python, else its module) with 2 DDP CPU processes."""
    fabric = Path(sys.executable).with_name("fabric")
    launcher = [str(fabric)] if fabric.exists() else [sys.executable, "-m", "lightning.fabric.cli"]
    flags = ["--accelerator=cpu", "--devices=2", "--strategy=ddp", f"--main-port={free_port()}"]
    return [*launcher, "run", *flags, str(FABRIC_ENTRY), *overrides]


def trainer_command(overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "lmforge", "train", *TRAINER_EXTRA, *overrides]


COMMANDS = {"fabric ddp": fabric_command, "trainer ddp_sim": trainer_command}


def run_once(name: str, index: int, work: Path, corpus: Path) -> tuple[int, float, str]:
    """One run in its own log/data directories; returns (exit code, seconds, stderr)."""
    run_dir = work / f"{name.replace(' ', '_')}_{index:03d}"
    overrides = [*TINY, f"data.path={corpus}", f"paths.log_dir={run_dir}/logs", f"paths.data_dir={run_dir}/data"]
    # As from a shell: no OMP_NUM_THREADS (the launchers set it); the worktree's code first.
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT / "src"), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    started = time.perf_counter()
    try:
        result = subprocess.run(
            COMMANDS[name](overrides),
            check=False,
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
        )
        code, stderr = result.returncode, result.stderr
    except subprocess.TimeoutExpired as exc:
        code = 124
        stderr = (exc.stderr or b"").decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        stderr += f"\n[stress] timed out after {RUN_TIMEOUT_S}s"
    return code, time.perf_counter() - started, stderr


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="runs of each command (default 20)")
    parser.add_argument("--only", choices=["fabric", "trainer"], help="run only one of the two commands")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs of every run)")
    args = parser.parse_args()

    names = [n for n in COMMANDS if args.only is None or n.startswith(args.only)]
    work = Path(tempfile.mkdtemp(prefix="lmforge-stress-"))
    corpus = write_corpus(work / "corpus")
    failures = {name: 0 for name in names}
    try:
        for name in names:
            for index in range(1, args.runs + 1):
                code, seconds, stderr = run_once(name, index, work, corpus)
                print(f"{name:<16} run {index:>3}/{args.runs}  exit {code:>4}  {seconds:6.1f}s", flush=True)
                if code != 0:
                    failures[name] += 1
                    tail = "\n".join(stderr.splitlines()[-STDERR_TAIL_LINES:])
                    print(f"--- stderr tail of {name} run {index} ---\n{tail}\n---", flush=True)
    finally:
        if args.keep:
            print(f"logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(", ".join(f"{name}: {failures[name]} failures / {args.runs}" for name in names))
    return 1 if any(failures.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
