"""The cookiecutter template: the hooks' rules, and projects generated from this checkout.

The fast tests check the hooks' pieces; the slow ones bake projects with cookiecutter (through
pytest-cookies) from a clean copy of this checkout and run checks, their fast test suite or
their whole test suite inside them with the current interpreter (nothing is installed).
``template_tests/bake_all.py`` runs the whole suite of every model/Fabric combination.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import tomllib
from slugify import slugify

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "hooks"))

import project_template as template  # noqa: E402

CONTEXT = json.loads((REPO_ROOT / "cookiecutter.json").read_text(encoding="utf-8"))

# Answers baked by the slow tests. Each bake gets the cheap checks; FAST_SUITE ones also run the
# generated project's fast test suite (`-m "not slow"`, a few minutes each on 2 cores), WHOLE_SUITE
# ones its whole test suite, slow tests included (about 10 minutes on 2 cores).
BAKES = {
    "defaults": {},
    "lstm-no-fabric": {"project_name": "My LM", "model": "lstm", "include_fabric": "no"},
    "gpt-unicode-name": {
        "project_name": "Élan Vital LM",
        "model": "gpt",
        "license": "none",
        "description": 'Says "hi" with a \\ backslash',
        "author_email": "",
    },
    "both-no-fabric-text-files": {
        "model": "both",
        "include_fabric": "no",
        "default_corpus": "text_files",
        "license": "Apache-2.0",
    },
    "lstm-with-fabric": {"project_name": "Rnn Lab", "model": "lstm", "license": "BSD-3-Clause"},
}
FAST_SUITE = ("gpt-unicode-name",)
WHOLE_SUITE = ("lstm-no-fabric",)

# Files of a local checkout that are not the project; the bakes must leave them out.
IGNORED_JUNK = (
    ".venv/bin/python3",
    "logs/train/runs/x/train.log",
    "data/cache/tokens.bin",
    "src/lmforge/__pycache__/x.pyc",
)
# A project file that has Jinja-like syntax for reasons of its own; it must come out unchanged.
JINJA_LOOKALIKE = ".github/workflows/ci.yml"
JINJA_LOOKALIKE_TEXT = "on: push\njobs:\n  test:\n    runs-on: ${{ matrix.os }}  # {% raw %} {{ x }} {# y #}\n"


# ----------------------------------------------------------------------------- the hooks' pieces


MARKED = (
    "keep\n"
    "# [gpt]\ngpt a\n  # [lstm]\ngpt and lstm\n  # [/lstm]\nline = 1  # [gpt]\n# [/gpt]\n"
    "lstm line  # [lstm]\n"
    "# not a marker: [gpt] in prose\n"
    "end\n"
)


@pytest.mark.parametrize(
    "removed,expected",
    [
        ({"gpt"}, "keep\nlstm line\n# not a marker: [gpt] in prose\nend\n"),
        ({"lstm"}, "keep\ngpt a\nline = 1\n# not a marker: [gpt] in prose\nend\n"),
        (set(), "keep\ngpt a\ngpt and lstm\nline = 1\nlstm line\n# not a marker: [gpt] in prose\nend\n"),
    ],
)
def test_markers_drop_regions_and_lines_of_removed_parts(removed, expected):
    assert template.apply_markers(MARKED, removed) == expected


def test_markers_negated_markdown_and_spacing():
    text = (
        "Intro.\n\n<!-- [template] -->\nRun cookiecutter.\n<!-- [/template] -->\n\n"
        "<!-- [!fabric] -->\nNo Fabric here.\n<!-- [/!fabric] -->\n| a | b |<!-- [fabric] -->\nEnd.\n"
    )
    assert template.apply_markers(text, {"template"}) == "Intro.\n\n| a | b |\nEnd.\n"
    assert template.apply_markers(text, {"template", "fabric"}) == "Intro.\n\nNo Fabric here.\nEnd.\n"
    python = "import a\n\n\n# [gpt]\ndef f():\n    pass\n# [/gpt]\n\n\ndef g():\n    pass\n"
    assert template.apply_markers(python, {"gpt"}) == "import a\n\n\ndef g():\n    pass\n"


@pytest.mark.parametrize(
    "text,message",
    [
        ("# [gpt]\nx\n", r"x\.py:1: \[gpt\] region is never closed"),
        ("x\n# [/fabric]\n", r"x\.py:2: # \[/fabric\] closes no open \[fabric\] region"),
        ("# [gpt]\n# [/lstm]\n", r"closes no open \[lstm\] region"),
    ],
)
def test_unbalanced_markers_fail_loudly(text, message):
    with pytest.raises(template.TemplateError, match=message):
        template.apply_markers(text, set(), where="x.py")


def test_markers_in_this_repository_are_balanced():
    for path in template.project_files(REPO_ROOT):
        full = REPO_ROOT / path
        if (
            full.is_file()
            and full.suffix in (".py", ".yaml", ".md", ".toml", ".txt", "")
            and full.stat().st_size < 2**20
        ):
            template.apply_markers(
                full.read_text(encoding="utf-8", errors="replace"), set(template.FEATURES), where=path
            )


def answers(**changes) -> dict:
    defaults = {
        "project_name": "My LM",
        "project_slug": "my-lm",
        "package_name": "my_lm",
        "description": "d",
        "author_name": "A",
        "author_email": "",
        "license": "MIT",
        "python_version": "3.10",
        "model": "both",
        "include_fabric": "yes",
        "default_corpus": "stdlib",
    }
    return defaults | changes


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(package_name="my-lm"), "package_name 'my-lm' is not a valid Python package name.*package_name=my_lm"),
        (dict(package_name="3d_lm"), r"not a valid Python package name.*\(e\.g\. package_name=lm_3d_lm\)"),
        (dict(package_name="class"), "package_name 'class' is not a valid Python package name"),
        (dict(package_name="json"), "package_name 'json' would shadow the module 'json'"),
        (dict(package_name="torch"), "package_name 'torch' would shadow"),
        (
            dict(python_version="3.8"),
            r"python_version '3\.8' is not supported.*N >= 10 \(e\.g\. python_version=3\.10\)",
        ),
        (dict(python_version="3"), "python_version '3' is not supported"),
        (dict(project_slug="My LM"), "project_slug 'My LM' is not a valid distribution and folder name"),
        (dict(project_name="  "), "project_name is empty"),
        (dict(model="rnn"), "model 'rnn' is not one of: both, gpt, lstm"),
    ],
)
def test_validate_explains_each_bad_answer(changes, message):
    errors = template.validate(answers(**changes))
    assert len(errors) == 1 and re.search(message, errors[0]), errors


def test_validate_accepts_good_answers():
    assert template.validate(answers()) == []
    assert template.validate(answers(python_version="3.13", package_name="_private_lm", model="lstm")) == []


def test_min_python_is_the_template_floor():
    requires = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires == ">=" + ".".join(map(str, template.MIN_PYTHON))
    assert CONTEXT["python_version"] == ".".join(map(str, template.MIN_PYTHON))


def test_cookiecutter_json_matches_the_hooks():
    variables = [key for key in CONTEXT if not key.startswith("_")]
    assert set(CONTEXT["__prompts__"]) == set(variables)
    for key, choices in template.CHOICES.items():
        assert tuple(CONTEXT[key]) == choices
        assert set(CONTEXT["__prompts__"][key]) == {"__prompt__", *choices}
    assert CONTEXT["_copy_without_render"] == ["*"]
    assert set(template.LICENSES) == set(CONTEXT["license"]) - {"none"}
    for filename in template.LICENSES.values():
        text = (REPO_ROOT / "hooks" / "licenses" / filename).read_text()
        assert "{year}" in text and "{holder}" in text


def test_manifest_names_files_of_this_repository():
    for feature, patterns in template.FEATURE_FILES.items():
        for pattern in patterns:
            assert list(REPO_ROOT.glob(pattern)), f"FEATURE_FILES[{feature!r}]: {pattern} matches nothing"


def test_project_files_follow_git_and_the_fallback_agrees(tmp_path):
    listed = template.project_files(REPO_ROOT)
    assert {"pyproject.toml", "Makefile", ".gitignore", ".ci/run", "src/lmforge/cli/__init__.py"} <= set(listed)
    assert not [p for p in listed if template.is_template_only(p)]
    assert not [p for p in listed if p.split("/")[0] in (".venv", "data", ".git") or "__pycache__" in p]
    assert not [p for p in listed if p.startswith("logs/") and p != "logs/.gitkeep"]
    # Without git, the explicit ignore list must select the same files here...
    walked = sorted(p for p in template._walked_files(REPO_ROOT) if not template.is_template_only(p))
    assert sorted(set(walked) - set(listed)) == [], "git ignores these, hooks/project_template.py's IGNORED_* do not"
    # ...and on a copy with the junk a working checkout collects.
    for path in listed:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / path, tmp_path / path)
    for junk in (*IGNORED_JUNK, "src/lmforge.egg-info/PKG-INFO", ".pytest_cache/v/x", "benchmarks/results/r.json"):
        (tmp_path / junk).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / junk).write_text("junk")
    assert template.project_files(tmp_path) == listed


# ----------------------------------------------------------------------------- baking


@pytest.fixture(scope="session")
def template_source(tmp_path_factory) -> Path:
    """A copy of this checkout as git sees it (with .git), plus ignored junk and a Jinja look-alike."""
    return copy_template(tmp_path_factory.mktemp("template") / "lmforge")


def copy_template(source: Path) -> Path:
    """Copy this checkout's project and template files (with .git) to ``source``, plus ignored junk
    and a Jinja look-alike; a local template as a user's clone would be."""
    for path in template.project_files(REPO_ROOT) + _template_only_files():
        (source / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / path, source / path)
    shutil.copytree(REPO_ROOT / ".git", source / ".git")
    for junk in IGNORED_JUNK:
        (source / junk).parent.mkdir(parents=True, exist_ok=True)
        (source / junk).write_text("junk")
    (source / JINJA_LOOKALIKE).parent.mkdir(parents=True, exist_ok=True)
    (source / JINJA_LOOKALIKE).write_text(JINJA_LOOKALIKE_TEXT)
    return source


