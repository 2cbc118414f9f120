"""Tests of the language models, the shared generation loop and token sampling."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.models import (
    GPT,  # [gpt]
    LanguageModel,
    LSTMLanguageModel,  # [lstm]
)
from lmforge.models.sampling import sample_next_token

VOCAB = 29


# [gpt]
def tiny_gpt(**overrides) -> GPT:
    kwargs = dict(vocab_size=VOCAB, block_size=16, n_layer=2, n_head=2, n_embd=16)
    kwargs.update(overrides)
    torch.manual_seed(0)
    return GPT(**kwargs)


# [/gpt]


# [lstm]
def tiny_lstm(**overrides) -> LSTMLanguageModel:
    kwargs = dict(vocab_size=VOCAB, n_embd=16, hidden_size=24, n_layer=2, dropout=0.0)
    kwargs.update(overrides)
    torch.manual_seed(0)
    return LSTMLanguageModel(**kwargs)


# [/lstm]


# One factory per model, for the tests of the shared interface.
MODEL_FACTORIES = [
    tiny_gpt,  # [gpt]
    tiny_lstm,  # [lstm]
]


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy_reference(model: LanguageModel, idx: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding by hand, re-running the full (short) context each step."""
    for _ in range(steps):
        next_token = model(idx)[:, -1].argmax(dim=-1, keepdim=True)
        idx = torch.cat((idx, next_token), dim=1)
    return idx


# [gpt]
GPT_VARIANTS = list(
    itertools.product(
        ("learned", "rope"), ("layernorm", "rmsnorm"), ("gelu", "swiglu", "relu2"), (False, True), (False, True)
    )
)


@pytest.mark.parametrize("pos_embedding,norm,mlp,qk_norm,tie_weights", GPT_VARIANTS)
def test_gpt_variants_forward_shape_and_incremental_match(pos_embedding, norm, mlp, qk_norm, tie_weights):
    bias = norm == "layernorm"  # exercise biases too, once per variant
    model = tiny_gpt(
        pos_embedding=pos_embedding, norm=norm, mlp=mlp, qk_norm=qk_norm, tie_weights=tie_weights, bias=bias
    ).eval()
    idx = tokens(3, 11)
    logits = model(idx)
    assert logits.shape == (3, 11, VOCAB)
    assert logits.dtype == torch.float32

    # Prefill a chunk, then single tokens, then another chunk (the causal-offset mask path).
    state = model.init_state(3, "cpu")
    pieces = []
    for lo, hi in ((0, 5), (5, 6), (6, 7), (7, 11)):
        step_logits, state = model.forward_step(idx[:, lo:hi], state)
        pieces.append(step_logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), logits, atol=1e-5, rtol=1e-5)


def test_weight_tying_shares_the_tensor():
    # [gpt]
    tied, untied = tiny_gpt(tie_weights=True), tiny_gpt(tie_weights=False)
    assert tied.lm_head.weight is tied.wte.weight
    assert untied.lm_head.weight is not untied.wte.weight
    assert tied.num_params() == untied.num_params() - VOCAB * 16
    # [/gpt]
    # [lstm]
    lstm = tiny_lstm(hidden_size=16, tie_weights=True)
    assert lstm.head.weight is lstm.embedding.weight
    names = [name for name, _ in lstm.named_parameters()]
    assert "embedding.weight" in names and "head.weight" not in names
    # [/lstm]


@pytest.mark.parametrize("pos_embedding", ["learned", "rope"])
def test_gpt_is_causal(pos_embedding):
    model = tiny_gpt(pos_embedding=pos_embedding).eval()
    idx = tokens(2, 12)
    changed = idx.clone()
    changed[:, 8] = (changed[:, 8] + 1) % VOCAB
    before, after = model(idx), model(changed)
    torch.testing.assert_close(before[:, :8], after[:, :8])
    assert not torch.allclose(before[:, 8:], after[:, 8:])


@pytest.mark.parametrize("pos_embedding", ["learned", "rope"])
def test_gpt_kv_cache_generate_matches_no_cache(pos_embedding):
    model = tiny_gpt(pos_embedding=pos_embedding, block_size=24).double()
    prompt = tokens(2, 5)
    cached = model.generate(prompt, max_new_tokens=19, temperature=0.0, use_cache=True)
    uncached = model.generate(prompt, max_new_tokens=19, temperature=0.0, use_cache=False)
    assert cached.shape == (2, 24)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, greedy_reference(model.eval(), prompt, 19))


@pytest.mark.parametrize("pos_embedding", ["learned", "rope"])
def test_gpt_generate_beyond_block_size(pos_embedding):
    model = tiny_gpt(pos_embedding=pos_embedding, block_size=8).double()
    prompt = tokens(2, 11)  # longer than block_size already
    cached = model.generate(prompt, max_new_tokens=20, temperature=0.0, use_cache=True)
    uncached = model.generate(prompt, max_new_tokens=20, temperature=0.0, use_cache=False)
    assert cached.shape == (2, 31)
    assert torch.equal(cached[:, :11], prompt)
    # Both paths crop the context the same way, so they agree even past block_size.
    assert torch.equal(cached, uncached)
    sampled = model.generate(prompt, max_new_tokens=20, generator=torch.Generator().manual_seed(0))
    assert sampled.shape == (2, 31)


