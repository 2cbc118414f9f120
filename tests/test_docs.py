"""The documentation stays true to the repository: a short README, and no link or path that leads nowhere.

Checked in the README, every page of ``docs/`` and ``benchmarks/RESULTS.md``:

* every relative Markdown link points to an existing file or folder of the repository, and a
  ``#anchor`` (in the same page or another one) to an existing heading;
* every repository path written in backticks exists: spans without spaces or placeholders that
  start with a top-level folder of the repository (``src/``, ``configs/``, ...) or end in
  ``.py``, ``.yaml`` or ``.md``. A bare file name (``train.yaml``) must name some file of the
  repository. Text inside fenced code blocks is not checked (commands there name paths of the
  user's machine, run directories and placeholders).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250

PATH_PREFIXES = ("src/", "configs/", "tests/", "benchmarks/", "scripts/", "docs/", "hooks/")
PATH_SUFFIXES = (".py", ".yaml", ".md")
# Folders that are not part of the repository's content (environments, run outputs, caches).
SKIPPED_DIRS = {"logs", "data", "build", "dist", "__pycache__", "outputs", "multirun"}

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'][^)]*[\"'])?\s*\)")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
_PATH_CHARS = re.compile(r"^[\w./-]+$")


def doc_files() -> list[Path]:
    """The Markdown files whose links and paths are checked."""
    files = [
        REPO_ROOT / "README.md",
        *sorted((REPO_ROOT / "docs").glob("*.md")),
        REPO_ROOT / "benchmarks" / "RESULTS.md",
    ]
    return [path for path in files if path.is_file()]


def prose_lines(text: str) -> list[tuple[int, str]]:
    """``(line number, line)`` of the lines outside fenced code blocks."""
    lines, fenced = [], False
    for number, line in enumerate(text.splitlines(), start=1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, line))
    return lines


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = _CODE_SPAN.sub(lambda match: match[2], heading)
    text = re.sub(r"<[^>]*>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file (a repeated heading gets ``-1``, ``-2``, ...)."""
    found: dict[str, int] = {}
    result = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        match = _HEADING.match(line)
        if not match:
            continue
        base = slug(match[2])
        count = found.get(base, 0)
        found[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def repository_file_names(root: Path = REPO_ROOT) -> set[str]:
    """The names of the repository's files, for backticked bare file names like ``train.yaml``."""
    names = set()
    for _directory, dirnames, filenames in os.walk(root):
        dirnames[:] = [
            name
            for name in dirnames
            if not name.startswith(".") and name not in SKIPPED_DIRS and not name.endswith(".egg-info")
        ]
        names.update(filenames)
    return names


def link_problems(path: Path, root: Path = REPO_ROOT) -> list[str]:
    """One line per relative link of ``path`` that points to no file, or to no heading."""
    problems = []
    where = path.relative_to(root).as_posix()
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        for match in _LINK.finditer(_CODE_SPAN.sub("", line)):
            target = match[1]
            if _SCHEME.match(target):
                continue  # http(s), mailto: not checked here
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part if file_part else path).resolve()
            if not linked.is_relative_to(root.resolve()):
                problems.append(f"{where}:{number}: {target} points outside the repository")
            elif not linked.exists():
                problems.append(f"{where}:{number}: {target} does not exist")
            elif anchor and linked.suffix == ".md" and anchor.lower() not in anchors(linked):
                problems.append(f"{where}:{number}: {target}: no heading with the anchor #{anchor} in {linked.name}")
    return problems


def looks_like_path(span: str) -> bool:
    if span in PATH_SUFFIXES or not _PATH_CHARS.match(span):
        return False  # a file type (`.py`), or a span with placeholders, wildcards, spaces or `=`
    return span.startswith(PATH_PREFIXES) or span.endswith(PATH_SUFFIXES)


def path_problems(path: Path, file_names: set[str], root: Path = REPO_ROOT) -> list[str]:
    """One line per backticked repository path of ``path`` that does not exist."""
    problems = []
    where = path.relative_to(root).as_posix()
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        for match in _CODE_SPAN.finditer(line):
            span = match[2].strip()
            if not looks_like_path(span):
                continue
            exists = (root / span).exists() if "/" in span else span in file_names
            if not exists:
                problems.append(f"{where}:{number}: `{span}` does not exist in the repository")
    return problems


def test_readme_is_short():
    lines = (REPO_ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines, more than {README_MAX_LINES}: move the details to docs/"
    )


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: p.relative_to(REPO_ROOT).as_posix())
def test_links_point_to_existing_files_and_headings(doc):
    problems = link_problems(doc)
    assert not problems, "broken links:\n" + "\n".join(problems)


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: p.relative_to(REPO_ROOT).as_posix())
def test_backticked_paths_exist(doc):
    problems = path_problems(doc, repository_file_names())
    assert not problems, "paths that do not exist:\n" + "\n".join(problems)


def test_every_docs_page_is_linked_from_the_readme():
    readme = REPO_ROOT / "README.md"
    linked = set()
    for _, line in prose_lines(readme.read_text(encoding="utf-8")):
        for match in _LINK.finditer(_CODE_SPAN.sub("", line)):
            if not _SCHEME.match(match[1]):
                linked.add((readme.parent / match[1].partition("#")[0]).resolve())
    pages = sorted((REPO_ROOT / "docs").glob("*.md"))
    unlinked = [page.relative_to(REPO_ROOT).as_posix() for page in pages if page.resolve() not in linked]
    assert not unlinked, f"docs pages that README.md does not link to: {', '.join(unlinked)}"


@pytest.mark.parametrize(
    "heading,anchor",
    [
        ("Bad input: one line, exit code 1, nothing touched", "bad-input-one-line-exit-code-1-nothing-touched"),
        ("### `data`", "data"),
        ("Hydra with several processes", "hydra-with-several-processes"),
        ("Why 1.907 and not 1.88?", "why-1907-and-not-188"),
    ],
)
def test_slug_follows_github(heading, anchor):
    assert slug(heading.lstrip("# ")) == anchor


def test_checks_catch_broken_links_and_paths(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "train.yaml").write_text("")
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "# Page\n\n## Real heading\n\n"
        "[ok](../configs/train.yaml) [ok](#real-heading) [web](https://example.org/x.md)\n"
        "[gone](missing.md) [no anchor](#nowhere) [outside](../../x.md)\n"
        "`configs/train.yaml` `train.yaml` `configs/<name>.yaml` `data.path=x.md`\n"
        "`configs/missing.yaml` `missing.py`\n"
        "```\n[in a fence](nowhere.md) `src/in_a_fence.py`\n```\n",
        encoding="utf-8",
    )
    links = link_problems(page, tmp_path)
    assert [problem.split(": ", 1)[1] for problem in links] == [
        "missing.md does not exist",
        "#nowhere: no heading with the anchor #nowhere in page.md",
        "../../x.md points outside the repository",
    ]
    paths = path_problems(page, repository_file_names(tmp_path), tmp_path)
    assert [problem.split(": ", 1)[1] for problem in paths] == [
        "`configs/missing.yaml` does not exist in the repository",
        "`missing.py` does not exist in the repository",
    ]
