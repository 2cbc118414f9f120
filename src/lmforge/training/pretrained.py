"""Hugging Face model directories: read one into an lmforge network, write an lmforge network as one.

A directory holds ``config.json``, the weights in safetensors (``model.safetensors``, or shards
listed in ``model.safetensors.index.json``) and usually ``tokenizer.json``. The name mapping
of each architecture lives beside its model (``models/gpt_hf.py``); this module does the files.
Written directories load with ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` and no custom code.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download  # a dependency of tokenizers
from tokenizers import Tokenizer

from lmforge.data.tokenizer import UNK_TOKEN, eot_id
from lmforge.errors import CheckpointError, ConversionError
from lmforge.models import GPT, gpt_hf
from lmforge.models.hf import HF_CAUSAL_LM_TARGET
from lmforge.training.network import build_network, merged_network

try:  # the [hf] extra
    from safetensors.torch import load_file, save_file
except ImportError:  # pragma: no cover - depends on the installation
    load_file = save_file = None

HF_EXTRA_HINT = "install the Hugging Face extra: pip install 'lmforge[hf]'"
GPT_TARGET = "lmforge.models.GPT"
_HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer*"]


def _require_safetensors() -> None:
    if load_file is None or save_file is None:
        raise ConversionError(f"reading and writing Hugging Face weights needs safetensors; {HF_EXTRA_HINT}")


@dataclass
class PretrainedModel:
    """A Hugging Face model as an lmforge network: model config, weights and tokenizer (if the directory has one)."""

    path: Path
    hf_config: dict[str, Any]
    net_config: dict[str, Any]
    weights: dict[str, torch.Tensor]
    tokenizer_json: str | None

    def build(self, device: torch.device | str = "cpu") -> torch.nn.Module:
        """The network with the pretrained weights, in eval mode."""
        net = GPT(**{k: v for k, v in self.net_config.items() if k != "_target_"})
        net.load_state_dict(self.weights)
        return net.to(device).eval()


def model_directory(source: str | Path) -> Path:
    """A local model directory, or a Hub id (``org/name``) downloaded into the Hugging Face cache."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{source} is a file; pass the model directory that holds config.json")
    try:
        return Path(snapshot_download(str(source), allow_patterns=_HUB_FILES))
    except Exception as exc:  # offline, unknown repo, gated model: all say the same to the user
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{source} is not a local directory and could not be downloaded from the Hugging Face Hub ({reason}); "
            "pass a local model directory (e.g. one saved with save_pretrained)"
        ) from None


def read_hf_config(directory: Path) -> dict[str, Any]:
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{directory} has no config.json; pass a Hugging Face model directory")
    return json.loads(config_file.read_text(encoding="utf-8"))


