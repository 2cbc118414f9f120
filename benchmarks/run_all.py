"""`make bench`: run every benchmark and collect their tables into benchmarks/RESULTS.md.

python benchmarks/run_all.py                 # throughput, data, startup, generate, hf, parallel, streaming
python benchmarks/run_all.py --quality       # + the tiny-shakespeare time-to-target table
python benchmarks/run_all.py --quality --ablation
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, machine  # noqa: E402

HERE = Path(__file__).resolve().parent
NOTES_HEADING = "### Notes"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quality",
        action="store_true",
        help="also run the 2000-step quality comparison and the translation fine-tuning",
    )
    parser.add_argument("--ablation", action="store_true", help="with --quality: one run per lever")
    parser.add_argument("--quick", action="store_true", help="short throughput runs (smoke test)")
    parser.add_argument("--collect-only", action="store_true", help="only rebuild RESULTS.md from results/")
    args = parser.parse_args()
    scripts = [
        ["throughput.py", *(["--quick"] if args.quick else [])],
        ["data.py"],
        ["startup.py"],
        ["generate.py"],
        ["hf.py"],
        ["parallel.py"],
        ["streaming.py"],
    ]
    if args.quality:
        scripts.append(["quality.py", *(["--ablation"] if args.ablation else [])])
        scripts.append(["finetune.py"])
    for script in [] if args.collect_only else scripts:
        if not (HERE / script[0]).exists():  # a benchmark of a part this project was generated without
            print(f"== {script[0]}: not in this project, skipped", flush=True)
            continue
        print(f"== {' '.join(script)}", flush=True)
        subprocess.run([sys.executable, str(HERE / script[0]), *script[1:]], check=True)
    facts = machine()
    header = (
        "# Benchmark results\n\n"
        f"Measured {facts['date']} on {facts['cpu']} ({facts['cores']} cores, GPU: {facts['gpu']}), "
        f"Python {facts['python']}, torch {facts['torch']}, lightning {facts['lightning']}, "
        f"tokenizers {facts['tokenizers']}. Reproduce with `make bench` "
        "(add `ARGS=--quality` for the tiny-shakespeare and translation tables).\n\n"
    )
    tables = [
        (RESULTS_DIR / f"{name}.md").read_text()
        for name in ("throughput", "data", "startup", "generate", "hf", "parallel", "streaming", "quality", "finetune")
        if (RESULTS_DIR / f"{name}.md").exists()
    ]
    # The hand-written notes at the end of RESULTS.md stay; the tables above them are replaced.
    previous = (HERE / "RESULTS.md").read_text() if (HERE / "RESULTS.md").exists() else ""
    notes = previous[previous.index(NOTES_HEADING) :] if NOTES_HEADING in previous else ""
    (HERE / "RESULTS.md").write_text(header + "\n".join(tables) + ("\n" + notes if notes else ""))
    print((HERE / "RESULTS.md").read_text())


if __name__ == "__main__":
    main()
