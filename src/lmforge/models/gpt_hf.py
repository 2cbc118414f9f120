"""Hugging Face layouts of the GPT: configs and state dicts in both directions.

Kept beside ``gpt.py``, not inside it: the model knows nothing of Hugging Face names. Two
layouts are covered, each by the GPT options that reproduce it exactly:

* ``gpt2`` (``GPT2LMHeadModel``): learned positions, LayerNorm, GELU (``gelu_new`` is the tanh
  approximation), biases everywhere, tied head. Its ``Conv1D`` layers store weights as
  (in, out), the transpose of ``nn.Linear``.
* ``llama`` (``LlamaForCausalLM``) and the architectures with its layout: ``mistral`` and
  ``qwen2`` (biases on the query/key/value projections). RoPE (theta -> ``rope_base``), RMSNorm,
  SwiGLU with the model's intermediate size, grouped-query attention, untied or tied head.
  Their q/k/v, gate and up matrices map one to one onto the GPT's ``c_q``/``c_k``/``c_v``, ``c_gate`` and ``c_fc``.
  A GPT with ``qkv_bias`` exports as Llama with ``attention_bias`` and a zero output-projection
  bias: Qwen2's own layout would be exact too, but ``AutoTokenizer`` replaces the tokenizer of a
  ``qwen2`` directory with Qwen2's own pre-tokenizer, which changes lmforge's token ids.

What the GPT cannot reproduce (a sliding window, RoPE scaling, another activation) is refused
with a :class:`ConversionError` naming the setting, never approximated.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch

from lmforge.errors import ConversionError
from lmforge.models.gpt import DEFAULT_NORM_EPS, GPT, default_mlp_hidden, shorten_context

LLAMA_LIKE = ("llama", "mistral", "qwen2")
MODEL_TYPES = ("gpt2", *LLAMA_LIKE)
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}  # the layouts export writes
GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
_GPT_DEFAULTS = {
    name: p.default for name, p in inspect.signature(GPT).parameters.items() if p.default is not inspect.Parameter.empty
}


def gpt_options(net_config: Mapping[str, Any]) -> dict[str, Any]:
    """Every GPT constructor option: ``net_config`` (a model config, ``_target_`` allowed) over the defaults."""
    options = {**_GPT_DEFAULTS, **{k: v for k, v in net_config.items() if k != "_target_"}}
    options["n_kv_head"] = options["n_kv_head"] or options["n_head"]
    options["qkv_bias"] = options["bias"] if options["qkv_bias"] is None else options["qkv_bias"]
    options["norm_eps"] = options["norm_eps"] or DEFAULT_NORM_EPS[options["norm"]]
    options["mlp_hidden"] = options["mlp_hidden"] or default_mlp_hidden(options["n_embd"], options["mlp"])
    return options


# ----------------------------------------------------------------------------- Hugging Face -> GPT


def _model_type(hf_config: Mapping[str, Any]) -> str:
    model_type = hf_config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConversionError(
            f"model_type {model_type!r} has no lmforge GPT layout (supported: {', '.join(MODEL_TYPES)}); "
            "fine-tune it through the generic wrapper instead (model=hf)"
        )
    return model_type


def _refuse(model_type: str, setting: str, why: str) -> None:
    raise ConversionError(f"{model_type} config sets {setting}, which lmforge's GPT cannot reproduce ({why})")


def gpt_config_from_hf(hf_config: Mapping[str, Any]) -> dict[str, Any]:
    """GPT options (``vocab_size`` and ``block_size`` included: the longest context) of a ``config.json``."""
    model_type = _model_type(hf_config)
    if model_type == "gpt2":
        return _gpt_config_from_gpt2(hf_config)
    return _gpt_config_from_llama(model_type, hf_config)


def _gpt_config_from_gpt2(c: Mapping[str, Any]) -> dict[str, Any]:
    activation = c.get("activation_function", "gelu_new")
    if activation not in GPT2_ACTIVATIONS:
        _refuse("gpt2", f"activation_function={activation!r}", f"supported: {', '.join(GPT2_ACTIVATIONS)}")
    if not c.get("scale_attn_weights", True):
        _refuse("gpt2", "scale_attn_weights=false", "attention scores are always scaled by 1/sqrt(head size)")
    if c.get("scale_attn_by_inverse_layer_idx", False):
        _refuse("gpt2", "scale_attn_by_inverse_layer_idx=true", "no per-layer attention scaling")
    return {
        "vocab_size": c["vocab_size"],
        "block_size": c.get("n_positions", 1024),
        "n_layer": c["n_layer"],
        "n_head": c["n_head"],
        "n_embd": c["n_embd"],
        "bias": True,
        "pos_embedding": "learned",
        "norm": "layernorm",
        "norm_eps": c.get("layer_norm_epsilon", 1e-5),
        "mlp": GPT2_ACTIVATIONS[activation],
        "mlp_hidden": c.get("n_inner") or 4 * c["n_embd"],
        "tie_weights": c.get("tie_word_embeddings", True),
    }


def _rope_theta(model_type: str, c: Mapping[str, Any]) -> float:
    """RoPE theta from ``rope_parameters`` (transformers >= 5) or the older ``rope_theta``/``rope_scaling`` keys."""
    parameters = c.get("rope_parameters") or c.get("rope_scaling") or {}
    rope_type = parameters.get("rope_type", parameters.get("type", "default"))
    if rope_type != "default":
        _refuse(model_type, f"rope_type={rope_type!r}", "RoPE scaling is not implemented; only plain RoPE")
    return float(parameters.get("rope_theta", c.get("rope_theta", 10000.0)))


def _gpt_config_from_llama(model_type: str, c: Mapping[str, Any]) -> dict[str, Any]:
    n_embd, n_head = c["hidden_size"], c["num_attention_heads"]
    if c.get("hidden_act", "silu") != "silu":
        _refuse(model_type, f"hidden_act={c['hidden_act']!r}", "the SwiGLU MLP uses silu")
    if c.get("head_dim") not in (None, n_embd // n_head):
        _refuse(model_type, f"head_dim={c['head_dim']}", "the head size is hidden_size / num_attention_heads")
    if c.get("mlp_bias"):
        _refuse(model_type, "mlp_bias=true", "the SwiGLU MLP has no biases")
    window = c.get("sliding_window") if (model_type != "qwen2" or c.get("use_sliding_window")) else None
    max_positions = c.get("max_position_embeddings", 2048)
    if window is not None and window < max_positions:
        _refuse(model_type, f"sliding_window={window}", "attention always sees the whole context")
    return {
        "vocab_size": c["vocab_size"],
        "block_size": max_positions,
        "n_layer": c["num_hidden_layers"],
        "n_head": n_head,
        "n_kv_head": c.get("num_key_value_heads") or n_head,
        "n_embd": n_embd,
        "bias": False,
        # attention_bias also puts a bias on o_proj, which must then be zero (checked with the weights)
        "qkv_bias": model_type == "qwen2" or bool(c.get("attention_bias")),
        "pos_embedding": "rope",
        "rope_base": _rope_theta(model_type, c),
        "norm": "rmsnorm",
        "norm_eps": c.get("rms_norm_eps", 1e-6),
        "mlp": "swiglu",
        "mlp_hidden": c["intermediate_size"],
        "tie_weights": c.get("tie_word_embeddings", False),
    }


def gpt_state_dict_from_hf(
    hf_config: Mapping[str, Any], hf_state: Mapping[str, torch.Tensor], block_size: int
) -> dict[str, torch.Tensor]:
    """The GPT's state dict from a Hugging Face one; learned positions are cut to ``block_size``."""
    model_type = _model_type(hf_config)
    options = gpt_options(gpt_config_from_hf(hf_config))
    if model_type == "gpt2":
        state = _from_gpt2(hf_state, options["n_layer"])
    else:
        state = _from_llama(hf_state, options["n_layer"], options["qkv_bias"])
    state = shorten_context(state, block_size)
    if options["tie_weights"] or "lm_head.weight" not in state:
        state["lm_head.weight"] = state["wte.weight"]
    return state