def test_gpt_block_size_one_generates():
    model = tiny_gpt(block_size=1)
    out = model.generate(tokens(1, 3), max_new_tokens=4, temperature=0.0)
    assert out.shape == (1, 7)


def test_gpt_sequence_longer_than_block_size_raises():
    model = tiny_gpt(block_size=8)
    with pytest.raises(ValueError, match="sequence length T=9 exceeds block_size=8"):
        model(tokens(1, 9))
    state = model.init_state(1, "cpu")
    model.forward_step(tokens(1, 6), state)
    with pytest.raises(ValueError, match="KV cache holds 6 tokens"):
        model.forward_step(tokens(1, 3), state)


# [/gpt]


# [lstm]
def test_lstm_forward_step_matches_forward():
    model = tiny_lstm().eval()
    idx = tokens(3, 10)
    logits = model(idx)
    assert logits.shape == (3, 10, VOCAB)
    state = model.init_state(3, "cpu")
    first, state = model.forward_step(idx[:, :4], state)
    second, state = model.forward_step(idx[:, 4:5], state)
    third, state = model.forward_step(idx[:, 5:], state)
    assert state[0].shape == state[1].shape == (2, 3, 24)
    torch.testing.assert_close(torch.cat((first, second, third), dim=1), logits)


def test_lstm_generate_cache_matches_no_cache_and_ignores_block_size():
    model = tiny_lstm(block_size=4).double()
    prompt = tokens(2, 3)
    cached = model.generate(prompt, max_new_tokens=12, temperature=0.0)
    uncached = model.generate(prompt, max_new_tokens=12, temperature=0.0, use_cache=False)
    assert cached.shape == (2, 15)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, greedy_reference(model.eval(), prompt, 12))


# [/lstm]


@pytest.mark.parametrize("make_model", MODEL_FACTORIES)
def test_seeded_sampling_is_reproducible(make_model):
    model = make_model()
    prompt = tokens(4, 3)

    def sample(seed: int) -> torch.Tensor:
        return model.generate(prompt, max_new_tokens=10, temperature=1.0, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(sample(123), sample(123))
    assert not torch.equal(sample(123), sample(456))


@pytest.mark.parametrize("make_model", MODEL_FACTORIES)
def test_filters_that_keep_one_token_equal_greedy(make_model):
    model = make_model()
    prompt = tokens(3, 4)
    greedy = model.generate(prompt, max_new_tokens=8, temperature=0.0)
    assert torch.equal(greedy, greedy_reference(model.eval(), prompt, 8))
    rng = torch.Generator().manual_seed(0)
    assert torch.equal(model.generate(prompt, 8, temperature=1.5, top_k=1, generator=rng), greedy)
    assert torch.equal(model.generate(prompt, 8, temperature=1.5, top_p=1e-6, generator=rng), greedy)


def test_sample_next_token_filters():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log().expand(2000, -1)
    rng = torch.Generator().manual_seed(0)
    # Nucleus: {0, 1} is the smallest set reaching 0.6; {0} alone reaches 0.5.
    assert set(sample_next_token(logits, top_p=0.6, generator=rng).unique().tolist()) == {0, 1}
    assert set(sample_next_token(logits, top_p=0.5, generator=rng).unique().tolist()) == {0}
    assert set(sample_next_token(logits, top_k=3, generator=rng).unique().tolist()) == {0, 1, 2}
    assert set(sample_next_token(logits, generator=rng).unique().tolist()) == {0, 1, 2, 3}
    assert sample_next_token(logits[:3], temperature=0.0).tolist() == [[0], [0], [0]]
    sampled = sample_next_token(logits, top_k=2, top_p=0.9, generator=rng)
    assert sampled.shape == (2000, 1) and sampled.dtype == torch.long
    assert set(sampled.unique().tolist()) == {0, 1}


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(temperature=-0.5), "temperature must be >= 0"),
        (dict(top_k=0), "top_k must be >= 1"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(max_new_tokens=-1), "max_new_tokens must be >= 0"),
    ],
)
def test_invalid_generation_args_raise(kwargs, message):
    model = MODEL_FACTORIES[0]()
    args = dict(max_new_tokens=2) | kwargs
    with pytest.raises(ValueError, match=message):
        model.generate(tokens(1, 3), **args)
    if "max_new_tokens" not in kwargs:
        with pytest.raises(ValueError, match=message):
            sample_next_token(torch.zeros(1, VOCAB), **kwargs)


def test_generate_rejects_empty_prompt():
    with pytest.raises(ValueError, match="time >= 1"):
        MODEL_FACTORIES[0]().generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2)


