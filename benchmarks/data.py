"""Data pipeline: tokenizer training, encoding throughput, peak memory of `lmforge prepare`, loader wait.

1. On the `stdlib` corpus: BPE (vocab 4096) training time; raw `encode_batch_fast` throughput
   on all of its text held in memory, against the cache builder (read, encode, write) with
   the same tokenizer, measured in the same run.
2. `lmforge prepare` end to end (own process) on `stdlib` and on generated corpora of a few
   hundred MB: wall time, MB/s and peak RSS, which stays flat as the corpus grows (streaming,
   and BPE trained on a sample of at most `data.tokenizer_train_bytes`, 64 MB by default).
3. In training: the share of step time spent waiting for the next batch (SimpleProfiler).

    python benchmarks/data.py [--big-mb 120 300]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from lightning.pytorch.profilers import SimpleProfiler

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import compose, corpus_file, machine, markdown_table, write_results  # noqa: E402
from throughput import CONFIGS, overrides_for  # noqa: E402

from lmforge.data import StdlibSource  # noqa: E402
from lmforge.data.cache import prepare_corpus  # noqa: E402
from lmforge.data.tokenizer import encode_documents, train_tokenizer  # noqa: E402


def encode_comparison(tmp: Path) -> dict:
    """Tokenizer training, then raw encoding vs the cache builder on the same text and tokenizer."""
    source = StdlibSource(max_bytes=6_000_000)
    texts = [text for _, text in source.documents()]
    n_bytes = sum(len(t.encode()) for t in texts)
    started = time.perf_counter()
    tokenizer = train_tokenizer("bpe", iter(texts), 4096)
    train_seconds = time.perf_counter() - started

    started = time.perf_counter()
    encode_documents(tokenizer, texts)
    raw_seconds = time.perf_counter() - started

    started = time.perf_counter()
    prepare_corpus(source, "bpe", 4096, 0.05, 0.05, cache_root=tmp / "cache", tokenizer_json=tokenizer.to_str())
    pipeline_seconds = time.perf_counter() - started
    return {
        "bytes": n_bytes,
        "tokenizer_train_s": train_seconds,
        "raw_encode_mb_s": n_bytes / raw_seconds / 1e6,
        "pipeline_mb_s": n_bytes / pipeline_seconds / 1e6,
        "pipeline_vs_raw": raw_seconds / pipeline_seconds,
    }


def generate_corpus(directory: Path, megabytes: int) -> Path:
    """Zipf-distributed pseudo-words in files of ~1 MB: text the BPE trainer has to work on."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "qu", "an", "el", "or", "is"]
    vocab = ["".join(rng.choice(syllables, rng.integers(1, 4))) for _ in range(20_000)]
    weights = 1 / np.arange(1, len(vocab) + 1)
    weights /= weights.sum()
    for index in range(megabytes):
        words = rng.choice(vocab, 200_000, p=weights)
        lines = [" ".join(words[i : i + 14]) for i in range(0, len(words), 14)]
        (directory / f"part_{index:04d}.txt").write_text("\n".join(lines)[:1_000_000])
    return directory


def first_files(corpus: Path, directory: Path, count: int) -> Path:
    """A directory holding (hard links to) the first ``count`` files of ``corpus``."""
    directory.mkdir()
    for path in sorted(corpus.iterdir())[:count]:
        os.link(path, directory / path.name)
    return directory


