"""Hugging Face GPT-2 and Llama-family models <-> lmforge's GPT: equal logits and greedy tokens both ways.

Every model here is a tiny random one made with ``save_pretrained`` in a temp dir: no network.
"""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from lmforge.data.tokenizer import train_tokenizer
from lmforge.errors import CheckpointError, ConversionError
from lmforge.models import GPT
from lmforge.models.gpt_hf import gpt_config_from_hf, hf_model_type
from lmforge.training.pretrained import export_hf, read_pretrained

VOCAB = 97
TOLERANCE = 1e-4  # fp32, max abs difference of logits


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (HF initialises biases to 0 and norms to 1, which would hide a mapping error)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model.eval()


def tiny_gpt2(**overrides) -> GPT2LMHeadModel:
    config = GPT2Config(vocab_size=VOCAB, n_positions=48, n_embd=32, n_layer=2, n_head=4, **overrides)
    return randomized(GPT2LMHeadModel(config))


def tiny_llama(**overrides) -> LlamaForCausalLM:
    settings = {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 56,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,  # grouped-query attention
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5000.0},
        "tie_word_embeddings": False,
        **overrides,
    }
    return randomized(LlamaForCausalLM(LlamaConfig(**settings)))


def tiny_qwen2() -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return randomized(Qwen2ForCausalLM(config))


HF_MODELS = {"gpt2": tiny_gpt2, "llama-gqa": tiny_llama, "qwen2": tiny_qwen2}


def token_ids(batch: int = 2, length: int = 20, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def hf_greedy(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """transformers' greedy generate, made to run exactly ``new_tokens`` steps (no EOS stop)."""
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    return out[:, ids.size(1) :]


@pytest.mark.parametrize("name", HF_MODELS)
def test_imported_model_gives_the_logits_and_greedy_tokens_of_transformers(name, tmp_path):
    hf_model = HF_MODELS[name]()
    hf_model.save_pretrained(tmp_path / name)
    pretrained = read_pretrained(tmp_path / name)
    net = pretrained.build()
    ids = token_ids()
    with torch.no_grad():
        expected = hf_model(ids).logits
        got = net(ids)
    assert (got - expected).abs().max().item() <= TOLERANCE
    ours = net.generate(ids[:, :5], max_new_tokens=12, temperature=0)[:, 5:]
    assert torch.equal(ours, hf_greedy(hf_model, ids[:, :5], 12))


def test_gpt2_import_keeps_its_layout_and_cuts_positions_to_the_block_size(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path)
    pretrained = read_pretrained(tmp_path, block_size=16)
    assert pretrained.net_config["block_size"] == 16
    assert pretrained.weights["wpe.weight"].shape == (16, 32)
    options = {k: pretrained.net_config[k] for k in ("pos_embedding", "norm", "mlp", "bias", "tie_weights")}
    assert options == {
        "pos_embedding": "learned",
        "norm": "layernorm",
        "mlp": "gelu_tanh",
        "bias": True,
        "tie_weights": True,
    }
    with pytest.raises(ConversionError, match=r"block_size=64 is longer than the 48 positions .*data.block_size <= 48"):
        read_pretrained(tmp_path, block_size=64)


def test_llama_import_reads_rope_theta_gqa_and_the_untied_head(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    config = read_pretrained(tmp_path, block_size=128).net_config  # RoPE: any context
    assert (config["n_head"], config["n_kv_head"], config["rope_base"], config["norm_eps"]) == (4, 2, 5000.0, 1e-5)
    assert (config["mlp"], config["mlp_hidden"], config["tie_weights"], config["block_size"]) == (
        "swiglu",
        56,
        False,
        128,
    )


def test_older_config_keys_rope_theta_and_sharded_weights_are_read(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    config = json.loads((tmp_path / "config.json").read_text())
    del config["rope_parameters"]
    config["rope_theta"] = 5000.0  # as transformers < 5 writes it
    (tmp_path / "config.json").write_text(json.dumps(config))
    net = read_pretrained(tmp_path).build()
    ids = token_ids()
    with torch.no_grad():
        assert (net(ids) - model(ids).logits).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "rope_type='llama3'"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"mlp_bias": True}, "mlp_bias=true"),
        ({"model_type": "mistral", "sliding_window": 16}, "sliding_window=16"),
        ({"model_type": "falcon"}, "model_type 'falcon' has no lmforge GPT layout"),
    ],
)
def test_what_the_gpt_cannot_reproduce_is_refused_with_one_line(change, named):
    config = {**tiny_llama().config.to_dict(), **change}
    with pytest.raises(ConversionError, match=named) as refused:
        gpt_config_from_hf(config)
    assert "\n" not in str(refused.value)