def read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors`` or of the shards its index lists."""
    _require_safetensors()
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    elif (directory / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        found = ", ".join(sorted(p.name for p in directory.iterdir())) or "nothing"
        raise CheckpointError(
            f"{directory} has no model.safetensors (found: {found}); lmforge reads safetensors only: "
            "load the model with transformers and save it again with save_pretrained()"
        )
    weights: dict[str, torch.Tensor] = {}
    for shard in shards:
        weights.update(load_file(directory / shard))
    return weights


def read_pretrained(source: str | Path, block_size: int | None = None) -> PretrainedModel:
    """A Hugging Face GPT-2 / Llama-family model as an lmforge GPT with a context of ``block_size`` tokens.

    ``block_size`` defaults to the model's longest context; learned positions cannot go beyond it.
    """
    directory = model_directory(source)
    hf_config = read_hf_config(directory)
    net_config = gpt_hf.gpt_config_from_hf(hf_config)
    longest = net_config["block_size"]
    block_size = longest if block_size is None else block_size
    if net_config["pos_embedding"] == "learned" and block_size > longest:
        raise ConversionError(
            f"block_size={block_size} is longer than the {longest} positions {source} has learned; "
            f"set data.block_size <= {longest}"
        )
    net_config = {"_target_": GPT_TARGET, **net_config, "block_size": block_size}
    weights = gpt_hf.gpt_state_dict_from_hf(hf_config, read_hf_weights(directory), block_size)
    tokenizer_file = directory / "tokenizer.json"
    tokenizer_json = tokenizer_file.read_text(encoding="utf-8") if tokenizer_file.is_file() else None
    return PretrainedModel(directory, hf_config, net_config, weights, tokenizer_json)


# ----------------------------------------------------------------------------- export


def _special_tokens(tokenizer: Tokenizer) -> dict[str, str]:
    """The end-of-text token (also the BOS, as in GPT-2) and lmforge's unknown token, named as
    ``tokenizer_config.json`` names them."""
    end_of_text = tokenizer.id_to_token(eot_id(tokenizer))
    tokens = {"bos_token": end_of_text, "eos_token": end_of_text}
    if tokenizer.token_to_id(UNK_TOKEN) is not None:
        tokens["unk_token"] = UNK_TOKEN
    return tokens


def export_hf(
    net_config: Mapping[str, Any], weights: Mapping[str, torch.Tensor], tokenizer_json: str, out: str | Path
) -> Path:
    """Write a network as a Hugging Face model directory ``out``: config, safetensors weights, tokenizer,
    generation config. A GPT is written in the GPT-2 or Llama layout; a wrapped model (``model=hf``)
    by ``save_pretrained`` in its own architecture. The directory appears complete or not at all; an
    existing ``out`` is never touched.
    """
    _require_safetensors()
    net_config, weights = merged_network(net_config, weights)  # LoRA adapters folded into the weights
    target = net_config.get("_target_")
    if target not in (GPT_TARGET, HF_CAUSAL_LM_TARGET):
        raise ConversionError(f"only the GPT and model=hf have a Hugging Face layout; this checkpoint holds {target}")
    out = Path(out)
    if out.exists():
        raise CheckpointError(f"{out} already exists; pass another out=<dir>, or delete it first")
    tokenizer = Tokenizer.from_str(tokenizer_json)
    tokens = _special_tokens(tokenizer)
    special_ids = {"bos": eot_id(tokenizer), "eos": eot_id(tokenizer)}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": net_config["block_size"],
        "clean_up_tokenization_spaces": False,
        **tokens,
    }

    if target == HF_CAUSAL_LM_TARGET:
        write_model = _wrapped_model_writer(net_config, weights)
    else:  # converted before anything is written: an option with no equivalent leaves no trace
        write_model = _gpt_writer(net_config, weights, special_ids)

    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        write_model(partial)
        (partial / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")
        (partial / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    partial.rename(out)
    return out


def _gpt_writer(
    net_config: Mapping[str, Any], weights: Mapping[str, torch.Tensor], special_ids: dict[str, int]
) -> Callable[[Path], None]:
    """The GPT in its Hugging Face layout: converted now, written by the returned function."""
    vocab_size = weights["wte.weight"].shape[0]  # the network's, which may be padded beyond the tokenizer's
    hf_config = gpt_hf.hf_config_from_gpt(net_config, vocab_size, special_ids)
    hf_weights = gpt_hf.hf_state_dict_from_gpt(net_config, {k: v.float().cpu() for k, v in weights.items()})
    generation = {**{f"{name}_token_id": i for name, i in special_ids.items()}, "do_sample": False}

    def write(directory: Path) -> None:
        save_file(hf_weights, directory / "model.safetensors", metadata={"format": "pt"})
        for name, content in (("config.json", hf_config), ("generation_config.json", generation)):
            (directory / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")

    return write


def _wrapped_model_writer(net_config: Mapping[str, Any], weights: Mapping[str, torch.Tensor]) -> Callable[[Path], None]:
    """The wrapped ``transformers`` model (``model=hf``), rebuilt now, written by its own ``save_pretrained``."""
    net = build_network(net_config)
    net.load_state_dict(weights)
    net.hf.generation_config.do_sample = False
    return net.hf.save_pretrained
