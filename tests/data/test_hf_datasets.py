"""data=hf_dataset: Hugging Face `datasets` corpora from local files (the Hub is the same call with a name)."""

from __future__ import annotations

import json

import pytest
from helpers import TINY_MODEL, TINY_RUN, compose_config

from lmforge.cli.train import train
from lmforge.data.hf_datasets import HFDatasetSource
from lmforge.errors import DataError

STORIES = [f"Once upon a time, story number {i} began and ended well." for i in range(60)]


@pytest.fixture
def jsonl_files(tmp_path):
    for part in range(2):
        rows = [{"story": text, "id": i} for i, text in enumerate(STORIES[part::2])]
        (tmp_path / f"part{part}.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return str(tmp_path / "part*.jsonl")


@pytest.mark.parametrize("streaming", [False, True], ids=["downloaded", "streamed"])
def test_rows_of_local_files_become_documents(jsonl_files, streaming):
    source = HFDatasetSource("json", data_files=jsonl_files, text_column="story", streaming=streaming)
    texts = [text for _, text in source.documents()]
    assert sorted(texts) == sorted(STORIES)
    limited = HFDatasetSource("json", data_files=jsonl_files, text_column="story", streaming=streaming, max_documents=5)
    assert len(list(limited.documents())) == 5


def test_the_fingerprint_follows_the_files_and_settings(jsonl_files, tmp_path):
    source = HFDatasetSource("json", data_files=jsonl_files, text_column="story")
    first = source.fingerprint()
    assert HFDatasetSource("json", data_files=jsonl_files, text_column="story").fingerprint() == first
    assert HFDatasetSource("json", data_files=jsonl_files, text_column="id").fingerprint() != first
    with open(tmp_path / "part0.jsonl", "a") as handle:
        handle.write(json.dumps({"story": "one more"}) + "\n")
    assert source.fingerprint() != first


def test_a_wrong_column_or_dataset_is_one_clear_error(jsonl_files, tmp_path):
    with pytest.raises(DataError, match="has no column 'text'; set data.source.text_column to one of story, id"):
        list(HFDatasetSource("json", data_files=jsonl_files).documents())
    with pytest.raises(DataError, match="data_files: .*missing.*jsonl matches no file"):
        list(HFDatasetSource("json", data_files=str(tmp_path / "missing*.jsonl")).documents())
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="cannot load the dataset .*empty.*doesn't contain any data files"):
        list(HFDatasetSource(str(tmp_path / "empty")).documents())


def test_a_run_trains_on_a_dataset(jsonl_files, tmp_path):
    overrides = [
        "data=hf_dataset",
        "data.path=json",
        f"data.source.data_files={jsonl_files}",
        "data.source.text_column=story",
        "data.source.streaming=true",
        *TINY_MODEL[next(iter(TINY_MODEL))],
        *TINY_RUN,
        "data.block_size=16",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "test=false",
    ]
    cfg = compose_config("train", overrides, tmp_path)
    metrics = train(cfg)
    assert metrics["val/loss"] > 0
