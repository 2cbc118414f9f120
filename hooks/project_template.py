"""How this repository becomes a cookiecutter template, and how a generated project is finished.

The repository root is a working project. Cookiecutter (>= 2.4) copies the repository to a
temporary folder and runs ``hooks/pre_prompt.py`` there, which calls :func:`build_template`:
the project's files (git's view: tracked plus untracked-but-not-ignored) move into a
``{{cookiecutter.project_slug}}`` folder, everything else in the copy is deleted. Cookiecutter
copies that folder without rendering it (``_copy_without_render: ["*"]``), so no file needs
Jinja escaping. ``hooks/pre_gen_project.py`` checks the answers with :func:`validate`, and
``hooks/post_gen_project.py`` calls :func:`finalize`, which trims the parts that were not
chosen, renames the package and writes the project's metadata.

What belongs to an optional part is declared here (:data:`FEATURE_FILES`) and, inside files
shared by several parts, with marker comments (see :func:`apply_markers`).
"""

from __future__ import annotations

import datetime
import fnmatch
import json
import keyword
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

TEMPLATE_NAME = "lmforge"
TEMPLATE_DIR = "{{cookiecutter.project_slug}}"
HOOKS_DIR = Path(__file__).resolve().parent
MIN_PYTHON = (3, 10)

# Parts of the repository that make it a template; never part of a generated project.
TEMPLATE_ONLY = ("cookiecutter.json", "hooks/*", "template_tests/*", "docs/cookiecutter.md")
# Requirements that only the template's own tests need.
TEMPLATE_REQUIREMENTS = ("cookiecutter", "pytest-cookies")

# Files and folders removed with an optional part (paths as in this repository, globs allowed;
# a folder goes with everything in it). Group options whose defaults list needs a removed config
# (an experiment on `/model: gpt`) go too, and a primary config whose default was removed
# switches to the group's remaining option.
FEATURE_FILES = {
    # Muon optimizes hidden matrices, which only the GPT has; the GPU smoke run (a GPT-2-small
    # with compiled blocks) and the tiny-shakespeare experiments' quality benchmark are the GPT's.
    "gpt": [
        "src/lmforge/models/gpt.py",
        # Hugging Face import/export: the GPT-2 and Llama layouts are the GPT's
        "src/lmforge/models/gpt_hf.py",
        "src/lmforge/training/pretrained.py",
        "src/lmforge/cli/export.py",
        "tests/models/test_gpt_options.py",
        "tests/models/test_gpt_hf.py",
        "tests/cli/test_export.py",
        "docs/pretrained.md",
        "benchmarks/hf.py",
        "configs/model/gpt.yaml",
        "configs/optimizer/muon.yaml",
        "benchmarks/quality.py",
        "benchmarks/finetune.py",  # translation fine-tuning trains a small GPT
        # tensor parallelism: only the GPT has a plan
        "src/lmforge/models/gpt_parallelize.py",
        "tests/training/test_tensor_parallel.py",
        "configs/trainer/tp.yaml",
        "configs/trainer/fsdp_tp.yaml",
        "benchmarks/parallel.py",
        "benchmarks/streaming.py",  # trains a small GPT from chunks and from the cache
        "benchmarks/gpu_smoke.sh",
        "tests/test_benchmarks.py",
    ],
    "lstm": ["src/lmforge/models/lstm.py", "configs/model/lstm.yaml"],
    "fabric": [
        "src/lmforge/fabric",
        "src/lmforge/cli/fabric.py",
        "configs/fabric.yaml",
        "tests/fabric",
        "docs/fabric.md",
    ],
}
# Words that name an optional part without depending on it; the template's tests accept them in
# a project without that part (every other mention of `gpt`, `lstm` or `fabric` in its README,
# configs and tests is a leftover).
GENERIC_MENTIONS = {
    "gpt": ("GPT-2", "nanoGPT", "GPT-NeoX", "GPTNeoX", "gpt_neox"),  # the last three: a transformers architecture
    "lstm": (),
    "fabric": ("lightning.fabric", "lightning_fabric", "fabric run"),
}
# Marker names: the optional parts, and `template` for text that only the template repository
# keeps (removed from every generated project).
FEATURES = (*FEATURE_FILES, "template")

# Without git (a template from an archive): what a local checkout holds that is not the project.
IGNORED_DIR_NAMES = {
    ".git",
    ".venv",
    "venv",
    "__pycache__",
    ".pytest_cache",
    ".mypy_cache",
    ".ruff_cache",
    ".import_linter_cache",
    ".ipynb_checkpoints",
    ".idea",
    ".vscode",
    "build",
    "dist",
}
IGNORED_ROOT_PATHS = {"data", "outputs", "multirun", "benchmarks/results"}
IGNORED_FILE_PATTERNS = ("*.pyc", "*.egg-info", ".stamp-*", ".DS_Store")
KEPT_IN_IGNORED = {"logs/.gitkeep"}  # `logs/` holds runs; only its placeholder is project