def _template_only_files() -> list[str]:
    files = []
    for pattern in template.TEMPLATE_ONLY:
        path = REPO_ROOT / pattern.removesuffix("/*")
        found = (
            [f for f in path.rglob("*") if f.is_file() and "__pycache__" not in f.parts] if path.is_dir() else [path]
        )
        files += [f.relative_to(REPO_ROOT).as_posix() for f in found if f.exists()]
    return files


@pytest.fixture(scope="session")
def bake(cookies_session, template_source, tmp_path_factory):
    """Bake the named entry of BAKES (once per session); returns pytest-cookies' Result."""
    baked = {}
    scratch = tmp_path_factory.mktemp("scratch")  # cookiecutter leaves empty temp folders behind

    def run(name: str):
        if name not in baked:
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(tempfile, "tempdir", str(scratch))
                baked[name] = cookies_session.bake(extra_context=BAKES[name], template=str(template_source))
        return baked[name]

    return run


def context_of(name: str) -> dict:
    """The answers of a bake as cookiecutter derives them."""
    values = {k: (v[0] if isinstance(v, list) else v) for k, v in CONTEXT.items() if not k.startswith("_")}
    values |= BAKES[name]
    values["project_slug"] = slugify(values["project_name"])
    values["package_name"] = values["project_slug"].replace("-", "_")
    return values


