"""The GPU smoke benchmark script, checked on the CPU with its tiny configuration."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def command_without_installation(folder: Path) -> Path:
    """An ``lmforge`` executable (and the ``python`` beside it, which the script also calls) that run this
    interpreter on the package as it is importable here: installed, or from src/ on PYTHONPATH."""
    folder.mkdir()
    command = folder / "lmforge"
    command.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m lmforge "$@"\n')
    command.chmod(0o755)
    (folder / "python").symlink_to(sys.executable)
    return command


@pytest.mark.slow
def test_gpu_smoke_script_runs_tiny_on_cpu(tmp_path):
    env = {
        **os.environ,
        "LMFORGE": str(command_without_installation(tmp_path / "bin")),
        "OUT_DIR": str(tmp_path),
        "DATA_DIR": str(tmp_path / "data"),
        "TINY_STEPS": "10",
    }
    result = subprocess.run(
        ["bash", str(REPO_ROOT / "benchmarks" / "gpu_smoke.sh"), "--tiny"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    lines = dict(line.split(":", 1) for line in result.stdout.splitlines() if ":" in line)
    assert float(lines["tokens/s per device"].replace(",", "")) > 0
    mfu = next(value for key, value in lines.items() if key.startswith("MFU"))
    assert 0 < float(mfu.strip().rstrip("%")) < 100
    assert float(lines["tp2 tokens/s per device"].replace(",", "")) > 0  # [gpt]
