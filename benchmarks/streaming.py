"""Streaming from LitData chunks against the memory-mapped token cache, at two corpus sizes.

tiny-shakespeare repeated ``--small`` and ``--large`` times is written as LitData chunks by
``lmforge prepare data=streaming``; then a small char-level GPT (4 x 128, block 256, batch 16)
trains ``--steps`` steps from the chunks (``data=streaming``) and from the token cache
(``data=text_files``). Per run: the validation loss at the end (the two paths draw the same
windows, so it should be equal), training tokens/s, and the peak resident memory of the training
process (``ru_maxrss`` of the waited-for children of a fresh wrapper process). Peak memory is the
figure that must not grow with the corpus: both paths read windows on demand and hold no corpus in
memory; what the kernel maps of the token files counts in the RSS only for pages touched.

    python benchmarks/streaming.py [--small 4] [--large 32] [--steps 100]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import corpus_file, markdown_table, write_results  # noqa: E402

HERE = Path(__file__).resolve().parent
MEASURE = (
    "import resource, subprocess, sys; "
    "code = subprocess.run(sys.argv[1:]).returncode; "
    "print('peak_rss_kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)"
)


def lmforge(command: str, overrides: list[str]) -> tuple[str, float]:
    """Run ``lmforge <command>`` in a fresh wrapper; returns its output and the peak RSS in MiB."""
    args = [sys.executable, "-c", MEASURE, sys.executable, "-m", "lmforge", command, *overrides]
    result = subprocess.run(args, capture_output=True, text=True, cwd=HERE.parent)
    if result.returncode != 0:
        raise SystemExit(f"lmforge {command} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return result.stdout, int(re.search(r"peak_rss_kib (\d+)", result.stdout).group(1)) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=4, help="copies of tiny-shakespeare in the small corpus")
    parser.add_argument("--large", type=int, default=32, help="copies in the large corpus")
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    rows, figures = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        text = corpus_file(work).read_text(encoding="utf-8")
        for copies in (args.small, args.large):
            corpus = work / f"corpus-{copies}.txt"
            corpus.write_text(text * copies, encoding="utf-8")
            run = [
                "model=gpt",
                "model.n_layer=4",
                "model.n_head=4",
                "model.n_embd=128",
                "data.tokenizer=char",
                "data.block_size=256",
                "data.batch_size=16",
                "data.eval_windows=64",
                "trainer.accelerator=cpu",
                f"trainer.max_steps={args.steps}",
                f"trainer.val_check_interval={args.steps}",
                "trainer.num_sanity_val_steps=0",
                "scheduler.warmup_steps=10",
                "test=false",
                "logger=csv",
                "extras.print_config=false",
                f"paths.data_dir={work}/data",
                f"paths.log_dir={work}/logs",
            ]
            streaming = ["data=streaming", f"data.chunks_dir={work}/chunks-{copies}"]
            lmforge("prepare", [*streaming, f"data.path={corpus}", *run])
            cache = ["data=text_files", f"data.path={corpus}"]
            for name, data in (("LitData chunks", streaming), ("token cache (memmap)", cache)):
                output, rss = lmforge("train", [*data, *run])
                loss = float(re.search(r"val/loss\s*│\s*([\d.]+)", output).group(1))
                rate = float(re.search(r"train tokens/s\s*│\s*([\d,.]+)", output).group(1).replace(",", ""))
                size = corpus.stat().st_size / 2**20
                figures[f"{name} {copies}x"] = {
                    "corpus_mib": size,
                    "val_loss": loss,
                    "tokens_per_s": rate,
                    "rss_mib": rss,
                }
                rows.append([name, f"{size:,.0f}", f"{loss:.4f}", f"{rate:,.0f}", f"{rss:,.0f}"])
                print(rows[-1], flush=True)
    table = markdown_table(["train from", "corpus (MiB)", "val/loss", "tokens/s", "peak RSS (MiB)"], rows)
    markdown = (
        f"### Streaming from LitData chunks vs the token cache (GPT 4 x 128, {args.steps} steps, local folder)\n\n"
        f"{table}\n"
    )
    print(markdown)
    write_results("streaming", {"steps": args.steps, "figures": figures}, markdown)


if __name__ == "__main__":
    main()