CREDIT = "Created from the lmforge template"  # + " (<template URL>)." in the README
RESERVED_PACKAGE_NAMES = {
    "torch",
    "lightning",
    "pytorch_lightning",
    "lightning_fabric",
    "lightning_utilities",
    "torchmetrics",
    "tensorboard",
    "hydra",
    "omegaconf",
    "tokenizers",
    "rich",
    "numpy",
    "filelock",
    "pytest",
    "yaml",
    "conftest",
    "helpers",
    "tests",
}
LICENSES = {"MIT": "MIT.txt", "Apache-2.0": "Apache-2.0.txt", "BSD-3-Clause": "BSD-3-Clause.txt"}
CHOICES = {
    "license": (*LICENSES, "none"),
    "model": ("both", "gpt", "lstm"),
    "include_fabric": ("yes", "no"),
    "default_corpus": ("stdlib", "text_files"),
}


class TemplateError(RuntimeError):
    """The template and its manifest or markers disagree (a maintainer's error, not a user's)."""


# --------------------------------------------------------------------------- pre_prompt


def is_template_only(path: str) -> bool:
    return any(fnmatch.fnmatch(path, pattern) for pattern in TEMPLATE_ONLY)


def project_files(root: Path) -> list[str]:
    """The project's files under ``root`` as sorted relative POSIX paths.

    In a git checkout: what git would commit (tracked, and untracked but not ignored).
    Otherwise the files outside :data:`IGNORED_DIR_NAMES` and friends. Template-only files
    are left out either way.
    """
    files = _git_files(root) if (root / ".git").exists() else None
    if files is None:
        files = _walked_files(root)
    return sorted(f for f in files if not is_template_only(f) and os.path.lexists(root / f))


def _git_files(root: Path) -> list[str] | None:
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=root,
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return [name for name in listed.decode("utf-8", "surrogateescape").split("\0") if name]


def _walked_files(root: Path) -> list[str]:
    files = []
    for directory, dirnames, filenames in os.walk(root):
        relative_dir = Path(directory).relative_to(root).as_posix()
        dirnames[:] = [
            name
            for name in dirnames
            if name not in IGNORED_DIR_NAMES
            and not name.endswith(".egg-info")
            and _join(relative_dir, name) not in IGNORED_ROOT_PATHS
        ]
        for name in filenames:
            path = _join(relative_dir, name)
            if any(fnmatch.fnmatch(name, pattern) for pattern in IGNORED_FILE_PATTERNS):
                continue
            if path.startswith("logs/") and path not in KEPT_IN_IGNORED:
                continue
            files.append(path)
    return files


def _join(directory: str, name: str) -> str:
    return name if directory == "." else f"{directory}/{name}"


def build_template(root: Path) -> None:
    """Turn cookiecutter's temporary copy ``root`` of the repository into a template.

    The project's files move into ``root/{{cookiecutter.project_slug}}``; everything else
    except ``cookiecutter.json`` and ``hooks/`` (a copied ``.venv``, logs, caches) is deleted,
    so the copy is small from here on.
    """
    target = root / TEMPLATE_DIR
    for path in project_files(root):
        destination = target / path
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(root / path, destination)
    for entry in root.iterdir():
        if entry.name in ("cookiecutter.json", "hooks", TEMPLATE_DIR):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


# --------------------------------------------------------------------------- pre_gen


