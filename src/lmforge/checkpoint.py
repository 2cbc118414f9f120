"""Finding and loading checkpoints safely."""

from __future__ import annotations

import io
import logging
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from lmforge.lm_module import LMModule

log = logging.getLogger("lmforge")


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


def read_checkpoint(path: str | Path, allow_unsafe: bool = False) -> dict[str, Any]:
    """Read a checkpoint file written by ``lmforge train``, with a clear error when it cannot be used.

    Reading uses ``weights_only=True``: tensors and plain containers only, so the file cannot run
    code. A file that needs full unpickling is refused unless ``allow_unsafe`` (the user's explicit
    ``allow_unsafe_checkpoint=true``). Tensors are memory-mapped, so reading is cheap.
    """
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"checkpoint {path} is truncated, corrupt or not a PyTorch checkpoint; "
            "use another one, e.g. an earlier periodic-*.ckpt of the run, or ckpt_path=last"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        if not allow_unsafe:
            needs = re.search(r"GLOBAL (\S+)", str(exc))
            problem = f"holds pickled Python objects ({needs[1]})" if needs else "is corrupt or holds pickled objects"
            raise CheckpointError(
                f"checkpoint {path} {problem}, and loading those can run arbitrary code; "
                "if you trust the file, rerun with allow_unsafe_checkpoint=true"
            ) from None
        log.warning("loading %s with full unpickling (allow_unsafe_checkpoint=true)", path)
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except (RuntimeError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(
            f"checkpoint {path} is corrupt ({str(exc).splitlines()[0][:120]}); "
            "use another one, e.g. an earlier periodic-*.ckpt of the run, or ckpt_path=last"
        ) from exc
    if not isinstance(checkpoint, dict) or not {"state_dict", "hyper_parameters"} <= checkpoint.keys():
        raise CheckpointError(f"{path} is not a checkpoint written by lmforge train (no state_dict/hyper_parameters)")
    return checkpoint


def check_model_matches(checkpoint: dict[str, Any], model_cfg: dict, path: str | Path) -> None:
    """Raise :class:`CheckpointError` naming the fields where the checkpoint's network differs from ``model_cfg``.

    ``vocab_size`` is left out: it comes from the data (see :func:`check_tokenizer_matches`).
    """
    saved = checkpoint["hyper_parameters"].get("model") or {}
    differences = [
        f"model.{key}={saved.get(key)!r} in the checkpoint but {model_cfg.get(key)!r} in the config"
        for key in sorted(saved.keys() | model_cfg.keys())
        if key != "vocab_size" and saved.get(key) != model_cfg.get(key)
    ]
    if differences:
        raise CheckpointError(
            f"checkpoint {path} is a different model: {'; '.join(differences)}; "
            "resume with the model settings it was trained with, or start a new run without ckpt_path"
        )


def check_tokenizer_matches(checkpoint: dict[str, Any], tokenizer_json: str, path: str | Path) -> None:
    """Raise :class:`CheckpointError` when the data's tokenizer is not the one the checkpoint was trained with."""
    saved = (checkpoint.get("lmforge") or {}).get("tokenizer")
    if saved is None or saved == tokenizer_json:
        return
    saved_size = Tokenizer.from_str(saved).get_vocab_size()
    data_size = Tokenizer.from_str(tokenizer_json).get_vocab_size()
    raise CheckpointError(
        f"checkpoint {path} was trained with another vocabulary ({saved_size} tokens) than the data's "
        f"tokenizer ({data_size} tokens); resume with the data settings it was trained with "
        "(data, data.tokenizer, data.vocab_size), or start a new run without ckpt_path"
    )


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a sharded checkpoint directory (``trainer=fsdp``: one file per rank plus ``.metadata``)."""
    return Path(path).is_dir() and (Path(path) / ".metadata").is_file()


def read_sharded_checkpoint(path: str | Path) -> dict[str, Any]:
    """A sharded checkpoint directory as one checkpoint dict: the full weights and the run's metadata.

    The optimizer state is left out (resume a sharded run from the directory itself). Runs in
    one process without a process group; everything is read with ``weights_only`` loading.
    """
    # What torch's dcp_to_torch_save does, restricted to the weights.
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    weights: dict[str, Any] = {}
    planner = _EmptyStateDictLoadPlanner(keys={"state_dict"})
    _load_state_dict(weights, storage_reader=FileSystemReader(path), planner=planner, no_dist=True)
    # meta.pt holds the rest of what Lightning saves: hyper-parameters, step, lmforge extras.
    metadata = torch.load(Path(path) / "meta.pt", map_location="cpu", weights_only=True)
    return {**metadata, "state_dict": weights["state_dict"]}


def load_module(ckpt_path: str | Path, map_location: str = "cpu", allow_unsafe: bool = False) -> LMModule:
    """Rebuild the LightningModule (network, weights, tokenizer) from a checkpoint alone.

    The file is checked with :func:`read_checkpoint` first (``weights_only`` loading, so it
    cannot run code unless ``allow_unsafe``). A sharded directory is gathered in memory.
    """
    path = resolve_checkpoint(str(ckpt_path), Path(ckpt_path).parent)
    source: str | io.BytesIO = path
    if is_sharded_checkpoint(path):
        log.info("gathering sharded checkpoint %s in memory (one file: lmforge consolidate ckpt_path=%s)", path, path)
        source = io.BytesIO()
        torch.save(read_sharded_checkpoint(path), source)
        source.seek(0)
    elif Path(path).is_file():
        read_checkpoint(path, allow_unsafe)
    module = LMModule.load_from_checkpoint(source, map_location=map_location, weights_only=not allow_unsafe)
    module.eval()
    return module


def checkpoint_tokenizer(module: LMModule) -> Tokenizer:
    """The tokenizer that travels inside the checkpoint."""
    if not module.tokenizer_json:
        raise CheckpointError("this checkpoint carries no tokenizer; it was not written by lmforge train")
    return Tokenizer.from_str(module.tokenizer_json)
