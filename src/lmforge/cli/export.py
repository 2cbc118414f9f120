"""``lmforge export ckpt_path=<checkpoint> out=<dir>``: a trained model as a Hugging Face model directory.

The directory (``config.json``, ``model.safetensors``, the tokenizer files and
``generation_config.json``) loads with ``AutoModelForCausalLM.from_pretrained(out)`` and
``AutoTokenizer.from_pretrained(out)``, no custom code: a GPT in the GPT-2 or Llama layout that
reproduces its options, a wrapped model (``model=hf``) in its own architecture. Checkpoints of
either loop, single files or sharded directories, are accepted.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lmforge.cli.arguments import parse_key_values
from lmforge.errors import reported_errors
from lmforge.training.checkpoint import read_network, resolve_checkpoint
from lmforge.training.config import project_root
from lmforge.training.pretrained import export_hf

USAGE = "usage: lmforge export ckpt_path=<checkpoint | run dir | last> out=<new dir> [paths.log_dir=<dir>]"


def export(ckpt_path: str, out: str, log_dir: str | None = None) -> Path:
    """Write the network of ``ckpt_path`` as a Hugging Face model directory ``out`` (which must not exist)."""
    path = resolve_checkpoint(ckpt_path, log_dir or Path(project_root()) / "logs")
    network = read_network(path)
    return export_hf(network.net_config, network.weights, network.tokenizer_json, out)


def main() -> None:
    if any(arg in ("-h", "--help") for arg in sys.argv[1:]):
        print(USAGE)
        return
    known = {"ckpt_path": "ckpt_path", "out": "out", "paths.log_dir": "log_dir"}
    options = parse_key_values("export", sys.argv[1:], known, USAGE)
    if "out" not in options:
        print(f"lmforge export: out is required\n{USAGE}", file=sys.stderr)
        sys.exit(2)
    with reported_errors():
        target = export(**options)
    print(f"wrote {target} (load it with transformers: AutoModelForCausalLM.from_pretrained({str(target)!r}))")


if __name__ == "__main__":
    main()
