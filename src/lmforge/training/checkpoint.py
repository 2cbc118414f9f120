"""Checkpoints of both loops: one metadata format, one reader, and ``ckpt_path`` resolution.

Both loops write what they need to resume (Lightning's layout for ``lmforge train``, a
``{"model", "optimizer", "scheduler", "step", ...}`` dict for ``lmforge fabric``; a single
file, or a sharded directory under FSDP2) plus the same metadata under ``checkpoint["lmforge"]``
(:func:`checkpoint_metadata`): the network's config, the tokenizer and the data settings.
:func:`read_network` reads the network of any of the four kinds, so ``eval``, ``generate``,
``consolidate`` and resume accept either loop's checkpoints.

Everything is read with ``torch.load(weights_only=True)``: tensors and plain containers only,
so a checkpoint cannot run code unless the user says ``allow_unsafe_checkpoint=true``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec
import torch
from tokenizers import Tokenizer
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from lmforge.data.sources import is_url
from lmforge.errors import CheckpointError
from lmforge.models.base import LanguageModel
from lmforge.training.mirror import local_log_dir
from lmforge.training.network import LORA_KEY, build_network, merged_network

log = logging.getLogger("lmforge")

FORMAT_VERSION = 1
LOOPS = ("train", "fabric")
# Where each loop keeps the network's weights: Lightning's state_dict (the LightningModule holds
# the network as `net`) or the Fabric loop's `model` entry.
_WEIGHTS = {"train": ("state_dict", "net."), "fabric": ("model", "")}
# Sharded directories: the tensors in torch.distributed.checkpoint files, the rest in meta.pt.
_SHARD_METADATA = ".metadata"
_META_FILE = "meta.pt"
# Data settings that do not change the token stream, left out when runs are compared.
_DATA_KEYS_NOT_COMPARED = frozenset({"num_workers", "pin_memory", "eval_batch_size", "cache_dir"})


def checkpoint_metadata(loop: str, net_config: dict, tokenizer_json: str, data_config: dict) -> dict:
    """The ``checkpoint["lmforge"]`` entry that both loops write: what rebuilds the network and its data."""
    return {
        "format": FORMAT_VERSION,
        "loop": loop,
        "model": net_config,
        "tokenizer": tokenizer_json,
        "data": data_config,
    }


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a sharded checkpoint directory (FSDP2: one file per rank plus ``.metadata``)."""
    return Path(path).is_dir() and (Path(path) / _SHARD_METADATA).is_file()


def _torch_load(path: str | Path, allow_unsafe: bool) -> Any:
    """``torch.load`` with ``weights_only``, turning each way it can fail into a one-line error."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        if not allow_unsafe:
            needs = re.search(r"GLOBAL (\S+)", str(exc))
            problem = f"holds pickled Python objects ({needs[1]})" if needs else "is corrupt or holds pickled objects"
            raise CheckpointError(
                f"checkpoint {path} {problem}, and loading those can run arbitrary code; "
                "if you trust the file, rerun with allow_unsafe_checkpoint=true"
            ) from None
        log.warning("loading %s with full unpickling (allow_unsafe_checkpoint=true)", path)
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except (RuntimeError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(
            f"checkpoint {path} is corrupt ({str(exc).splitlines()[0][:120]}); "
            "use another one, e.g. an earlier periodic checkpoint of the run, or ckpt_path=last"
        ) from exc


def read_checkpoint(path: str | Path, allow_unsafe: bool = False) -> dict[str, Any]:
    """A checkpoint file or a sharded directory's ``meta.pt`` (everything but the sharded tensors).

    Tensors are memory-mapped, so reading is cheap. Raises :class:`CheckpointError` for a file that
    is truncated, corrupt, unsafe to unpickle, or not written by lmforge.
    """
    path = Path(path)
    file = path / _META_FILE if is_sharded_checkpoint(path) else path
    if not file.is_file() or (file == path and not zipfile.is_zipfile(file)):
        raise CheckpointError(
            f"checkpoint {path} is truncated, corrupt or not a PyTorch checkpoint; "
            "use another one, e.g. an earlier periodic checkpoint of the run, or ckpt_path=last"
        )
    checkpoint = _torch_load(file, allow_unsafe)
    if not isinstance(checkpoint, dict) or loop_of(checkpoint) is None:
        raise CheckpointError(
            f"{path} is not a checkpoint written by lmforge train or lmforge fabric (it has no lmforge metadata)"
        )
    return checkpoint


def loop_of(checkpoint: dict[str, Any]) -> str | None:
    """Which loop wrote ``checkpoint`` ("train" or "fabric"); None when lmforge did not write it."""
    metadata = checkpoint.get("lmforge")
    if not isinstance(metadata, dict):
        return None
    if metadata.get("loop") in LOOPS:
        return metadata["loop"]
    # Checkpoints from before the metadata format had a version: tell the loops apart by their keys.
    return "train" if "hyper_parameters" in checkpoint else "fabric" if "step" in checkpoint else None


def metadata_of(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's lmforge metadata, with the network config filled in for older Trainer checkpoints."""
    metadata = dict(checkpoint["lmforge"])
    if metadata.get("model") is None:
        metadata["model"] = (checkpoint.get("hyper_parameters") or {}).get("model")
    return metadata


