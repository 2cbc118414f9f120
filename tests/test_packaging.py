"""lmforge as an installed package: the wheel carries the configs, and the CLI works without a checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
import tomllib

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed_for_the_wheel():
    """pyproject.toml lists the packages explicitly (configs/ is mapped to lmforge.configs): none may be missing."""
    listed = set(tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(init.parent.relative_to(REPO_ROOT / "src").parts) for init in (REPO_ROOT / "src").rglob("__init__.py")
    }
    assert listed == on_disk | {"lmforge.configs"}


@pytest.mark.slow
def test_wheel_install_trains_from_an_empty_directory(tmp_path):
    """`pip install <checkout>` (not editable) into a fresh venv, then `lmforge train` from an empty directory.

    The venv borrows the test environment's dependencies through a .pth file (installing torch again
    would download gigabytes); lmforge itself comes only from the wheel, so its configs must too.
    """
    # No PYTHONPATH: a caller's (e.g. a baked project's src/) would make pip and Python see that copy.
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": ""}
    wheels = tmp_path / "wheels"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", wheels, REPO_ROOT]
    subprocess.run(build, check=True, capture_output=True, env=env, timeout=600)
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    site_packages = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True
    ).stdout.strip()
    Path(site_packages, "test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    wheel = next(wheels.glob("lmforge-*.whl"))
    install = [python, "-m", "pip", "install", "--no-deps", "--ignore-installed", "-q", wheel]
    subprocess.run(install, check=True, capture_output=True, env=env)

    workdir = tmp_path / "empty"
    workdir.mkdir()
    lmforge = env_dir / "bin" / "lmforge"
    located = subprocess.run(
        [python, "-c", "import lmforge; print(lmforge.__file__)"], env=env, capture_output=True, text=True
    )
    assert located.stdout.startswith(str(env_dir)), located  # the wheel's copy, not the checkout
    for args in (["debug=fdr"], ["trainer.max_steps=60", "trainer.val_check_interval=60", "extras.print_config=false"]):
        result = subprocess.run(
            [lmforge, "train", *args], cwd=workdir, env=env, capture_output=True, text=True, timeout=900
        )
        assert result.returncode == 0, result.stderr[-3000:]
    assert "val/loss" in result.stdout
    # Runs write under the working directory: logs/ and the token cache in data/.
    assert list((workdir / "logs" / "train" / "runs").glob("*/checkpoints/last.ckpt"))
    assert (workdir / "data" / "cache").is_dir()
