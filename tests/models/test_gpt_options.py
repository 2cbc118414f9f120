"""The GPT options that the Hugging Face layouts need, each on its own: n_kv_head (grouped-query
attention), mlp_hidden, norm_eps, mlp=gelu_tanh and qkv_bias."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.models import GPT

VOCAB = 40


def tiny(**options) -> GPT:
    torch.manual_seed(0)
    settings = {"block_size": 16, "n_layer": 2, "n_head": 4, "n_embd": 32, "pos_embedding": "rope", **options}
    return GPT(VOCAB, **settings).eval()


def tokens(batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


def test_grouped_query_attention_equals_attention_with_repeated_key_value_heads():
    gqa = tiny(n_kv_head=2)
    mha = tiny()
    state = gqa.state_dict()
    head_dim, groups = 8, 2  # 4 query heads share 2 key/value heads: query head h reads kv head h // 2
    for i in range(2):
        for part in "kv":
            name = f"blocks.{i}.attn.c_{part}.weight"
            state[name] = state[name].view(2, head_dim, 32).repeat_interleave(groups, dim=0).reshape(32, 32)
    mha.load_state_dict(state)
    torch.testing.assert_close(gqa(tokens()), mha(tokens()))
    attn = gqa.blocks[0].attn
    assert attn.c_q.weight.shape == (32, 32) and attn.c_k.weight.shape == attn.c_v.weight.shape == (16, 32)


@pytest.mark.parametrize("n_kv_head", [1, 2])
def test_grouped_query_attention_caches_fewer_heads_and_generates_as_without_cache(n_kv_head):
    model = tiny(n_kv_head=n_kv_head).double()
    state = model.init_state(2, "cpu")
    assert state.keys[0].shape == (2, n_kv_head, 16, 8)
    idx = tokens()
    pieces = []
    for lo, hi in ((0, 5), (5, 6), (6, 12)):
        logits, state = model.forward_step(idx[:, lo:hi], state)
        pieces.append(logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), model(idx))
    prompt = idx[:, :3]
    cached = model.generate(prompt, max_new_tokens=10, temperature=0, use_cache=True)
    assert torch.equal(cached, model.generate(prompt, max_new_tokens=10, temperature=0, use_cache=False))


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_mlp_hidden_sets_the_intermediate_size(mlp):
    model = tiny(mlp=mlp, mlp_hidden=40)
    assert model.blocks[0].mlp.c_fc.weight.shape == (40, 32)
    assert (model.blocks[0].mlp.c_gate is None) == (mlp != "swiglu")
    if mlp == "swiglu":
        assert model.blocks[0].mlp.c_gate.weight.shape == (40, 32)
    assert model.blocks[0].mlp.c_proj.weight.shape == (32, 40)
    assert tiny(mlp="swiglu").blocks[0].mlp.c_proj.weight.shape == (32, 88)  # default 8/3 * 32 -> 88


@pytest.mark.parametrize(("norm", "default"), [("layernorm", 1e-5), ("rmsnorm", 1e-6)])
def test_norm_eps_reaches_every_norm(norm, default):
    assert {m.eps for m in tiny(norm=norm).modules() if isinstance(m, (torch.nn.LayerNorm, torch.nn.RMSNorm))} == {
        default
    }
    model = tiny(norm=norm, norm_eps=1e-3)
    norms = [m for m in model.modules() if isinstance(m, (torch.nn.LayerNorm, torch.nn.RMSNorm))]
    assert len(norms) == 2 * 2 + 1 and {m.eps for m in norms} == {1e-3}


def test_gelu_tanh_is_the_tanh_approximation():
    exact, tanh = tiny(mlp="gelu"), tiny(mlp="gelu_tanh")
    tanh.load_state_dict(exact.state_dict())
    x = torch.randn(2, 5, 32)
    h = exact.blocks[0].mlp.c_fc(x)
    torch.testing.assert_close(tanh.blocks[0].mlp(x), exact.blocks[0].mlp.c_proj(F.gelu(h, approximate="tanh")))
    assert not torch.allclose(tanh(tokens()), exact(tokens()))


def test_qkv_bias_puts_biases_on_the_query_key_value_projection_only():
    attn = tiny(qkv_bias=True).blocks[0].attn
    assert all(p.bias is not None for p in (attn.c_q, attn.c_k, attn.c_v)) and attn.c_proj.bias is None
    assert tiny(bias=True, qkv_bias=False).blocks[0].attn.c_k.bias is None
    assert tiny(bias=True).blocks[0].attn.c_v.bias is not None  # default: follows bias


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"n_kv_head": 3}, r"n_kv_head \(3\) must divide n_head \(4\); pick one of \[1, 2, 4\]"),
        ({"n_kv_head": 0}, "n_kv_head"),
        ({"mlp_hidden": 0}, "mlp_hidden must be >= 1"),
        ({"norm_eps": 0.0}, "norm_eps must be > 0"),
    ],
)
def test_bad_option_values_are_refused_in_one_line(options, message):
    with pytest.raises(ValueError, match=message):
        tiny(**options)