def test_llama_attention_bias_imports_only_with_a_zero_output_bias(tmp_path):
    model = tiny_llama(attention_bias=True)
    model.save_pretrained(tmp_path)
    with pytest.raises(ConversionError, match="non-zero o_proj bias"):
        read_pretrained(tmp_path)


def test_a_directory_without_safetensors_or_config_is_refused_with_the_fix(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_gpt2().config.to_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no model.safetensors .*save_pretrained"):
        read_pretrained(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        read_pretrained(tmp_path / "empty")


def test_an_unknown_hub_id_offline_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match="not a local directory and could not be downloaded") as refused:
        read_pretrained("nobody-here/no-such-model")
    assert "\n" not in str(refused.value)


# ----------------------------------------------------------------------------- export

EXPORTED = {
    # GPT-2 layout without biases: exported with zero biases
    "gpt2": {"pos_embedding": "learned", "norm": "layernorm", "mlp": "gelu", "bias": False},
    "gpt2-tanh-untied": {"mlp": "gelu_tanh", "bias": True, "tie_weights": False, "mlp_hidden": 40},
    "llama": {
        "pos_embedding": "rope",
        "rope_base": 500.0,
        "norm": "rmsnorm",
        "mlp": "swiglu",
        "n_kv_head": 1,
        "tie_weights": False,
    },
    # exported as Llama with attention_bias and a zero o_proj bias
    "llama-qkv-bias": {"pos_embedding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "qkv_bias": True, "n_kv_head": 2},
}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_tokenizer("bpe", ["def add(a, b):\n    return a + b\n" * 20, "print('hello world')\n" * 20], 300)


@pytest.mark.parametrize("name", EXPORTED)
def test_exported_model_loads_in_transformers_with_the_same_logits_and_greedy_tokens(name, tmp_path, tokenizer):
    net_config = {"_target_": "lmforge.models.GPT", "block_size": 32, "n_layer": 2, "n_head": 4, "n_embd": 32}
    net_config.update(EXPORTED[name])
    vocab = tokenizer.get_vocab_size()
    torch.manual_seed(0)
    net = randomized(GPT(vocab_size=vocab, **{k: v for k, v in net_config.items() if k != "_target_"}))
    out = export_hf({**net_config, "vocab_size": vocab}, net.state_dict(), tokenizer.to_str(), tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    hf_model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf_model.config.model_type == hf_model_type(net_config)
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (hf_model(ids).logits - net(ids)).abs().max().item() <= TOLERANCE
    prompt = ids[:, :4]
    assert torch.equal(hf_greedy(hf_model, prompt, 10), net.generate(prompt, max_new_tokens=10, temperature=0)[:, 4:])

    hf_tokenizer = AutoTokenizer.from_pretrained(out)
    text = "def add(x, y):\n    return x + y  # héllo"
    assert hf_tokenizer(text)["input_ids"] == tokenizer.encode(text).ids
    assert hf_tokenizer.eos_token == "<|endoftext|>"

    # and back: the exported directory imports to the same network
    again = read_pretrained(out).build()
    with torch.no_grad():
        assert (again(ids) - net(ids)).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"mlp": "relu2"}, "nearest layout GPT-2, but mlp='relu2'"),
        ({"qk_norm": True}, "qk_norm=true"),
        (
            {"pos_embedding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": True},
            "nearest layout Llama, but bias=true",
        ),
    ],
)
def test_export_names_the_option_hugging_face_has_no_equivalent_for(options, named, tmp_path, tokenizer):
    net_config = {
        "_target_": "lmforge.models.GPT",
        "block_size": 16,
        "n_layer": 1,
        "n_head": 2,
        "n_embd": 16,
        **options,
    }
    net = GPT(vocab_size=tokenizer.get_vocab_size(), **{k: v for k, v in net_config.items() if k != "_target_"})
    with pytest.raises(ConversionError, match=named):
        export_hf(net_config, net.state_dict(), tokenizer.to_str(), tmp_path / "hf")
    assert not list(tmp_path.iterdir())  # nothing written
