"""Optimizers and the learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.models import (
    GPT,  # [gpt]
    LSTMLanguageModel,  # [lstm]
)
from lmforge.training.muon import Muon, orthogonalize
from lmforge.training.optim import adamw, muon, warmup_cosine


# [gpt]
def tiny_gpt(**kwargs) -> GPT:
    return GPT(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32, **kwargs)


# [/gpt]


# [lstm]
def tiny_lstm() -> LSTMLanguageModel:
    return LSTMLanguageModel(vocab_size=20, n_embd=8, hidden_size=8, n_layer=1)


# [/lstm]


# One factory per model; the tests that hold for any model use the first.
MODEL_FACTORIES = [
    tiny_gpt,  # [gpt]
    tiny_lstm,  # [lstm]
]


# [gpt]
def test_adamw_decays_matrices_only():
    net = tiny_gpt(bias=True)
    groups = {g["name"]: g for g in adamw(net, weight_decay=0.1).param_groups}
    decayed = {id(p) for p in groups["decay"]["params"]}
    names = {id(p): n for n, p in net.named_parameters()}
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in groups["decay"]["params"])
    assert all(p.ndim < 2 or names[id(p)] == "wpe.weight" for p in groups["no_decay"]["params"])
    assert id(net.wpe.weight) not in decayed and id(net.wte.weight) in decayed
    assert len(decayed) + len(groups["no_decay"]["params"]) == len(list(net.parameters()))


# [/gpt]


def test_schedule_warms_up_then_decays_to_min_lr():
    net = MODEL_FACTORIES[0]()
    optimizer = adamw(net, lr=1e-3)
    scheduler = warmup_cosine(optimizer, max_steps=100, warmup_steps=10, min_lr=1e-4)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] < lrs[5] < lrs[9] <= 1e-3
    assert lrs[10] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[55] == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert lrs[-1] == pytest.approx(1e-4, rel=0.01)


def test_constant_schedule_stays_flat_after_warmup():
    optimizer = adamw(MODEL_FACTORIES[0](), lr=1e-3)
    scheduler = warmup_cosine(optimizer, max_steps=50, warmup_steps=5, decay="constant")
    for _ in range(30):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"max_steps": 10, "warmup_steps": 20}, "warmup_steps=20 is larger than trainer.max_steps=10"),
        ({"max_steps": 0}, "trainer.max_steps=0 must be > 0"),
        ({"max_steps": 10, "min_lr": 1.0}, "scheduler.min_lr=1.0"),
        ({"max_steps": 10, "decay": "linear"}, "scheduler.decay='linear'"),
    ],
)
def test_schedule_rejects_bad_settings(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        warmup_cosine(adamw(MODEL_FACTORIES[0]()), **kwargs)


def test_adamw_rejects_non_positive_lr():
    with pytest.raises(ValueError, match="optimizer.lr=0.0 must be > 0"):
        adamw(MODEL_FACTORIES[0](), lr=0.0)


def test_orthogonalize_gives_near_unit_singular_values():
    torch.manual_seed(0)
    matrices = torch.randn(3, 24, 40)
    singular = torch.linalg.svdvals(orthogonalize(matrices))
    assert singular.min() > 0.5 and singular.max() < 1.3
    tall = torch.linalg.svdvals(orthogonalize(torch.randn(2, 40, 24)))
    assert tall.min() > 0.5 and tall.max() < 1.3


# [gpt]
def test_muon_splits_hidden_matrices_from_the_rest():
    net = tiny_gpt()
    optimizer = muon(net)
    groups = {g["name"]: g for g in optimizer.param_groups}
    names = {id(p): n for n, p in net.named_parameters()}
    assert {names[id(p)] for p in groups["muon"]["params"]} == net.hidden_matrix_names()
    assert all(names[id(p)].startswith("blocks.") and p.ndim == 2 for p in groups["muon"]["params"])
    others = {names[id(p)] for g in optimizer.param_groups if g["name"] != "muon" for p in g["params"]}
    assert "wte.weight" in others and "wpe.weight" in others
    assert groups["muon"]["lr"] == 0.02 and optimizer.defaults["lr"] == 1e-3


def test_muon_trains_and_its_state_loads_weights_only(tmp_path):
    torch.manual_seed(0)
    net = tiny_gpt()
    optimizer = muon(net, adamw_lr=3e-3)
    data = torch.randint(0, 50, (4, 17))
    losses = []
    for _ in range(60):
        logits = net(data[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), data[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    torch.save(optimizer.state_dict(), tmp_path / "opt.pt")
    restored = Muon(muon(tiny_gpt()).param_groups)
    restored.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))


# [/gpt]


# [lstm]
def test_muon_refuses_models_without_hidden_matrices():
    with pytest.raises(ValueError, match="use optimizer=adamw"):
        muon(tiny_lstm())


# [/lstm]