def validate(answers: dict) -> list[str]:
    """One line per answer that cannot make a working project (empty: all fine)."""
    errors = []
    if not answers.get("project_name", "").strip():
        errors.append("project_name is empty: give the project a name, e.g. project_name='My LM'")
    slug = answers.get("project_slug", "")
    if not re.fullmatch(r"[a-z0-9]([a-z0-9._-]*[a-z0-9])?", slug):
        errors.append(
            f"project_slug {slug!r} is not a valid distribution and folder name: use lowercase "
            "letters, digits, '-', '_' and '.', starting and ending with a letter or digit (e.g. my-lm)"
        )
    package = answers.get("package_name", "")
    suggestion = re.sub(r"\W", "_", package.lower()).strip("_") or "my_lm"
    if suggestion[0].isdigit():
        suggestion = f"lm_{suggestion}"
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", package) or keyword.iskeyword(package):
        errors.append(
            f"package_name {package!r} is not a valid Python package name: use lowercase ASCII "
            f"letters, digits and '_', not starting with a digit (e.g. package_name={suggestion})"
        )
    elif package in sys.stdlib_module_names or package in RESERVED_PACKAGE_NAMES:
        errors.append(
            f"package_name {package!r} would shadow the module {package!r} of the standard library or of a "
            f"dependency: choose another name (e.g. package_name={package}_lm)"
        )
    version = answers.get("python_version", "")
    match = re.fullmatch(r"3\.(\d+)", version)
    if not match or int(match[1]) < MIN_PYTHON[1]:
        oldest = ".".join(map(str, MIN_PYTHON))
        errors.append(
            f"python_version {version!r} is not supported: give the oldest Python the project supports "
            f"as 3.N with N >= {MIN_PYTHON[1]} (e.g. python_version={oldest})"
        )
    for key, choices in CHOICES.items():
        if answers.get(key) not in choices:
            errors.append(f"{key} {answers.get(key)!r} is not one of: {', '.join(choices)}")
    return errors


# --------------------------------------------------------------------------- post_gen


def removed_features(answers: dict) -> set[str]:
    """The optional parts the answers leave out."""
    removed = set()
    if answers["model"] != "both":
        removed |= {"gpt", "lstm"} - {answers["model"]}
    if answers["include_fabric"] == "no":
        removed.add("fabric")
    return removed


def finalize(project: Path, answers: dict) -> None:
    """Make the generated copy at ``project`` the user's project: trimmed, renamed, described."""
    removed = removed_features(answers)
    removed_modules = []
    for feature in removed:
        for pattern in FEATURE_FILES[feature]:
            for path in project.glob(pattern):
                removed_modules += _modules_in(project, path)
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
    for path, text in text_files(project):
        trimmed = apply_markers(text, removed | {"template"}, where=path.relative_to(project).as_posix())
        if trimmed != text:
            path.write_text(trimmed, encoding="utf-8", newline="")
    _remove_empty_dirs(project)
    configs = project / "configs"
    drop_dependent_configs(configs, removed_modules)
    if answers["model"] != "both":  # the chosen model is the default, not model=hf (which needs init_from)
        set_primary_default(configs, "model", answers["model"])
    if answers["default_corpus"] != "stdlib":
        set_primary_default(configs, "data", answers["default_corpus"])
    drop_template_requirements(project)
    rename_package(project, answers["package_name"], answers["project_name"])
    write_pyproject_metadata(project / "pyproject.toml", answers)
    write_license(project, answers)
    write_readme(project / "README.md", answers)


def _modules_in(project: Path, path: Path) -> list[str]:
    """The dotted names of the package modules at ``path`` (a file or a folder) in ``project``."""
    files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
    modules = []
    for file in files:
        relative = file.relative_to(project)
        if relative.parts[0] == "src" and file.suffix == ".py":
            parts = relative.with_suffix("").parts[1:]
            modules.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return modules


def text_files(root: Path):
    """``(path, text)`` of every UTF-8 text file under ``root``."""
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.is_symlink():
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue
        try:
            yield path, data.decode("utf-8")
        except UnicodeDecodeError:
            continue


_FEATURE = "|".join(FEATURES)
_BLOCK = re.compile(rf"^\s*(?:#|<!--)\s*\[(?P<close>/?)(?P<neg>!?)(?P<feature>{_FEATURE})\]\s*(?:-->)?\s*$")
_INLINE = re.compile(rf"^(?P<code>.*?\S)\s*(?:#|<!--)\s*\[(?P<neg>!?)(?P<feature>{_FEATURE})\]\s*(?:-->)?\s*$")
_HINT = re.compile(rf"\[/?!?(?:{_FEATURE})\]")


