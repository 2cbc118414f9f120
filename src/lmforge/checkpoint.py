"""Finding and loading checkpoints safely."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from lmforge.lm_module import LMModule


class CheckpointError(ValueError):
    """A checkpoint path that cannot be used, with a message that says how to fix it."""


def newest_checkpoint(search_dir: str | Path) -> Path:
    """The most recently written checkpoint (``*.ckpt``) below ``search_dir``: the resume point."""
    candidates = sorted(Path(search_dir).rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise CheckpointError(
            f"no checkpoint (*.ckpt) found under {search_dir}; train first, or pass ckpt_path=<file or run dir>"
        )
    return candidates[-1]


def resolve_checkpoint(ckpt_path: str | None, search_dir: str | Path) -> str | None:
    """Turn the user's ``ckpt_path`` into a checkpoint file.

    Accepts a file, a run directory (its newest checkpoint), or ``last``: the newest
    checkpoint below ``search_dir``. ``None`` stays ``None``.
    """
    if ckpt_path is None or str(ckpt_path) == "":
        return None
    if str(ckpt_path) == "last":
        return str(newest_checkpoint(search_dir))
    path = Path(ckpt_path).expanduser()
    if path.is_dir() and not (path / "meta.pt").exists() and not (path / ".metadata").exists():
        # A run directory (not a sharded distributed checkpoint directory).
        return str(newest_checkpoint(path))
    if not path.exists():
        raise CheckpointError(
            f"checkpoint {path} does not exist; pass an existing .ckpt file, a run directory, or ckpt_path=last"
        )
    return str(path)


def load_module(ckpt_path: str | Path, map_location: str = "cpu") -> LMModule:
    """Rebuild the LightningModule (network, weights, tokenizer) from a checkpoint alone.

    Loading uses ``weights_only=True``: a checkpoint cannot run code when it is read.
    """
    path = resolve_checkpoint(str(ckpt_path), Path(ckpt_path).parent)
    module = LMModule.load_from_checkpoint(path, map_location=map_location, weights_only=True)
    module.eval()
    return module


def checkpoint_tokenizer(module: LMModule) -> Tokenizer:
    """The tokenizer that travels inside the checkpoint."""
    if not module.tokenizer_json:
        raise CheckpointError("this checkpoint carries no tokenizer; it was not written by lmforge train")
    return Tokenizer.from_str(module.tokenizer_json)
