"""Quality per compute on character-level tiny-shakespeare (nanoGPT's CPU reference).

Runs `experiment=shakespeare_char` (the nanoGPT configuration: best val loss about 1.88 in
nanoGPT's README) and `experiment=shakespeare_char_fast` through the Trainer path, in the
same process run, validating every ``--eval-every`` steps on the experiments' 2400 fixed
random val windows. Reports val loss at the end, the best val loss, and the training wall
time (validation excluded) until val loss first reaches 1.88: a time-to-target table.
``--ablation`` adds one run per lever, each applied alone on top of shakespeare_char with
the same seed.

    python benchmarks/quality.py [--steps 2000] [--ablation]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import lightning as L

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED_SHAKESPEARE, compose, machine, markdown_table, write_results  # noqa: E402

TARGET = 1.88

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
    from omegaconf import open_dict

    from lmforge.train import train

    cfg = compose([
        f"experiment={experiment}", f"data.path={corpus}", f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={eval_every}", "trainer.num_sanity_val_steps=0", "trainer.accelerator=cpu",
        "test=false", "extras.print_config=false", "logger=csv", "sample.max_new_tokens=200",
        f"paths.log_dir={tmp}/logs", f"paths.data_dir={tmp}/data", *extra,
    ])
    with open_dict(cfg):
        cfg.callbacks.train_clock = {"_target_": f"{TrainClock.__module__}.TrainClock"}
    train(cfg)
    points = TrainClock.latest.points
    reached = next((seconds for _, seconds, loss in points if loss <= TARGET), None)
    return {
        "final_val": points[-1][2],
        "best_val": min(loss for _, _, loss in points),
        "train_seconds": points[-1][1],
        "seconds_to_target": reached,
        "curve": points,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--ablation", action="store_true")
    parser.add_argument("--corpus", type=Path, default=SHARED_SHAKESPEARE)
    args = parser.parse_args()
    if not args.corpus.exists():
        sys.exit(f"tiny-shakespeare not found at {args.corpus}; pass --corpus <path to input.txt>")
    runs = {"shakespeare_char": ("shakespeare_char", []), "shakespeare_char_fast": ("shakespeare_char_fast", [])}
    if args.ablation:
        runs.update({f"+ {lever}": ("shakespeare_char", extra) for lever, extra in LEVERS.items()})
    results = {}
    with tempfile.TemporaryDirectory() as name:
        for label, (experiment, extra) in runs.items():
            results[label] = run(experiment, extra, args.corpus, Path(name), args.steps, args.eval_every)
    baseline_seconds = results["shakespeare_char"]["train_seconds"]
    rows = []
    for label, r in results.items():
        to_target = r["seconds_to_target"]
        rows.append([
            label, f"{r['final_val']:.3f}", f"{r['best_val']:.3f}", f"{r['train_seconds']:.0f}",
            "not reached" if to_target is None else f"{to_target:.0f}",
            "" if to_target is None else f"{100 * to_target / baseline_seconds:.0f}%",
        ])
    headers = ["run", f"val @ {args.steps}", "best val", "train s", f"s to val <= {TARGET}", "% of baseline time"]
    text = (
        f"### Quality per compute: char-level tiny-shakespeare, {args.steps} steps\n\n"
        + markdown_table(headers, rows)
        + f"\nval = mean loss over 2400 fixed random val windows, every {args.eval_every} steps; "
        f"times exclude validation. Machine: {machine()['cpu']}.\n"
    )
    print(text)
    write_results("quality", {"steps": args.steps, "results": results}, text)


if __name__ == "__main__":
    main()