def _take(hf_state: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in hf_state:
        raise ConversionError(f"the weights have no {name}; they do not match their config.json")
    return hf_state[name]


def _from_gpt2(hf_state: Mapping[str, torch.Tensor], n_layer: int) -> dict[str, torch.Tensor]:
    # Checkpoints saved from GPT2Model (no head) have no "transformer." prefix.
    prefix = "transformer." if any(k.startswith("transformer.") for k in hf_state) else ""

    def get(name: str) -> torch.Tensor:
        return _take(hf_state, prefix + name)

    state = {"wte.weight": get("wte.weight"), "wpe.weight": get("wpe.weight")}
    for i in range(n_layer):
        hf, ours = f"h.{i}.", f"blocks.{i}."
        for hf_norm, our_norm in (("ln_1", "norm_1"), ("ln_2", "norm_2")):
            state[f"{ours}{our_norm}.weight"] = get(f"{hf}{hf_norm}.weight")
            state[f"{ours}{our_norm}.bias"] = get(f"{hf}{hf_norm}.bias")
        for linear in ("attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            state[f"{ours}{linear}.weight"] = get(f"{hf}{linear}.weight").t()  # Conv1D is (in, out)
            state[f"{ours}{linear}.bias"] = get(f"{hf}{linear}.bias")
        # GPT-2 fuses the query, key and value projections into one c_attn of 3 * n_embd outputs.
        qkv_weights = get(f"{hf}attn.c_attn.weight").t().chunk(3)
        qkv_biases = get(f"{hf}attn.c_attn.bias").chunk(3)
        for part, weight, bias in zip("qkv", qkv_weights, qkv_biases):
            state[f"{ours}attn.c_{part}.weight"] = weight
            state[f"{ours}attn.c_{part}.bias"] = bias
    state["norm_f.weight"] = get("ln_f.weight")
    state["norm_f.bias"] = get("ln_f.bias")
    if "lm_head.weight" in hf_state:
        state["lm_head.weight"] = hf_state["lm_head.weight"]
    return state


def _from_llama(hf_state: Mapping[str, torch.Tensor], n_layer: int, qkv_bias: bool) -> dict[str, torch.Tensor]:
    def get(name: str) -> torch.Tensor:
        return _take(hf_state, "model." + name)

    state = {"wte.weight": get("embed_tokens.weight")}
    for i in range(n_layer):
        hf, ours = f"layers.{i}.", f"blocks.{i}."
        state[f"{ours}norm_1.weight"] = get(f"{hf}input_layernorm.weight")
        state[f"{ours}norm_2.weight"] = get(f"{hf}post_attention_layernorm.weight")
        for part in "qkv":
            state[f"{ours}attn.c_{part}.weight"] = get(f"{hf}self_attn.{part}_proj.weight")
            if qkv_bias:
                state[f"{ours}attn.c_{part}.bias"] = get(f"{hf}self_attn.{part}_proj.bias")
        state[f"{ours}attn.c_proj.weight"] = get(f"{hf}self_attn.o_proj.weight")
        o_bias = hf_state.get(f"model.{hf}self_attn.o_proj.bias")
        if o_bias is not None and o_bias.count_nonzero():
            raise ConversionError(
                "the model has a non-zero o_proj bias (attention_bias=true), which lmforge's GPT cannot reproduce: "
                "its biases sit on the q/k/v projections only"
            )
        state[f"{ours}mlp.c_gate.weight"] = get(f"{hf}mlp.gate_proj.weight")
        state[f"{ours}mlp.c_fc.weight"] = get(f"{hf}mlp.up_proj.weight")
        state[f"{ours}mlp.c_proj.weight"] = get(f"{hf}mlp.down_proj.weight")
    state["norm_f.weight"] = get("norm.weight")
    if "lm_head.weight" in hf_state:
        state["lm_head.weight"] = hf_state["lm_head.weight"]
    return state


# ----------------------------------------------------------------------------- GPT -> Hugging Face


def hf_model_type(net_config: Mapping[str, Any]) -> str:
    """The Hugging Face layout that reproduces this GPT exactly: ``gpt2`` or ``llama``.

    Raises :class:`ConversionError` naming the options that fit neither layout.
    """
    o = gpt_options(net_config)
    gpt2_misfits = [
        f"pos_embedding={o['pos_embedding']!r} (GPT-2: 'learned')" * (o["pos_embedding"] != "learned"),
        f"norm={o['norm']!r} (GPT-2: 'layernorm')" * (o["norm"] != "layernorm"),
        f"mlp={o['mlp']!r} (GPT-2: 'gelu' or 'gelu_tanh')" * (o["mlp"] not in ("gelu", "gelu_tanh")),
        f"n_kv_head={o['n_kv_head']} (GPT-2: n_head)" * (o["n_kv_head"] != o["n_head"]),
        "qk_norm=true (neither layout has it)" * o["qk_norm"],
    ]
    llama_misfits = [
        f"pos_embedding={o['pos_embedding']!r} (Llama: 'rope')" * (o["pos_embedding"] != "rope"),
        f"norm={o['norm']!r} (Llama: 'rmsnorm')" * (o["norm"] != "rmsnorm"),
        f"mlp={o['mlp']!r} (Llama: 'swiglu')" * (o["mlp"] != "swiglu"),
        "bias=true (Llama: qkv_bias only)" * o["bias"],
        "qk_norm=true (neither layout has it)" * o["qk_norm"],
    ]
    gpt2_misfits, llama_misfits = [m for m in gpt2_misfits if m], [m for m in llama_misfits if m]
    if not gpt2_misfits:
        return "gpt2"
    if not llama_misfits:
        return "llama"
    nearest = ("GPT-2", gpt2_misfits) if len(gpt2_misfits) <= len(llama_misfits) else ("Llama", llama_misfits)
    raise ConversionError(
        f"this GPT has no Hugging Face equivalent: nearest layout {nearest[0]}, but {'; '.join(nearest[1])}"
    )


def hf_config_from_gpt(net_config: Mapping[str, Any], vocab_size: int, special_ids: Mapping[str, int]) -> dict:
    """The ``config.json`` of the Hugging Face layout of this GPT; ``special_ids`` gives bos/eos(/pad) token ids."""
    model_type = hf_model_type(net_config)
    o = gpt_options(net_config)
    common = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": vocab_size,
        "tie_word_embeddings": o["tie_weights"],
        "torch_dtype": "float32",
        **{f"{name}_token_id": token_id for name, token_id in special_ids.items()},
    }
    if model_type == "gpt2":
        return {
            **common,
            "n_positions": o["block_size"],
            "n_embd": o["n_embd"],
            "n_layer": o["n_layer"],
            "n_head": o["n_head"],
            "n_inner": o["mlp_hidden"],
            "activation_function": "gelu_new" if o["mlp"] == "gelu_tanh" else "gelu",
            "layer_norm_epsilon": o["norm_eps"],
            "resid_pdrop": o["dropout"],
            "embd_pdrop": o["dropout"],
            "attn_pdrop": o["dropout"],
        }
    return {
        **common,
        "hidden_size": o["n_embd"],
        "intermediate_size": o["mlp_hidden"],
        "num_hidden_layers": o["n_layer"],
        "num_attention_heads": o["n_head"],
        "num_key_value_heads": o["n_kv_head"],
        "head_dim": o["n_embd"] // o["n_head"],
        "hidden_act": "silu",
        "max_position_embeddings": o["block_size"],
        "rms_norm_eps": o["norm_eps"],
        "rope_parameters": {"rope_type": "default", "rope_theta": o["rope_base"]},
        "rope_theta": o["rope_base"],  # the key transformers < 5 reads
        "attention_bias": o["qkv_bias"],
        "attention_dropout": o["dropout"],
    }


def hf_state_dict_from_gpt(net_config: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The Hugging Face state dict of this GPT's layout (tied heads are left out, as ``save_pretrained`` does).

    Biases the GPT does not have are exported to GPT-2 as zeros, which changes nothing.
    """
    model_type = hf_model_type(net_config)
    o = gpt_options(net_config)
    hf = _to_gpt2(state, o) if model_type == "gpt2" else _to_llama(state, o)
    if not o["tie_weights"]:
        hf["lm_head.weight"] = state["lm_head.weight"]
    return {name: tensor.detach().contiguous() for name, tensor in hf.items()}


def _bias_or_zeros(state: Mapping[str, torch.Tensor], name: str, size: int) -> torch.Tensor:
    weight = state[f"{name}.weight"]
    return state.get(f"{name}.bias", torch.zeros(size, dtype=weight.dtype, device=weight.device))


def _to_gpt2(state: Mapping[str, torch.Tensor], o: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    n_embd = o["n_embd"]
    hf = {"transformer.wte.weight": state["wte.weight"], "transformer.wpe.weight": state["wpe.weight"]}
    for i in range(o["n_layer"]):
        ours, name = f"blocks.{i}.", f"transformer.h.{i}."
        for our_norm, hf_norm in (("norm_1", "ln_1"), ("norm_2", "ln_2")):
            hf[f"{name}{hf_norm}.weight"] = state[f"{ours}{our_norm}.weight"]
            hf[f"{name}{hf_norm}.bias"] = _bias_or_zeros(state, f"{ours}{our_norm}", n_embd)
        qkv = [f"{ours}attn.c_{part}" for part in "qkv"]
        hf[f"{name}attn.c_attn.weight"] = torch.cat([state[f"{linear}.weight"] for linear in qkv]).t()
        hf[f"{name}attn.c_attn.bias"] = torch.cat([_bias_or_zeros(state, linear, n_embd) for linear in qkv])
        for linear in ("attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            weight = state[f"{ours}{linear}.weight"]
            hf[f"{name}{linear}.weight"] = weight.t()  # Conv1D is (in, out)
            hf[f"{name}{linear}.bias"] = _bias_or_zeros(state, f"{ours}{linear}", weight.shape[0])
    hf["transformer.ln_f.weight"] = state["norm_f.weight"]
    hf["transformer.ln_f.bias"] = _bias_or_zeros(state, "norm_f", n_embd)
    return hf


def _to_llama(state: Mapping[str, torch.Tensor], o: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    hf = {"model.embed_tokens.weight": state["wte.weight"]}
    for i in range(o["n_layer"]):
        ours, name = f"blocks.{i}.", f"model.layers.{i}."
        hf[f"{name}input_layernorm.weight"] = state[f"{ours}norm_1.weight"]
        hf[f"{name}post_attention_layernorm.weight"] = state[f"{ours}norm_2.weight"]
        for part in "qkv":
            hf[f"{name}self_attn.{part}_proj.weight"] = state[f"{ours}attn.c_{part}.weight"]
        hf[f"{name}self_attn.o_proj.weight"] = state[f"{ours}attn.c_proj.weight"]
        if o["qkv_bias"]:
            for part in "qkv":
                hf[f"{name}self_attn.{part}_proj.bias"] = state[f"{ours}attn.c_{part}.bias"]
            hf[f"{name}self_attn.o_proj.bias"] = _bias_or_zeros(state, f"{ours}attn.c_proj", o["n_embd"])
        hf[f"{name}mlp.gate_proj.weight"] = state[f"{ours}mlp.c_gate.weight"]
        hf[f"{name}mlp.up_proj.weight"] = state[f"{ours}mlp.c_fc.weight"]
        hf[f"{name}mlp.down_proj.weight"] = state[f"{ours}mlp.c_proj.weight"]
    hf["model.norm.weight"] = state["norm_f.weight"]
    return hf
