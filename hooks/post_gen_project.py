"""Cookiecutter's last step: trim, rename and describe the generated project (its folder is the cwd)."""

import json
import os
import sys
from pathlib import Path

# Cookiecutter renders this file with Jinja before running it: the answers arrive as JSON.
ANSWERS = json.loads({{ cookiecutter | jsonify | tojson }})
sys.path.insert(0, os.path.join(ANSWERS["_repo_dir"], "hooks"))

from project_template import finalize  # noqa: E402

finalize(Path.cwd(), ANSWERS)
