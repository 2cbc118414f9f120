"""Cookiecutter's check of the answers: stop before anything is generated if one is unusable."""

import json
import os
import sys

# Cookiecutter renders this file with Jinja before running it: the answers arrive as JSON.
ANSWERS = json.loads({{ cookiecutter | jsonify | tojson }})
sys.path.insert(0, os.path.join(ANSWERS["_repo_dir"], "hooks"))

from project_template import validate  # noqa: E402

errors = validate(ANSWERS)
for error in errors:
    print(f"error: {error}", file=sys.stderr)
sys.exit(1 if errors else 0)
