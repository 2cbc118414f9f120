"""Cookiecutter's first hook: make the temporary copy of this repository a template.

Cookiecutter (>= 2.4) runs it before asking anything, in a fresh copy of the repository.
See project_template.build_template.
"""

from pathlib import Path

from project_template import build_template

build_template(Path.cwd())
