"""TensorBoard as a person sees it: two runs of a small sweep served by a real ``tensorboard``.

The HParams tab is checked through the HTTP API its table is drawn from; the Time Series tab
through the page itself, rendered by headless Chromium when one is installed (``chromium
--headless --dump-dom``; skipped otherwise, the card order is also checked on the tags in
tests/lightning/test_trainer.py).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from helpers import DEFAULT_MODEL, compose_config, free_port, scalars, tiny_train_overrides

from lmforge.cli.train import train

LEARNING_RATES = (1e-3, 3e-3)
CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


@pytest.fixture(scope="module")
def served(tmp_path_factory, corpus_dir):
    """(TensorBoard's URL, {lr: run's tensorboard dir}) for two runs that differ in the learning rate."""
    root = tmp_path_factory.mktemp("sweep")
    runs = {}
    for lr in LEARNING_RATES:
        overrides = tiny_train_overrides(corpus_dir, DEFAULT_MODEL, f"optimizer.lr={lr}", "test=false")
        train(compose_config("train", overrides, root / f"lr{lr}"))
        runs[lr] = root / f"lr{lr}" / "run" / "tensorboard"
    port = free_port()
    command = [sys.executable, "-m", "tensorboard.main", f"--logdir={root}", "--host=127.0.0.1", f"--port={port}"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/data/plugins_listing", timeout=5).read()
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline and server.poll() is None, "tensorboard did not start"
                time.sleep(0.5)
        yield url, runs
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_hparams_tab_lists_each_run_with_its_hyperparameters_and_last_val_loss(served):
    url, runs = served
    metrics = [{"metric": {"tag": tag, "group": ""}} for tag in ("loss/val", "perplexity/val")]
    query = {
        "experimentName": "",
        "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
        "colParams": [*metrics, {"hparam": "optimizer/lr"}, {"hparam": "model/n_layer"}],
        "startIndex": 0,
        "sliceSize": 100,
    }
    request = urllib.request.Request(
        f"{url}/data/plugin/hparams/session_groups",
        data=json.dumps(query).encode(),
        headers={"Content-Type": "application/json", "X-XSRF-Protected": "1"},
    )
    groups = json.loads(urllib.request.urlopen(request, timeout=30).read())["sessionGroups"]
    rows = {group["hparams"]["optimizer/lr"]: group for group in groups}
    assert sorted(rows) == sorted(LEARNING_RATES)
    for lr, tensorboard_dir in runs.items():
        values = {value["name"]["tag"]: value["value"] for value in rows[lr]["metricValues"]}
        logged = scalars(tensorboard_dir)
        last_val_loss = logged["val/loss"][max(logged["val/loss"])]
        assert values["loss/val"] == pytest.approx(last_val_loss, abs=1e-6)
        assert values["perplexity/val"] == pytest.approx(logged["val/ppl"][max(logged["val/ppl"])], abs=1e-4)
        assert rows[lr]["hparams"]["model/n_layer"] == 1


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium to render TensorBoard's page (apt install chromium)")
def test_time_series_tab_opens_on_the_loss_then_the_perplexity(served):
    url, _ = served
    page = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    groups = re.findall(r'class="group-title" title="([^"]+)"', page)
    assert groups[:2] == ["loss", "perplexity"], groups
    assert 'title="loss/train"' in page and 'title="loss/val"' in page  # its first cards (the rest render on scroll)