# [gpt]
@pytest.mark.parametrize(
    "kwargs,message",
    [
        (
            dict(n_embd=30, n_head=4),
            r"n_embd \(30\) must be divisible by n_head \(4\); pick e.g. n_embd=32 or n_head=3",
        ),
        (dict(vocab_size=0), "vocab_size must be >= 1"),
        (dict(block_size=0), "block_size must be >= 1"),
        (dict(n_layer=0), "n_layer must be >= 1"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
        (dict(pos_embedding="alibi"), "pos_embedding must be one of 'learned', 'rope'"),
        (dict(norm="batchnorm"), "norm must be one of"),
        (dict(mlp="moe"), "mlp must be one of 'gelu', 'gelu_tanh', 'swiglu', 'relu2'"),
        (dict(n_embd=6, n_head=2, pos_embedding="rope"), "needs an even head size"),
    ],
)
def test_gpt_invalid_config_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_gpt(**kwargs)


# [/gpt]


# [lstm]
@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(tie_weights=True), "tie_weights=True needs hidden_size == n_embd"),
        (dict(n_layer=0), "n_layer must be >= 1"),
        (dict(dropout=-0.1), r"dropout must be in \[0, 1\)"),
        (dict(block_size=0), "block_size must be >= 1 or None"),
    ],
)
def test_lstm_invalid_config_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_lstm(**kwargs)


# [/lstm]


def test_num_params_and_flops_per_token():
    # [gpt]
    model = tiny_gpt(n_layer=3, n_embd=32, n_head=4, block_size=16)
    total = sum(p.numel() for p in model.parameters())
    assert model.num_params(non_embedding=False) == total
    assert model.num_params() == total - 16 * 32  # minus the learned position table
    n = model.num_params()
    assert model.flops_per_token() == 6 * n + 12 * 3 * 32 * 16
    assert model.flops_per_token(seq_len=8) == 6 * n + 12 * 3 * 32 * 8

    rope = tiny_gpt(pos_embedding="rope")
    assert rope.num_params() == rope.num_params(non_embedding=False)
    # [/gpt]
    # [lstm]
    lstm = tiny_lstm()
    assert lstm.num_params() == sum(p.numel() for p in lstm.parameters())
    assert lstm.flops_per_token() == 6 * lstm.num_params()
    # [/lstm]


# [gpt]
def test_swiglu_mlp_has_about_the_gelu_parameter_count():
    gelu = tiny_gpt(n_embd=96, n_head=2, mlp="gelu")
    swiglu = tiny_gpt(n_embd=96, n_head=2, mlp="swiglu")
    gelu_mlp = sum(p.numel() for p in gelu.blocks[0].mlp.parameters())
    swiglu_mlp = sum(p.numel() for p in swiglu.blocks[0].mlp.parameters())
    assert math.isclose(swiglu_mlp, gelu_mlp, rel_tol=0.05)


# [/gpt]


def test_no_weight_decay_param_names():
    # [gpt]
    learned = tiny_gpt(pos_embedding="learned")
    assert learned.no_weight_decay_param_names() == {"wpe.weight"}
    assert "wpe.weight" in dict(learned.named_parameters())
    assert tiny_gpt(pos_embedding="rope").no_weight_decay_param_names() == set()
    # [/gpt]
    assert tiny_lstm().no_weight_decay_param_names() == set()  # [lstm]


# [gpt]
def test_gpt_initialisation():
    model = tiny_gpt(n_layer=8, n_embd=64, n_head=4, bias=True)
    assert model.blocks[0].attn.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.1)
    assert model.blocks[0].attn.c_q.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.count_nonzero(model.blocks[0].mlp.c_fc.bias) == 0
    zero = tiny_gpt(zero_init_proj=True)
    for block in zero.blocks:
        assert torch.count_nonzero(block.attn.c_proj.weight) == 0
        assert torch.count_nonzero(block.mlp.c_proj.weight) == 0


# [/gpt]


@pytest.mark.parametrize("make_model", MODEL_FACTORIES)
@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_restores_training_mode(make_model, use_cache):
    model = make_model(dropout=0.1)
    model.train()
    model.generate(tokens(1, 2), max_new_tokens=3, use_cache=use_cache)
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    model.generate(tokens(1, 2), max_new_tokens=3, use_cache=use_cache)
    assert not model.training


@pytest.mark.parametrize(
    "make_model,lr",
    [
        # [gpt]
        pytest.param(lambda: tiny_gpt(n_embd=32, n_head=4), 1e-2, id="gpt"),
        pytest.param(
            lambda: tiny_gpt(n_embd=32, n_head=4, pos_embedding="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True),
            1e-2,
            id="gpt-modern",
        ),
        # [/gpt]
        pytest.param(lambda: tiny_lstm(n_embd=32, hidden_size=64, n_layer=1), 2e-2, id="lstm"),  # [lstm]
    ],
)
def test_overfits_a_repeated_sequence(make_model, lr):
    model = make_model()
    seq = tokens(1, 17, seed=7).expand(4, -1)
    x, y = seq[:, :-1], seq[:, 1:]
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(100):
        loss = F.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1