@dataclass
class NetworkCheckpoint:
    """What any lmforge checkpoint holds for using the network: its config, weights, tokenizer and data."""

    path: Path
    loop: str
    net_config: dict
    weights: dict[str, torch.Tensor]
    tokenizer_json: str
    data_config: dict | None
    checkpoint: dict[str, Any]  # everything else the file holds (meta.pt for a sharded directory)

    @property
    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_str(self.tokenizer_json)

    def build(self, device: torch.device | str = "cpu") -> LanguageModel:
        """The network with its weights, in eval mode, on ``device``."""
        net = build_network(self.net_config)
        net.load_state_dict(self.weights)
        return net.to(device).eval()


def read_network(path: str | Path, allow_unsafe: bool = False) -> NetworkCheckpoint:
    """The network of a checkpoint of either loop, a single file or a sharded directory.

    A sharded directory is gathered in memory in one process (no process group needed); the
    optimizer state is not read.
    """
    path = Path(path)
    checkpoint = read_checkpoint(path, allow_unsafe)
    loop = loop_of(checkpoint)
    key, prefix = _WEIGHTS[loop]
    if is_sharded_checkpoint(path):
        loaded: dict[str, Any] = {}
        planner = _EmptyStateDictLoadPlanner(keys={key})
        _load_state_dict(loaded, storage_reader=FileSystemReader(path), planner=planner, no_dist=True)
        weights = loaded[key]
    else:
        weights = checkpoint.get(key)
    if not isinstance(weights, dict):
        raise CheckpointError(f"checkpoint {path} holds no network weights ({key!r} is missing)")
    metadata = metadata_of(checkpoint)
    if not metadata.get("tokenizer") or not metadata.get("model"):
        raise CheckpointError(f"checkpoint {path} lacks the tokenizer or the network config; it cannot be used alone")
    return NetworkCheckpoint(
        path=path,
        loop=loop,
        net_config=metadata["model"],
        weights={name.removeprefix(prefix): value for name, value in weights.items() if name.startswith(prefix)},
        tokenizer_json=metadata["tokenizer"],
        data_config=metadata.get("data"),
        checkpoint=checkpoint,
    )


def single_file_checkpoint(network: NetworkCheckpoint, merge_adapters: bool = False) -> dict[str, Any]:
    """A sharded checkpoint's weights and metadata as one checkpoint dict of the same loop (no optimizer
    state); with ``merge_adapters``, LoRA adapters folded into the weights (a plain model)."""
    net_config, weights = network.net_config, network.weights
    checkpoint = dict(network.checkpoint)
    if merge_adapters and LORA_KEY in net_config:
        net_config, weights = merged_network(net_config, weights)
        checkpoint["lmforge"] = {**checkpoint["lmforge"], "model": net_config}
        if "hyper_parameters" in checkpoint:  # a Trainer checkpoint rebuilds its module from these
            checkpoint["hyper_parameters"] = {**checkpoint["hyper_parameters"], "model": net_config}
    key, prefix = _WEIGHTS[network.loop]
    return {**checkpoint, key: {prefix + name: value for name, value in weights.items()}}


# ----------------------------------------------------------------------------- comparing runs


def model_differences(saved: dict, configured: dict) -> list[str]:
    """``model.<key>`` settings that differ between a checkpoint's network and a config (vocab_size aside:
    the data decides it)."""
    return [
        f"model.{key}={saved.get(key)!r} in the checkpoint but {configured.get(key)!r} in the config"
        for key in sorted(saved.keys() | configured.keys())
        if key != "vocab_size" and saved.get(key) != configured.get(key)
    ]


def data_differences(saved: dict | None, configured: dict | None) -> list[str]:
    """``data.<key>`` settings that change the token stream and differ (nested keys flattened)."""
    saved_flat, configured_flat = _flatten(saved or {}), _flatten(configured or {})
    return [
        f"data.{key}={saved_flat.get(key)!r} in the checkpoint but {configured_flat.get(key)!r} in the config"
        for key in sorted(saved_flat.keys() | configured_flat.keys())
        if key.split(".")[0] not in _DATA_KEYS_NOT_COMPARED and saved_flat.get(key) != configured_flat.get(key)
    ]


