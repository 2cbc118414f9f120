"""Shared helpers of the benchmark scripts: machine facts, the matmul peak, configs, timing, results."""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SHARED_SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"


def machine() -> dict:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import lightning
    import tokenizers

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "tokenizers": tokenizers.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def matmul_peak_flops(size: int = 2048, repeats: int = 5, device: str = "cpu", dtype=torch.float32) -> float:
    """Best observed FLOP/s of a square matmul: the ceiling used for MFU."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def corpus_file(tmp: Path) -> Path:
    """tiny-shakespeare from shared/ when present, else a generated text of similar size."""
    if SHARED_SHAKESPEARE.exists():
        return SHARED_SHAKESPEARE
    rng = np.random.default_rng(0)
    words = ["the", "king", "shall", "love", "thee", "my", "lord", "and", "of", "to", "night", "day"]
    text = "\n".join(" ".join(rng.choice(words, 12)) for _ in range(60_000))
    path = tmp / "corpus.txt"
    path.write_text(text)
    return path


def compose(overrides: list[str], config_name: str = "train"):
    """The config ``config_name`` with ``overrides`` (which set ``paths.log_dir``), composed as the CLI
    would, its run directory a fresh folder next to ``paths.log_dir``."""
    from omegaconf import OmegaConf

    from lmforge.training.config import compose_in_process

    log_dir = OmegaConf.from_dotlist([o for o in overrides if o.startswith("paths.log_dir=")]).paths.log_dir
    out = tempfile.mkdtemp(prefix="run-", dir=str(Path(log_dir).parent))
    return compose_in_process(config_name, overrides, out)


def write_results(name: str, payload: dict, markdown: str) -> None:
    """Save ``results/<name>.json`` and ``results/<name>.md``."""
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps({"machine": machine(), **payload}, indent=2))
    (RESULTS_DIR / f"{name}.md").write_text(markdown)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