def prepare_in_subprocess(overrides: list[str]) -> dict:
    """Run `lmforge prepare` in its own process; wall time, that process's peak RSS and the
    bytes its BPE tokenizer was trained on (from the cache's meta.json)."""
    probe = (
        "import resource, subprocess, sys, time, json;"
        "t = time.perf_counter();"
        "out = subprocess.run([sys.executable, '-m', 'lmforge', 'prepare', *sys.argv[1:]], check=True,"
        " capture_output=True, text=True).stdout;"
        "print(json.dumps({'seconds': time.perf_counter() - t,"
        " 'peak_rss_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,"
        " 'cache': out.split('token cache: ', 1)[1].rsplit(' (vocabulary', 1)[0]}))"
    )
    out = subprocess.run([sys.executable, "-c", probe, *overrides], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    meta = json.loads((Path(result.pop("cache")) / "meta.json").read_text())
    return {**result, "tokenizer_sample_bytes": meta["tokenizer_sample_bytes"]}


class RecordingProfiler(SimpleProfiler):
    """Lightning's SimpleProfiler that keeps a handle on its newest instance."""

    latest: RecordingProfiler | None = None

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        RecordingProfiler.latest = self


def loader_wait_share(tmp: Path) -> float:
    """Fraction of training-step time spent fetching batches, from Lightning's SimpleProfiler."""
    from lmforge.cli.train import train

    spec = {**CONFIGS["shakespeare_char"], "warmup": 40, "rounds": 8}  # about 250 steps
    cfg = compose(
        overrides_for(spec, corpus_file(tmp), tmp)
        + [
            f"+trainer.profiler._target_={RecordingProfiler.__module__}.RecordingProfiler",
            "callbacks=none",
            "logger=none",
        ]
    )
    train(cfg)
    durations = RecordingProfiler.latest.recorded_durations
    fetch = sum(durations["[_TrainingEpochLoop].train_dataloader_next"])
    total = sum(durations["run_training_batch"]) + fetch
    return fetch / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--big-mb", type=int, nargs="+", default=[120, 300], help="sizes of the generated corpora")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        encode = encode_comparison(tmp)
        common = [f"paths.data_dir={tmp}/data", f"paths.log_dir={tmp}/logs", "extras.print_config=false"]
        stdlib = prepare_in_subprocess(common)
        generated = generate_corpus(tmp / "generated", max(args.big_mb))
        big = []
        for megabytes in sorted(args.big_mb):
            corpus = first_files(generated, tmp / f"big_{megabytes}", megabytes)
            result = prepare_in_subprocess([*common, "data=text_files", f"data.path={corpus}"])
            big.append({"bytes": sum(p.stat().st_size for p in corpus.iterdir()), **result})
        wait_share = loader_wait_share(tmp)
    stdlib_mb = encode["bytes"] / 1e6
    rows = [
        ["BPE 4096 training on stdlib", f"{encode['tokenizer_train_s']:.1f} s on {stdlib_mb:.1f} MB"],
        ["raw `encode_batch_fast`, stdlib", f"{encode['raw_encode_mb_s']:.2f} MB/s"],
        ["cache builder (read + encode + write), same tokenizer", f"{encode['pipeline_mb_s']:.2f} MB/s"],
        ["cache builder / raw encode", f"{encode['pipeline_vs_raw']:.2f}"],
        [
            "`lmforge prepare` stdlib (train tokenizer + encode)",
            f"{stdlib['seconds']:.1f} s, peak RSS {stdlib['peak_rss_mb']:.0f} MB",
        ],
        *[
            [
                f"`lmforge prepare` generated {run['bytes'] / 1e6:.0f} MB "
                f"(BPE trained on {run['tokenizer_sample_bytes'] / 1e6:.0f} MB of it)",
                f"{run['seconds']:.1f} s ({run['bytes'] / 1e6 / run['seconds']:.2f} MB/s), "
                f"peak RSS {run['peak_rss_mb']:.0f} MB",
            ]
            for run in big
        ],
        ["data-loading wait / training step time (shakespeare_char)", f"{100 * wait_share:.2f}%"],
    ]
    text = (
        "### Data pipeline\n\n" + markdown_table(["measurement", "result"], rows) + f"\nMachine: {machine()['cpu']}.\n"
    )
    print(text)
    write_results(
        "data", {"encode": encode, "prepare_stdlib": stdlib, "prepare_big": big, "loader_wait_share": wait_share}, text
    )


if __name__ == "__main__":
    main()