def apply_markers(text: str, removed: set[str], where: str = "<text>") -> str:
    """Drop what belongs to the ``removed`` parts and strip the markers of the others.

    A line that is only a comment ``# [gpt]`` (``<!-- [gpt] -->`` in Markdown) opens a region
    that ``# [/gpt]`` closes; a line that ends with ``# [gpt]`` is a one-line region.
    ``[!gpt]`` marks the opposite: text kept only when gpt is removed. Regions nest. Blank
    lines right after a dropped region are dropped too when the text before it already ends
    with a blank line, so the spacing around it stays as it was.
    """
    if not _HINT.search(text):
        return text
    kept, open_regions, swallow_blanks = [], [], False
    for number, line in enumerate(text.splitlines(keepends=True), start=1):
        block = _BLOCK.match(line)
        if block:
            region = (block["neg"], block["feature"])
            if not block["close"]:
                open_regions.append((*region, number))
                continue
            if not open_regions or open_regions[-1][:2] != region:
                raise TemplateError(f"{where}:{number}: {line.strip()} closes no open [{''.join(region)}] region")
            open_regions.pop()
            if _dropped(*region, removed) and not any(_dropped(n, f, removed) for n, f, _ in open_regions):
                swallow_blanks = bool(kept) and not kept[-1].strip()
            continue
        if any(_dropped(neg, feature, removed) for neg, feature, _ in open_regions):
            continue
        inline = _INLINE.match(line)
        if inline:
            if _dropped(inline["neg"], inline["feature"], removed):
                continue
            line = inline["code"] + line[len(line.rstrip("\r\n")) :]
        if swallow_blanks and not line.strip():
            continue
        swallow_blanks = False
        kept.append(line)
    if open_regions:
        neg, feature, number = open_regions[-1]
        raise TemplateError(f"{where}:{number}: [{neg}{feature}] region is never closed")
    return "".join(kept)


def _dropped(neg: str, feature: str, removed: set[str]) -> bool:
    return (feature in removed) != bool(neg)


def _remove_empty_dirs(root: Path) -> None:
    for directory in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(directory.iterdir()):
            directory.rmdir()


_DEFAULT_ENTRY = re.compile(
    r"^(?P<head>\s*-\s*(?:override\s+)?/?)(?P<group>[\w/.-]+)(?P<sep>\s*:\s*)(?P<option>[\w.-]+)(?P<tail>\s*(?:#.*)?)$"
)


def _defaults_entries(text: str):
    """``(line index, match)`` of the ``group: option`` entries of a config's defaults list."""
    lines = text.splitlines()
    inside = False
    for index, line in enumerate(lines):
        if line.startswith("defaults:"):
            inside = True
            continue
        if inside and line.strip() and not line.startswith((" ", "-", "#")):
            return
        match = _DEFAULT_ENTRY.match(line) if inside else None
        if match and match["option"] not in ("null", "_self_"):
            yield index, match


def _replace_line(text: str, index: int, new_line: str) -> str:
    lines = text.splitlines(keepends=True)
    lines[index] = new_line + lines[index][len(lines[index].rstrip("\r\n")) :]
    return "".join(lines)


def drop_dependent_configs(config_dir: Path, removed_modules: list[str]) -> None:
    """Repair the configs that need a removed part.

    A group option (``configs/experiment/x.yaml``) whose defaults list names a removed config,
    or that names a removed module (``lmforge.models.gpt.Block``), is removed. A primary config
    (``configs/train.yaml``) whose default option was removed switches to the first remaining
    option of that group. Repeats until nothing changes, since a removed option can be needed
    by another.
    """
    module_reference = re.compile("|".join(rf"\b{re.escape(m)}\b" for m in removed_modules) or r"(?!)")
    changed = True
    while changed:
        changed = False
        for path in sorted(config_dir.rglob("*.yaml")):
            text = path.read_text(encoding="utf-8")
            is_group_option = path.parent != config_dir
            if is_group_option and module_reference.search(text):
                path.unlink()
                changed = True
                continue
            for index, entry in _defaults_entries(text):
                group_dir = config_dir / entry["group"]
                if not group_dir.is_dir() or (group_dir / f"{entry['option']}.yaml").exists():
                    continue
                if is_group_option:
                    path.unlink()
                    changed = True
                    break
                remaining = sorted(p.stem for p in group_dir.glob("*.yaml"))
                if not remaining:
                    raise TemplateError(f"{path}: every option of the {entry['group']!r} group was removed")
                text = _replace_line(text, index, entry.expand(rf"\g<head>\g<group>\g<sep>{remaining[0]}\g<tail>"))
                path.write_text(text, encoding="utf-8")
                changed = True
    _remove_empty_dirs(config_dir)


def set_primary_default(config_dir: Path, group: str, option: str) -> None:
    """Make ``option`` the default of ``group`` in every primary config that defaults to one."""
    if not (config_dir / group / f"{option}.yaml").exists():
        raise TemplateError(f"configs/{group}/{option}.yaml does not exist")
    for path in sorted(config_dir.glob("*.yaml")):
        text = path.read_text(encoding="utf-8")
        for index, entry in _defaults_entries(text):
            if entry["group"] == group:
                text = _replace_line(text, index, entry.expand(rf"\g<head>\g<group>\g<sep>{option}\g<tail>"))
        path.write_text(text, encoding="utf-8")


