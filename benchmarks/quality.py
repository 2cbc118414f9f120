"""Quality per compute on character-level tiny-shakespeare (nanoGPT's CPU reference).

Runs `experiment=shakespeare_char` (the nanoGPT configuration: best val loss about 1.88 in
nanoGPT's README) and `experiment=shakespeare_char_fast` through the Trainer path, one after
the other, validating every ``--eval-every`` steps on the experiments' 2400 fixed random val
windows. Reports val loss at the end, the best val loss, and the training wall time
(validation excluded) until val loss first reaches 1.88: a time-to-target table.
``--ablation`` adds one run per lever, each applied alone on top of shakespeare_char with
the same seed.

Each run's result is saved to ``results/quality_runs/<label>.json`` as soon as it finishes,
and the table is built from the saved runs of the same ``--steps``: an interrupted ablation
loses at most the run in progress, and ``--only`` reruns just the missing labels.

    python benchmarks/quality.py [--steps 2000] [--ablation]
    python benchmarks/quality.py --only relu2 qk_norm     # these runs, then the table
    python benchmarks/quality.py --table                  # the table from the saved runs only
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import lightning as L

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, SHARED_SHAKESPEARE, compose, machine, markdown_table, write_results  # noqa: E402

TARGET = 1.88
RUNS_DIR = RESULTS_DIR / "quality_runs"

# One lever at a time on top of shakespeare_char (parameter count within 5%, same tokens/step).
LEVERS = {
    "muon": ["optimizer=muon", "optimizer.lr=0.02", "optimizer.adamw_lr=1e-3"],
    "rope": ["model.pos_embedding=rope"],
    "rmsnorm": ["model.norm=rmsnorm"],
    "swiglu": ["model.mlp=swiglu"],
    "relu2": ["model.mlp=relu2"],
    "qk_norm": ["model.qk_norm=true"],
    "zero_init_proj": ["model.zero_init_proj=true"],
    "untied_head": ["model.tie_weights=false"],
    "lr_2e-3": ["optimizer.lr=2e-3", "scheduler.min_lr=2e-4"],
}
# label -> (experiment, extra overrides), in table order.
RUNS = {
    "shakespeare_char": ("shakespeare_char", []),
    "shakespeare_char_fast": ("shakespeare_char_fast", []),
    **{lever: ("shakespeare_char", extra) for lever, extra in LEVERS.items()},
}


class TrainClock(L.Callback):
    """Training wall time with validation excluded, and val loss, at every validation."""

    latest: TrainClock | None = None

    def __init__(self) -> None:
        self.points: list[tuple[int, float, float]] = []  # (step, train seconds, val loss)
        self._start = 0.0
        self._validation_seconds = 0.0
        self._validation_start = 0.0
        TrainClock.latest = self

    def on_train_start(self, *args) -> None:
        self._start = time.perf_counter()

    def on_validation_start(self, trainer, *args) -> None:
        self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer, *args) -> None:
        now = time.perf_counter()
        if not trainer.sanity_checking:
            train_seconds = now - self._start - self._validation_seconds - (now - self._validation_start)
            self.points.append((trainer.global_step, train_seconds, float(trainer.callback_metrics["val/loss"])))
        self._validation_seconds += now - self._validation_start


def run(experiment: str, extra: list[str], corpus: Path, tmp: Path, steps: int, eval_every: int) -> dict:
    """Train one configuration and return its val curve and timings."""
    from omegaconf import open_dict

    from lmforge.cli.train import train

    cfg = compose(
        [
            f"experiment={experiment}",
            f"data.path={corpus}",
            f"trainer.max_steps={steps}",
            f"trainer.val_check_interval={eval_every}",
            "trainer.num_sanity_val_steps=0",
            "trainer.accelerator=cpu",
            "test=false",
            "extras.print_config=false",
            "logger=csv",
            "sample.max_new_tokens=200",
            f"paths.log_dir={tmp}/logs",
            f"paths.data_dir={tmp}/data",
            *extra,
        ]
    )
    with open_dict(cfg):
        cfg.callbacks.train_clock = {"_target_": f"{TrainClock.__module__}.TrainClock"}
    train(cfg)
    points = TrainClock.latest.points
    if not points or points[-1][0] != steps:  # e.g. stopped by SIGTERM or Ctrl-C: save nothing
        sys.exit(f"{experiment} {' '.join(extra)} stopped before step {steps}; its result is not saved")
    reached = next((seconds for _, seconds, loss in points if loss <= TARGET), None)
    return {
        "experiment": experiment,
        "overrides": extra,
        "steps": steps,
        "eval_every": eval_every,
        "machine": machine(),
        "final_val": points[-1][2],
        "best_val": min(loss for _, _, loss in points),
        "train_seconds": points[-1][1],
        "seconds_to_target": reached,
        "curve": points,
    }


def load_runs(steps: int) -> dict[str, dict]:
    """The saved runs of ``steps`` steps, in table order."""
    saved = {path.stem: json.loads(path.read_text()) for path in RUNS_DIR.glob("*.json")}
    return {label: saved[label] for label in RUNS if label in saved and saved[label]["steps"] == steps}


def table(results: dict[str, dict], steps: int) -> str:
    """Markdown time-to-target table; the % column is relative to shakespeare_char when it was run."""
    baseline = results.get("shakespeare_char")
    eval_every = sorted({r["eval_every"] for r in results.values()})
    rows = []
    for label, r in results.items():
        to_target = r["seconds_to_target"]
        share = "" if to_target is None or baseline is None else f"{100 * to_target / baseline['train_seconds']:.0f}%"
        rows.append(
            [
                label if label in ("shakespeare_char", "shakespeare_char_fast") else f"+ {label}",
                f"{r['final_val']:.3f}",
                f"{r['best_val']:.3f}",
                f"{r['train_seconds']:.0f}",
                "not reached" if to_target is None else f"{to_target:.0f}",
                share,
            ]
        )
    headers = ["run", f"val @ {steps}", "best val", "train s", f"s to val <= {TARGET}", "% of baseline time"]
    return (
        f"### Quality per compute: char-level tiny-shakespeare, {steps} steps\n\n"
        + markdown_table(headers, rows)
        + f"\nval = mean loss over 2400 fixed random val windows, every {'/'.join(map(str, eval_every))} steps; "
        f"times exclude validation. Times and the % column (against the saved shakespeare_char run) compare "
        "only between runs made in one invocation on an otherwise idle machine. "
        f"Machine: {machine()['cpu']}.\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--ablation", action="store_true", help="also run every lever alone")
    parser.add_argument(
        "--only", nargs="+", choices=list(RUNS), metavar="LABEL", help=f"run only these labels: {', '.join(RUNS)}"
    )
    parser.add_argument("--table", action="store_true", help="run nothing; build the table from the saved runs")
    parser.add_argument("--corpus", type=Path, default=SHARED_SHAKESPEARE)
    args = parser.parse_args()
    if args.only:
        labels = args.only
    elif args.table:
        labels = []
    else:
        labels = list(RUNS) if args.ablation else ["shakespeare_char", "shakespeare_char_fast"]
    if labels and not args.corpus.exists():
        sys.exit(f"tiny-shakespeare not found at {args.corpus}; pass --corpus <path to input.txt>")
    RUNS_DIR.mkdir(parents=True, exist_ok=True)
    for label in labels:
        experiment, extra = RUNS[label]
        with tempfile.TemporaryDirectory() as name:
            result = run(experiment, extra, args.corpus, Path(name), args.steps, args.eval_every)
        (RUNS_DIR / f"{label}.json").write_text(json.dumps(result, indent=2))
        print(f"{label}: val {result['final_val']:.4f}, best {result['best_val']:.4f} -> {RUNS_DIR / label}.json")
    results = load_runs(args.steps)
    if not results:
        sys.exit(f"no saved {args.steps}-step runs in {RUNS_DIR}; run without --table first")
    text = table(results, args.steps)
    print(text)
    write_results("quality", {"steps": args.steps, "results": results}, text)


if __name__ == "__main__":
    main()
