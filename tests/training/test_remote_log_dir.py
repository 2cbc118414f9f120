"""paths.log_dir as an fsspec URL: the run is written to a local staging copy and mirrored there."""

from __future__ import annotations

import time

import fsspec
import pytest
import torch
from helpers import DEFAULT_MODEL, compose_config, run_cli, succeeded, tiny_train_overrides

from lmforge.cli.train import train
from lmforge.training.mirror import RunDirMirror, local_log_dir, remote_run_dir, staging_dir


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_staging_copy_and_remote_run_dir_correspond(cache_home, tmp_path):
    url = "s3://bucket/team/logs/"
    assert staging_dir(url) == cache_home / "lmforge" / "logs" / "s3" / "bucket" / "team" / "logs"
    assert local_log_dir(url) == staging_dir(url) and local_log_dir(str(tmp_path)) == tmp_path
    run_dir = staging_dir(url) / "train" / "multiruns" / "2026-12-03_10-00-00" / "3"
    assert remote_run_dir(url, run_dir, "train") == "s3://bucket/team/logs/train/multiruns/2026-12-03_10-00-00/3"
    assert remote_run_dir(url, tmp_path / "run", "eval") == "s3://bucket/team/logs/eval/runs/run"


def test_mirror_uploads_new_and_changed_files_only_never_partial_ones(tmp_path):
    local, remote = tmp_path / "run", tmp_path / "bucket" / "run"
    (local / "checkpoints").mkdir(parents=True)
    (local / "train.log").write_text("step 1\n")
    (local / "checkpoints" / "step000001.ckpt").write_bytes(b"one")
    (local / "checkpoints" / ".step000002.ckpt.1a2b3c4d.tmp").write_bytes(b"half")  # atomic_write's partial file
    mirror = RunDirMirror(local, f"file://{remote}", every_seconds=0)
    assert mirror.sync() == 2
    assert (remote / "train.log").read_text() == "step 1\n"
    assert (remote / "checkpoints" / "step000001.ckpt").read_bytes() == b"one"
    assert not list(remote.rglob("*.tmp"))
    assert mirror.sync() == 0  # nothing changed
    (local / "train.log").write_text("step 1\nstep 2\n")
    assert mirror.sync() == 1
    assert (remote / "train.log").read_text() == "step 1\nstep 2\n"


def test_mirror_uploads_in_the_background_until_closed(tmp_path):
    local, remote = tmp_path / "run", tmp_path / "bucket"
    local.mkdir()
    mirror = RunDirMirror(local, f"file://{remote}", every_seconds=0.05).start()
    (local / "early.txt").write_text("written while training")
    deadline = time.monotonic() + 10
    while not (remote / "early.txt").exists():
        assert time.monotonic() < deadline, "the background thread uploaded nothing"
        time.sleep(0.05)
    (local / "late.txt").write_text("written just before the end")
    mirror.close()
    assert (remote / "late.txt").read_text() == "written just before the end"


def test_training_run_is_mirrored_to_the_url_and_resumes_from_it(cache_home, tmp_path, corpus_dir, capsys):
    url = "memory://lmforge-test-bucket/logs"
    overrides = tiny_train_overrides(corpus_dir, DEFAULT_MODEL, f"paths.log_dir={url}", "test=false")
    train(compose_config("train", overrides, tmp_path / "first"))
    remote = f"{url}/train/runs/run"
    assert "run directory uploaded to " + remote in capsys.readouterr().out
    memory = fsspec.filesystem("memory")
    uploaded = {path.split("/train/runs/run/", 1)[1] for path in memory.find(remote)}
    assert {"checkpoints/last.ckpt", "tensorboard/hparams.yaml"} <= uploaded
    assert any(name.startswith("tensorboard/events.out.tfevents.") for name in uploaded)
    local = torch.load(tmp_path / "first" / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    with memory.open(f"{remote}/checkpoints/last.ckpt", "rb") as handle:
        copy = torch.load(handle, weights_only=True)
    assert copy["global_step"] == local["global_step"] == 12
    torch.testing.assert_close(copy["state_dict"], local["state_dict"], rtol=0, atol=0)

    # ckpt_path=<URL of the uploaded checkpoint>: another machine resumes from the bucket.
    longer = [*overrides, "trainer.max_steps=14", f"ckpt_path={remote}/checkpoints/last.ckpt"]
    metrics = train(compose_config("train", longer, tmp_path / "resumed"))
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    resumed = torch.load(tmp_path / "resumed" / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 14


@pytest.mark.slow
def test_cli_run_under_a_file_url_lands_in_its_staging_copy_and_the_url(tmp_path, corpus_dir):
    bucket = tmp_path / "bucket"
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    overrides = tiny_train_overrides(corpus_dir, DEFAULT_MODEL, "test=false", "trainer.max_steps=4")
    result = run_cli("train", *overrides, f"paths.log_dir=file://{bucket}", f"paths.data_dir={tmp_path}/data", env=env)
    assert succeeded(result)
    [staged] = (tmp_path / "cache" / "lmforge" / "logs" / "file" / str(bucket).strip("/") / "train" / "runs").iterdir()
    [uploaded] = (bucket / "train" / "runs").iterdir()
    assert uploaded.name == staged.name
    local_files = sorted(p.relative_to(staged) for p in staged.rglob("*") if p.is_file())
    assert sorted(p.relative_to(uploaded) for p in uploaded.rglob("*") if p.is_file()) == local_files
    assert (uploaded / "checkpoints" / "last.ckpt").read_bytes() == (staged / "checkpoints" / "last.ckpt").read_bytes()
    assert f"run directory uploaded to file://{bucket}/train/runs/{staged.name}" in result.stdout
    # ckpt_path=last under the same URL finds the run in the staging copy.
    evaluated = run_cli("eval", "ckpt_path=last", f"paths.log_dir=file://{bucket}", "splits=[val]", env=env)
    assert succeeded(evaluated) and "val/loss" in evaluated.stdout  # file:/... read as a local path finds nothing
