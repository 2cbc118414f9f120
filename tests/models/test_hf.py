"""The generic wrapper ``model=hf``: any ``AutoModelForCausalLM`` behind lmforge's model interface
computes exactly what transformers computes, in training and in cached generation."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPTNeoXConfig, OPTConfig

from lmforge.models.hf import HFCausalLM, architecture_config
from lmforge.training.parallel import apply_block_options, transformer_blocks

# Two architectures unlike lmforge's own models: GPT-NeoX (parallel residual, rotary on a
# quarter of each head) and OPT (learned positions with an offset, ReLU, pre-LayerNorm).
CONFIGS = {
    "gpt_neox": GPTNeoXConfig(
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=48,
        rotary_pct=0.25,
        bos_token_id=0,
        eos_token_id=0,
    ),
    "opt": OPTConfig(
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=64,
        max_position_embeddings=48,
        word_embed_proj_dim=32,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    ),
}
LAYER_CLASSES = {"gpt_neox": "GPTNeoXLayer", "opt": "OPTDecoderLayer"}


def reference_and_wrapper(model_type: str, block_size: int = 48) -> tuple[torch.nn.Module, HFCausalLM]:
    """A random transformers model and the wrapper holding the same weights, both in eval mode."""
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(CONFIGS[model_type], attn_implementation="eager").eval()
    wrapper = HFCausalLM(architecture_config(reference.config), block_size=block_size, attn_implementation="eager")
    wrapper.hf.load_state_dict(reference.state_dict())
    return reference, wrapper.eval()


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_the_wrapper_computes_transformers_logits_and_greedy_tokens(model_type):
    reference, wrapper = reference_and_wrapper(model_type)
    ids = torch.randint(2, 96, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(wrapper(ids), reference(input_ids=ids).logits, rtol=0, atol=1e-5)
    prompt = ids[:, :5]
    cached = wrapper.generate(prompt, 20, temperature=0)
    assert torch.equal(cached, wrapper.generate(prompt, 20, temperature=0, use_cache=False))
    expected = reference.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20, pad_token_id=1)
    assert torch.equal(cached, expected)


def test_generation_beyond_block_size_restarts_the_cache():
    """Past ``block_size`` tokens the shared generation loop restarts the context; the wrapper's
    DynamicCache is rebuilt with it, so cached and uncached generation still agree."""
    _, wrapper = reference_and_wrapper("gpt_neox", block_size=16)
    prompt = torch.randint(2, 96, (1, 6))
    cached = wrapper.generate(prompt, 30, temperature=0)
    assert cached.shape == (1, 36)
    assert torch.equal(cached, wrapper.generate(prompt, 30, temperature=0, use_cache=False))


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_decoder_layers_are_the_repeated_blocks_and_their_matrices_the_hidden_ones(model_type):
    _, wrapper = reference_and_wrapper(model_type)
    blocks = transformer_blocks(wrapper)
    assert [type(block).__name__ for block in blocks] == [LAYER_CLASSES[model_type]] * 2
    hidden = wrapper.hidden_matrix_names()
    params = dict(wrapper.named_parameters())
    assert hidden and all(params[name].ndim == 2 for name in hidden)
    assert not any("embed" in name for name in hidden)
    block_params = {id(p) for block in blocks for p in block.parameters() if p.ndim == 2}
    assert {id(params[name]) for name in hidden} == block_params


def test_activation_checkpointing_per_decoder_layer_keeps_the_gradients():
    _, plain = reference_and_wrapper("gpt_neox")
    _, checkpointed = reference_and_wrapper("gpt_neox")
    apply_block_options(checkpointed, activation_checkpointing=True)
    ids = torch.randint(2, 96, (2, 24))
    plain.train()(ids).sum().backward()
    checkpointed.train()(ids).sum().backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_settings_the_run_overrides():
    settings = architecture_config(CONFIGS["gpt_neox"])
    assert "transformers_version" not in settings and settings["model_type"] == "gpt_neox"
    wrapper = HFCausalLM(settings, block_size=32, vocab_size=128, dropout=0.1)
    assert wrapper.hf.config.vocab_size == 128 and wrapper.context_limit == 32
    assert wrapper.hf.config.attention_dropout == 0.1 and wrapper.hf.config.hidden_dropout == 0.1
    with torch.device("meta"):  # the config checks build it without memory
        assert HFCausalLM(settings, block_size=48).hf.device.type == "meta"


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"block_size": 49}, "block_size=49 must be between 1 and the 48 positions of this gpt_neox model"),
        ({"block_size": 16, "dropout": 1.0}, r"model.dropout=1.0 must be in \[0, 1\)"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HFCausalLM(architecture_config(CONFIGS["gpt_neox"]), **kwargs)


def test_a_config_without_model_type_is_refused():
    with pytest.raises(ValueError, match="has no model_type"):
        HFCausalLM({"hidden_size": 8}, block_size=8)