def _flatten(node: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in node.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_model_matches(checkpoint: dict[str, Any], model_cfg: dict, path: str | Path) -> None:
    """Raise :class:`CheckpointError` naming the fields where the checkpoint's network differs from ``model_cfg``."""
    differences = model_differences(metadata_of(checkpoint).get("model") or {}, model_cfg)
    if differences:
        raise CheckpointError(
            f"checkpoint {path} is a different model: {'; '.join(differences)}; "
            "resume with the model settings it was trained with, or start a new run without ckpt_path"
        )


def check_tokenizer_matches(checkpoint: dict[str, Any], tokenizer_json: str, path: str | Path) -> None:
    """Raise :class:`CheckpointError` when the data's tokenizer is not the one the checkpoint was trained with."""
    saved = metadata_of(checkpoint).get("tokenizer")
    if saved is None or saved == tokenizer_json:
        return
    saved_size = Tokenizer.from_str(saved).get_vocab_size()
    data_size = Tokenizer.from_str(tokenizer_json).get_vocab_size()
    raise CheckpointError(
        f"checkpoint {path} was trained with another vocabulary ({saved_size} tokens) than the data's "
        f"tokenizer ({data_size} tokens); resume with the data settings it was trained with "
        "(data, data.tokenizer, data.vocab_size), or start a new run without ckpt_path"
    )


# ----------------------------------------------------------------------------- finding checkpoints


def _candidates(search_dir: Path) -> list[Path]:
    """Checkpoint files and sharded directories below ``search_dir``, newest first."""
    found = [p for p in search_dir.rglob("*.ckpt") if p.is_file() or is_sharded_checkpoint(p)]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def newest_checkpoint(search_dir: str | Path) -> Path:
    """The most recently written checkpoint (``*.ckpt``) below ``search_dir``."""
    candidates = _candidates(Path(search_dir))
    if not candidates:
        raise CheckpointError(
            f"no checkpoint (*.ckpt) found under {search_dir}; train first, or pass ckpt_path=<file or run dir>"
        )
    return candidates[0]


def newest_matching_checkpoint(
    search_dir: str | Path, model_cfg: dict, data_cfg: dict | None, allow_unsafe: bool = False
) -> Path:
    """The newest checkpoint below ``search_dir`` (one task's runs) of the same network and data.

    Raises :class:`CheckpointError` when there is none, naming the newest candidate and how it
    differs: ``ckpt_path=last`` never resumes another experiment.
    """
    newest: tuple[Path, list[str]] | None = None
    for path in _candidates(Path(search_dir)):
        try:
            metadata = metadata_of(read_checkpoint(path, allow_unsafe))
        except CheckpointError:
            continue  # a torn or foreign file is no resume point
        differences = model_differences(metadata.get("model") or {}, model_cfg)
        differences += data_differences(metadata.get("data"), data_cfg)
        if not differences:
            return path
        newest = newest or (path, differences)
    if newest is None:
        raise CheckpointError(
            f"no checkpoint (*.ckpt) found under {search_dir}; train first, or pass ckpt_path=<file or run dir>"
        )
    path, differences = newest
    raise CheckpointError(
        f"ckpt_path=last found no checkpoint of this run's model and data under {search_dir}; the newest, {path}, "
        f"differs: {'; '.join(differences[:3])}; pass ckpt_path=<file> to use it anyway, or start without ckpt_path"
    )


def fetch_checkpoint(url: str) -> Path:
    """A local copy of the checkpoint file or sharded directory at an fsspec URL (``s3://``, ``gs://``,
    ``file://``...), downloaded once into ``$XDG_CACHE_HOME/lmforge/checkpoints`` (default
    ``~/.cache``) and keyed by the URL, size and modification marker: checkpoints are read with
    memory maps and by Lightning's and Fabric's loaders, which need local files."""
    fs, remote = fsspec.core.url_to_fs(url)
    if not fs.exists(remote):
        raise CheckpointError(f"checkpoint {url} does not exist; check the URL (and the store's credentials)")
    info = fs.info(remote)
    marker = next((info[k] for k in ("mtime", "LastModified", "updated", "ETag", "created") if k in info), "")
    key = hashlib.sha256(f"{url}\0{info.get('size')}\0{marker}".encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmforge" / "checkpoints" / key
    local = cache / PurePosixPath(remote.rstrip("/")).name
    if not local.exists():
        cache.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=".download-", dir=cache)) / local.name
        try:
            fs.get(remote.rstrip("/"), str(partial), recursive=fs.isdir(remote))
            os.replace(partial, local)  # whole or not at all: a broken download is fetched again
        finally:
            shutil.rmtree(partial.parent, ignore_errors=True)
    return local


def resolve_checkpoint(ckpt_path: str | None, search_dir: str | Path) -> str | None:
    """Turn the user's ``ckpt_path`` (a file, a sharded directory, a run directory, or an fsspec URL of a
    checkpoint: :func:`fetch_checkpoint`) into a local checkpoint path.

    A run directory means its newest checkpoint; ``None`` or ``""`` stays ``None``. ``last`` is
    resolved by the caller with :func:`newest_matching_checkpoint` (it needs the run's settings).
    """
    if ckpt_path is None or str(ckpt_path) == "":
        return None
    if str(ckpt_path) == "last":  # under a URL log directory: its local staging copy (lmforge.training.mirror)
        return str(newest_checkpoint(local_log_dir(str(search_dir))))
    path = fetch_checkpoint(str(ckpt_path)) if is_url(str(ckpt_path)) else Path(ckpt_path).expanduser()
    if path.is_dir() and not is_sharded_checkpoint(path) and not (path / _META_FILE).exists():
        return str(newest_checkpoint(path))  # a run directory
    if not path.exists():
        raise CheckpointError(
            f"checkpoint {path} does not exist; pass an existing .ckpt file, a run directory, or ckpt_path=last"
        )
    return str(path)