def run_in(project: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run the current interpreter in a generated project, its package importable from src/."""
    # One thread: the tiny models gain nothing from more, and oversubscribed cores cost 2-4x.
    env = {**os.environ, "PYTHONPATH": str(project / "src"), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(
        [sys.executable, *args], cwd=project, env=env, capture_output=True, text=True, timeout=timeout
    )


def config_options(config_dir: Path) -> set[str]:
    """``group=option`` for every option of every config group."""
    return {
        f"{p.parent.relative_to(config_dir).as_posix()}={p.stem}"
        for p in config_dir.rglob("*.yaml")
        if p.parent != config_dir
    }


def leftovers(project: Path, removed: set[str]) -> list[str]:
    """Every mention of the template's name, of cookiecutter, of a removed part or of a removed
    config option (``optimizer=muon``, or `` `muon` `` in the README) that should not be there."""
    found = []
    gone = config_options(REPO_ROOT / "configs") - config_options(project / "configs")
    gone_options = re.compile(
        "|".join(rf"\b{re.escape(o)}\b|`{re.escape(o.split('=')[1])}`" for o in sorted(gone)) or r"(?!)"
    )
    for path in sorted(project.rglob("*")):
        relative = path.relative_to(project).as_posix()
        if re.search("lmforge|cookiecutter", relative, re.IGNORECASE):
            found.append(f"{relative}: file name")
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), start=1):
            if re.search("lmforge|cookiecutter", line, re.IGNORECASE) and not (
                relative == "README.md" and line.startswith(template.CREDIT)
            ):
                found.append(f"{relative}:{number}: {line.strip()}")
            if relative.split("/")[0] in ("src", "benchmarks", "scripts") and not relative.endswith(".yaml"):
                continue  # code may name a part in prose; its imports are checked by importing it
            if gone_options.search(line):
                found.append(f"{relative}:{number}: names a removed config option: {line.strip()}")
            for feature in removed:
                stripped = line
                for generic in template.GENERIC_MENTIONS[feature]:
                    stripped = re.sub(re.escape(generic), "", stripped, flags=re.IGNORECASE)
                if re.search(feature, stripped, re.IGNORECASE):
                    found.append(f"{relative}:{number}: mentions the removed {feature}: {line.strip()}")
    return found


CHECK_PROJECT = r'''
"""Run in a generated project: import every module, every CLI command and `_target_`, compose
every config, then run pytest with the remaining arguments (one interpreter start for all)."""
import ast, importlib, importlib.util, pkgutil, sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

package, pytest_args = sys.argv[1], sys.argv[2:]
root = importlib.import_module(package)
modules = [package] + [
    m.name for m in pkgutil.walk_packages(root.__path__, package + ".") if not m.name.endswith("__main__")
]
for name in modules:
    importlib.import_module(name)
for module, _ in importlib.import_module(package + ".cli").COMMANDS.values():
    assert importlib.util.find_spec(module), f"CLI command module {module} is missing"

# Imports of this package anywhere in the project (tests, benchmarks...) name existing modules,
# except optional ones guarded by `except ImportError`.
for path in Path(".").rglob("*.py"):
    tree = ast.parse(path.read_text())
    guarded = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try) for n in ast.walk(t)
               if any("ImportError" in ast.unparse(h.type or ast.Name("x")) for h in t.handlers)}
    for node in ast.walk(tree):
        ours = isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == package
        if ours and id(node) not in guarded:
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name) or importlib.util.find_spec(f"{node.module}.{alias.name}"), \
                    f"{path}: from {node.module} import {alias.name}"
        if isinstance(node, ast.Import) and id(node) not in guarded:
            for alias in node.names:
                if alias.name.split(".")[0] == package:
                    importlib.import_module(alias.name)

def targets(node):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from ([value] if key == "_target_" else targets(value))
    elif isinstance(node, list):
        for value in node:
            yield from targets(value)

configs = Path("configs").resolve()
groups = {}
for path in sorted(configs.rglob("*.yaml")):
    for target in targets(yaml.safe_load(path.read_text()) or {}):
        module, _, attr = target.rpartition(".")
        assert hasattr(importlib.import_module(module), attr), f"{path}: {target}"
    if path.parent != configs:
        groups.setdefault(path.parent.relative_to(configs).as_posix(), []).append(path.stem)

# Every primary config as it is, and every group option in the first primary config that has the group.
composed = 0
with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
    for primary in sorted(configs.glob("*.yaml"), key=lambda p: (p.stem != "train", p.stem)):
        compose(primary.stem)
        entries = [e for e in yaml.safe_load(primary.read_text()).get("defaults", []) if isinstance(e, dict)]
        own_groups = {key.removeprefix("override ").lstrip("/") for e in entries for key in e}
        for group in sorted(own_groups & set(groups)):
            for option in groups.pop(group):
                compose(primary.stem, overrides=[f"{group}={option}"])
                composed += 1
print(f"checked {len(modules)} modules, composed {composed} group options", flush=True)
sys.exit(pytest.main(pytest_args))
'''


def expected_paths(ctx: dict) -> tuple[set[str], set[str]]:
    """(paths that must exist, paths that must not) in a bake with answers ``ctx``."""
    package = ctx["package_name"]
    present = {
        "pyproject.toml",
        "Makefile",
        "README.md",
        ".gitignore",
        ".ci/run",
        "constraints.txt",
        "logs/.gitkeep",
        "configs/train.yaml",
        "tests/conftest.py",
        "tests/helpers.py",
        f"src/{package}/cli/__init__.py",
        f"src/{package}/models/base.py",
        JINJA_LOOKALIKE,
    }
    absent = {"cookiecutter.json", "hooks", "template_tests", "docs/cookiecutter.md", *IGNORED_JUNK, "data", ".venv"}
    parts = {
        "gpt": {f"src/{package}/models/gpt.py", "configs/model/gpt.yaml", "configs/experiment/shakespeare_char.yaml"},
        "lstm": {f"src/{package}/models/lstm.py", "configs/model/lstm.yaml"},
        "fabric": {
            f"src/{package}/fabric/loop.py",
            f"src/{package}/cli/fabric.py",
            "configs/fabric.yaml",
            "tests/fabric/test_fabric_loop.py",
            "docs/fabric.md",
        },
    }
    removed = template.removed_features(ctx)
    for feature, paths in parts.items():
        (absent if feature in removed else present).update(paths)
    (absent if ctx["license"] == "none" else present).add("LICENSE")
    return present, absent


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BAKES))
def test_bake_is_renamed_trimmed_and_described(name, bake):
    result = bake(name)
    assert result.exit_code == 0, result.exception
    project = result.project_path
    ctx = context_of(name)
    assert project.name == ctx["project_slug"]

    present, absent = expected_paths(ctx)
    assert sorted(p for p in present if not (project / p).exists()) == [], "missing"
    assert sorted(p for p in absent if (project / p).exists()) == [], "should be absent"
    assert os.access(project / ".ci/run", os.X_OK)
    assert (project / JINJA_LOOKALIKE).read_text() == JINJA_LOOKALIKE_TEXT
    # A project file with `{{64}}` in an f-string: only the markers and the rename touch it.
    original = (REPO_ROOT / "tests/data/test_data.py").read_text(encoding="utf-8")
    assert "{{" in original
    expected = template.apply_markers(original, template.removed_features(ctx) | {"template"})
    assert (project / "tests/data/test_data.py").read_text(encoding="utf-8") == expected.replace(
        "lmforge", ctx["package_name"]
    )
    found = leftovers(project, template.removed_features(ctx))
    assert not found, "leftovers (mark them, see docs/cookiecutter.md):\n" + "\n".join(found)

    pyproject = tomllib.loads((project / "pyproject.toml").read_text(encoding="utf-8"))
    meta = pyproject["project"]
    assert meta["name"] == ctx["project_slug"]
    assert meta["description"] == ctx["description"]
    assert meta["requires-python"] == ">=" + ctx["python_version"]
    assert meta["authors"] == [
        {"name": ctx["author_name"]} | ({"email": ctx["author_email"]} if ctx["author_email"] else {})
    ]
    assert meta["scripts"] == {ctx["package_name"]: f"{ctx['package_name']}.cli:main"}
    assert pyproject["tool"]["pytest"]["ini_options"]["testpaths"] == ["tests"]
    if ctx["license"] == "none":
        assert "license" not in meta
    else:
        assert meta["license"] == {"text": ctx["license"]}
        license_text = (project / "LICENSE").read_text()
        assert ctx["author_name"] in license_text and "{year}" not in license_text
    from setuptools.config.pyprojecttoml import read_configuration

    read_configuration(project / "pyproject.toml")  # validates [project] as pip would

    readme = (project / "README.md").read_text(encoding="utf-8")
    assert readme.startswith(f"# {ctx['project_name']}\n\n{ctx['description']}\n")
    assert "make train" in readme and "make test" in readme

    train_defaults = (project / "configs/train.yaml").read_text()
    default_model = "gpt" if ctx["model"] in ("both", "gpt") else "lstm"
    assert re.search(rf"^\s*- model: {default_model}$", train_defaults, re.MULTILINE)
    assert re.search(rf"^\s*- data: {ctx['default_corpus']}$", train_defaults, re.MULTILINE)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BAKES))
def test_bake_imports_composes_and_passes_its_tests(name, bake):
    result = bake(name)
    assert result.exit_code == 0, result.exception
    project, package = result.project_path, context_of(name)["package_name"]
    suite = "whole" if name in WHOLE_SUITE else "fast" if name in FAST_SUITE else None
    checked = check_project(project, package, suite, "-x")
    assert checked.returncode == 0, checked.stdout[-5000:] + checked.stderr[-3000:]
    assert re.search(r"composed [1-9]\d* group options", checked.stdout)
    assert re.search(r"\d+ passed" if suite else r"\d+ tests? collected", checked.stdout)


def check_project(project: Path, package: str, suite: str | None, *pytest_args: str) -> subprocess.CompletedProcess:
    """CHECK_PROJECT in a generated project, then its ``"whole"`` test suite (slow tests included),
    its ``"fast"`` one (``-m "not slow"``), or, for ``None``, only the collection of its tests."""
    quiet = ["-q", "-p", "no:cacheprovider", "--show-capture=no", *pytest_args]
    selection = {"whole": [], "fast": ["-m", "not slow"], None: ["--collect-only"]}[suite]
    return run_in(project, "-c", CHECK_PROJECT, package, *selection, *quiet, timeout=3600 if suite else 900)


@pytest.mark.slow
@pytest.mark.parametrize(
    "answer,message",
    [
        ("package_name=my-lm", "error: package_name 'my-lm' is not a valid Python package name"),
        ("python_version=3.8", "error: python_version '3.8' is not supported"),
    ],
)
def test_invalid_answers_stop_before_anything_is_generated(answer, message, template_source, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(f"cookiecutters_dir: {tmp_path}/cookiecutters\nreplay_dir: {tmp_path}/replay\n")
    output = tmp_path / "out"
    scratch = tmp_path / "scratch"  # cookiecutter leaves its template copy behind when a hook fails
    scratch.mkdir()
    generated = subprocess.run(
        [
            sys.executable,
            "-m",
            "cookiecutter",
            str(template_source),
            "--no-input",
            "-o",
            str(output),
            "--config-file",
            str(config),
            answer,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TMPDIR": str(scratch)},
    )
    assert generated.returncode != 0
    assert message in generated.stderr
    assert not output.exists() or not any(output.iterdir())
