"""What a run prints of itself: the network at the start, the summary table at the end."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from lmforge.models.base import LanguageModel
from lmforge.training.task_eval import TASK_METRICS


def describe_network(net: LanguageModel, seq_len: int) -> str:
    """One line on the network: its size and its training cost per token at the training context length."""
    return (
        f"model: {type(net).__name__}, {net.num_params(non_embedding=False) / 1e6:.2f} M parameters, "
        f"{net.flops_per_token(seq_len) / 1e6:.1f} MFLOPs per token (forward + backward, context {seq_len})"
    )


def print_run_summary(
    metrics: dict[str, float],
    tokens_per_sec: float | None,
    best_checkpoint: str | None,
    last_checkpoint: str | None,
    tensorboard_dir: str | None,
    sample: str | None,
) -> None:
    """Print final losses, perplexities (and task scores), throughput, where the outputs are, and a sample."""
    table = Table(title="lmforge run summary", show_header=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for split in ("val", "test"):
        for name in ("loss", "ppl", *TASK_METRICS):
            key = f"{split}/{name}"
            if key in metrics:
                table.add_row(key, f"{metrics[key]:.4f}" if name in ("loss", "ppl") else f"{metrics[key]:.2f}")
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
