"""Bake every model/Fabric combination from this checkout and run each project's whole test suite.

    .venv/bin/python template_tests/bake_all.py                   # all 6, one after another (about 1 h on 2 cores)
    .venv/bin/python template_tests/bake_all.py lstm-no-fabric    # some of them
    .venv/bin/python template_tests/bake_all.py --fast            # their fast suites (-m "not slow") only
    .venv/bin/python template_tests/bake_all.py --keep -x both-with-fabric   # keep the bake, stop at a failure

Each project is baked with cookiecutter from a copy of this checkout (the same copy as the
template tests': project files with .git), then checked inside with the current interpreter
like ``template_tests/test_cookiecutter.py`` does (no leftovers of a removed part, every module
imports, every config composes) and its tests run; nothing is installed. Prints a summary
table (combination, result, pytest's counts, minutes) and exits with 1 if any combination
failed; each run's output is in ``<work dir>/<combination>.log`` (the work dir stays when one
failed, or with ``--keep``).
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from cookiecutter.main import cookiecutter
from slugify import slugify

sys.path.insert(0, str(Path(__file__).resolve().parent))

import test_cookiecutter as checks  # noqa: E402

MODELS = ("both", "gpt", "lstm")
FABRIC = {"yes": "with", "no": "no"}
COMBINATIONS = {
    f"{model}-{word}-fabric": {"model": model, "include_fabric": answer}
    for model in MODELS
    for answer, word in FABRIC.items()
}


def bake(source: Path, name: str, output: Path) -> tuple[Path, str]:
    """Bake combination ``name`` into ``output``; returns the project and its package name."""
    answers = {"project_name": f"Bake {list(COMBINATIONS).index(name) + 1}", **COMBINATIONS[name]}
    project = Path(cookiecutter(str(source), no_input=True, extra_context=answers, output_dir=str(output)))
    return project, slugify(answers["project_name"]).replace("-", "_")


def summary(output: str) -> str:
    """pytest's last summary line (``3 failed, 290 passed, 4 skipped in 512.3s``), without the time."""
    lines = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
    return re.sub(r"\s+in [\d.]+s.*$", "", lines[-1].strip("= ")) if lines else "no pytest summary"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help=f"combinations (default: all): {', '.join(COMBINATIONS)}")
    parser.add_argument("--fast", action="store_true", help='run the fast suites only (-m "not slow")')
    parser.add_argument("-x", "--exitfirst", action="store_true", help="stop each suite at its first failure")
    parser.add_argument("--keep", action="store_true", help="keep the work dir with the bakes")
    parser.add_argument("--work-dir", type=Path, help="where to bake (default: a new temporary folder)")
    args = parser.parse_args(argv)
    names = args.names or list(COMBINATIONS)
    unknown = sorted(set(names) - set(COMBINATIONS))
    if unknown:
        parser.error(f"unknown combination(s) {', '.join(unknown)}: choose from {', '.join(COMBINATIONS)}")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bake-all-"))
    work.mkdir(parents=True, exist_ok=True)
    scratch = work / "scratch"  # cookiecutter leaves empty temporary folders behind
    scratch.mkdir(exist_ok=True)
    tempfile.tempdir = str(scratch)
    source = checks.copy_template(work / "template" / "lmforge")

    rows = []
    for name in names:
        started = time.monotonic()
        project, package = bake(source, name, work / "bakes")
        found = checks.leftovers(project, checks.template.removed_features(COMBINATIONS[name]))
        print(f"{name}: baked {project}, running its {'fast' if args.fast else 'whole'} suite...", flush=True)
        pytest_args = ["-ra", *(["-x"] if args.exitfirst else [])]
        result = checks.check_project(project, package, "fast" if args.fast else "whole", *pytest_args)
        minutes = (time.monotonic() - started) / 60
        leftovers = "".join(f"leftover: {line}\n" for line in found)
        (work / f"{name}.log").write_text(leftovers + result.stdout + "\n" + result.stderr)
        counts = summary(result.stdout) + (f", {len(found)} leftovers" if found else "")
        rows.append((name, "passed" if result.returncode == 0 and not found else "FAILED", counts, minutes))
        print(f"{name}: {rows[-1][1]} ({rows[-1][2]}) in {minutes:.1f} min", flush=True)

    width = max(len(name) for name in names)
    print(f"\n{'combination':<{width}}  result  {'tests':<45}  minutes")
    for name, outcome, counts, minutes in rows:
        print(f"{name:<{width}}  {outcome:<6}  {counts:<45}  {minutes:7.1f}")
    passed = all(outcome == "passed" for _, outcome, _, _ in rows)
    if args.keep or not passed:
        print(f"\nbakes and logs: {work}/bakes, {work}/<combination>.log")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