def _edit(path: Path, pattern: str, replacement, count: int = 0) -> None:
    """Substitute a regex that must match in ``path`` (a loud error when the file changed shape).

    ``replacement`` is literal text, or a function of the match.
    """
    text = path.read_text(encoding="utf-8")
    substitute = replacement if callable(replacement) else (lambda _: replacement)
    new_text, found = re.subn(pattern, substitute, text, count=count, flags=re.MULTILINE)
    if not found:
        raise TemplateError(f"{path.name}: nothing matches {pattern!r}; update hooks/project_template.py")
    path.write_text(new_text, encoding="utf-8")


def drop_template_requirements(project: Path) -> None:
    """Remove the template's own test tools and test folder from the project's settings."""
    names = "|".join(re.escape(name) for name in TEMPLATE_REQUIREMENTS)
    _edit(project / "pyproject.toml", rf'^\s*"(?:{names})\b[^"\n]*",?[ \t]*\n', "")
    _edit(project / "pyproject.toml", r'^(testpaths\s*=\s*\[.*?),\s*"template_tests"', lambda match: match[1])
    constraints = project / "constraints.txt"
    if constraints.exists():
        _edit(constraints, rf"^(?:{names})==[^\n]*\n", "")


def rename_package(project: Path, package_name: str, project_name: str) -> None:
    """Replace the template's name: ``lmforge`` -> package, ``LMFORGE`` -> PACKAGE, other casings -> project name."""
    pattern = re.compile(TEMPLATE_NAME, re.IGNORECASE)

    def replacement(match: re.Match) -> str:
        found = match[0]
        if found == TEMPLATE_NAME:
            return package_name
        if found == TEMPLATE_NAME.upper():
            return package_name.upper()
        return project_name

    for path, text in text_files(project):
        renamed = pattern.sub(replacement, text)
        if renamed != text:
            path.write_text(renamed, encoding="utf-8", newline="")
    for path in sorted(project.rglob(f"*{TEMPLATE_NAME}*"), key=lambda p: len(p.parts), reverse=True):
        path.rename(path.with_name(path.name.replace(TEMPLATE_NAME, package_name)))


def toml_string(value: str) -> str:
    """A TOML basic string (JSON's escapes are all valid TOML)."""
    return json.dumps(value, ensure_ascii=False)


def write_pyproject_metadata(pyproject: Path, answers: dict) -> None:
    """Name, description, authors, license and Python floor of ``[project]`` from the answers."""
    _edit(pyproject, r'^name = "[^"\n]*"$', f"name = {toml_string(answers['project_slug'])}", count=1)
    _edit(pyproject, r'^description = "[^\n]*"$', f"description = {toml_string(answers['description'])}", count=1)
    _edit(pyproject, r'^requires-python = "[^"\n]*"$', f'requires-python = ">={answers["python_version"]}"')
    author = [
        f"{key} = {toml_string(answers[field].strip())}"
        for key, field in (("name", "author_name"), ("email", "author_email"))
        if answers[field].strip()
    ]
    _edit(pyproject, r"^authors = \[[^\n]*\]$", f"authors = [{{ {', '.join(author)} }}]" if author else "authors = []")
    if answers["license"] == "none":
        _edit(pyproject, r"^license = [^\n]*\n", "")
    else:
        _edit(pyproject, r"^license = [^\n]*$", f"license = {{ text = {toml_string(answers['license'])} }}")


def write_license(project: Path, answers: dict) -> None:
    """LICENSE with the chosen text, the year and the author; no LICENSE for ``none``."""
    license_file = project / "LICENSE"
    if answers["license"] == "none":
        license_file.unlink(missing_ok=True)
        return
    text = (HOOKS_DIR / "licenses" / LICENSES[answers["license"]]).read_text(encoding="utf-8")
    holder = answers["author_name"].strip() or answers["project_name"]
    license_file.write_text(text.replace("{year}", str(datetime.date.today().year)).replace("{holder}", holder))


def write_readme(readme: Path, answers: dict) -> None:
    """The README's title and opening paragraph become the project's name and description."""
    lines = readme.read_text(encoding="utf-8").splitlines(keepends=True) if readme.exists() else []
    if lines and lines[0].startswith("# "):
        lines.pop(0)
    first_section = next((i for i, line in enumerate(lines) if line.startswith("## ")), len(lines))
    template = answers.get("_template", "")
    source = f" ({template})" if re.match(r"^(gh:|gl:|bb:|git@|git\+|https?://)", template) else ""
    head = f"# {answers['project_name']}\n\n{answers['description']}\n\n{CREDIT}{source}.\n"
    body = "".join(lines[first_section:])
    readme.write_text(head + ("\n" + body if body else ""), encoding="utf-8")
