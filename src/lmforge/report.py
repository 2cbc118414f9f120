"""The short summary printed at the end of a run."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table


def print_run_summary(
    metrics: dict[str, float],
    tokens_per_sec: float | None,
    best_checkpoint: str | None,
    last_checkpoint: str | None,
    tensorboard_dir: str | None,
    sample: str | None,
) -> None:
    """Print final losses, perplexities, throughput, where the outputs are, and a sample."""
    table = Table(title="lmforge run summary", show_header=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for key in ("val/loss", "val/ppl", "test/loss", "test/ppl"):
        if key in metrics:
            table.add_row(key, f"{metrics[key]:.4f}")
    if tokens_per_sec:
        table.add_row("train tokens/s", f"{tokens_per_sec:,.0f}")
    if best_checkpoint:
        table.add_row("best checkpoint", best_checkpoint)
    if last_checkpoint:
        table.add_row("last checkpoint", last_checkpoint)
    if tensorboard_dir:
        logs = Path(tensorboard_dir)
        table.add_row("tensorboard logs", f"{logs}  (view: make tensorboard)")
    console = Console()
    console.print(table)
    if sample is not None:
        console.rule("sample")
        console.print(sample, markup=False, highlight=False)
        console.rule()
