"""LoRA adapters (``lora=default``): only the adapters train, plain weights load into an adapted
network, and merging gives the same logits; in both loops, with each model that has linear layers."""

from __future__ import annotations

import pytest
import torch
from helpers import DEFAULT_MODEL, SHORT_RUN, compose_config, run_cli, succeeded, tiny_train_overrides
from transformers import (
    AutoModelForCausalLM,  # [gpt]
    GPTNeoXConfig,
)

from lmforge.cli.export import export  # [gpt]
from lmforge.cli.train import train
from lmforge.errors import ConfigError
from lmforge.fabric.loop import fit  # [fabric]
from lmforge.models.hf import architecture_config
from lmforge.training.checkpoint import read_network
from lmforge.training.network import build_network, merged_network
from lmforge.training.optim import adamw
from lmforge.training.run import check_run

LORA = {"_target_": "lmforge.training.lora.LoRA", "r": 4, "alpha": 8.0}
NEOX = GPTNeoXConfig(
    vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, rotary_pct=0.25
)
NETWORKS = {
    # [gpt]
    "gpt": {
        "_target_": "lmforge.models.GPT",
        "vocab_size": 64,
        "block_size": 16,
        "n_layer": 2,
        "n_head": 2,
        "n_embd": 32,
    },
    # [/gpt]
    "hf": {"_target_": "lmforge.models.hf.HFCausalLM", "hf_config": architecture_config(NEOX), "block_size": 16},
}


def without_lora(net_config: dict) -> dict:
    return {key: value for key, value in net_config.items() if key != "lora"}


@pytest.mark.parametrize("kind", list(NETWORKS))
def test_adapters_alone_train_and_merge_into_the_same_logits(kind):
    torch.manual_seed(0)
    base = build_network(NETWORKS[kind]).eval()
    net_config = {**NETWORKS[kind], "lora": LORA}
    net = build_network(net_config)
    net.load_state_dict(base.state_dict())  # plain weights load into the adapted network
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(ids), base(ids), rtol=0, atol=0)  # B starts at zero

    trainable = [name for name, p in net.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    optimizer = adamw(net, lr=1e-2)
    assert sum(len(group["params"]) for group in optimizer.param_groups) == len(trainable)
    frozen_before = {name: p.detach().clone() for name, p in net.named_parameters() if not p.requires_grad}
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(net.train()(ids).flatten(0, 1), ids.roll(-1, 1).flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, p in net.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen_before[name]), name
    assert len(optimizer.state) == len(trainable)  # optimizer state for the adapters only

    with torch.no_grad():
        adapted = net.eval()(ids)
    assert not torch.allclose(adapted, base(ids))
    merged_config, merged_weights = merged_network(net_config, net.state_dict())
    assert merged_config == NETWORKS[kind] and merged_weights.keys() == base.state_dict().keys()
    plain = build_network(merged_config)
    plain.load_state_dict(merged_weights)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(ids), adapted, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"r": 0}, r"lora.r=0 must be an integer >= 1"),
        ({"alpha": 0.0}, r"lora.alpha=0.0 must be > 0"),
        ({"target_modules": ["no_such_layer"]}, r"lora.target_modules: "),
    ],
)
def test_bad_lora_settings_are_one_line(settings, message, corpus_dir, tmp_path):
    overrides = [*tiny_train_overrides(corpus_dir), "lora=default", *[f"lora.{k}={v}" for k, v in settings.items()]]
    with pytest.raises(ConfigError, match=message):
        check_run(compose_config("train", overrides, tmp_path), "train")


# [gpt]
def test_a_trainer_run_with_adapters_keeps_the_base_weights_and_its_checkpoint_rebuilds(prepared, tmp_path, corpus_dir):
    source = read_network(prepared.checkpoint)
    overrides = [
        *tiny_train_overrides(corpus_dir, DEFAULT_MODEL, *SHORT_RUN),
        f"init_from={prepared.checkpoint}",
        "lora=default",
        "optimizer.lr=1e-2",
    ]
    train(compose_config("train", overrides, tmp_path / "run"))
    trained = read_network(tmp_path / "run" / "run" / "checkpoints" / "last.ckpt")
    assert trained.net_config["lora"]["r"] == 8
    adapters = {name for name in trained.weights if ".lora_" in name}
    assert adapters and any(trained.weights[name].abs().sum() > 0 for name in adapters if "lora_B" in name)
    for name, tensor in source.weights.items():  # frozen: the base weights are the source's
        adapted_name = name if name in trained.weights else name.replace(".weight", ".base_layer.weight")
        adapted_name = adapted_name if adapted_name in trained.weights else name.replace(".bias", ".base_layer.bias")
        torch.testing.assert_close(trained.weights[adapted_name], tensor, rtol=0, atol=0, msg=name)
    net = trained.build()
    ids = torch.randint(0, trained.net_config["vocab_size"], (2, 16))
    with torch.no_grad():
        adapted = net(ids)
    # export merges the adapters: transformers computes the adapted logits
    exported = export(str(tmp_path / "run" / "run" / "checkpoints" / "last.ckpt"), str(tmp_path / "hf"))
    hf_model = AutoModelForCausalLM.from_pretrained(exported).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf_model(input_ids=ids).logits, adapted, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_fsdp2_with_adapters_consolidates_to_the_merged_model(prepared, tmp_path, corpus_dir):
    overrides = [
        *tiny_train_overrides(corpus_dir, DEFAULT_MODEL, "logger=csv", "test=false", "trainer.max_steps=4"),
        f"init_from={prepared.checkpoint}",
        "lora=default",
        "optimizer.lr=1e-2",
        f"paths.log_dir={tmp_path}/logs",
        f"paths.data_dir={tmp_path}/data",
    ]
    result = run_cli("train", "trainer=fsdp", "trainer.devices=2", *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    (sharded,) = (tmp_path / "logs").glob("train/runs/*/checkpoints/last.ckpt")
    assert succeeded(run_cli("consolidate", f"ckpt_path={sharded}"))
    adapted, merged = read_network(sharded), read_network(sharded.with_suffix(".consolidated.pt"))
    assert "lora" in adapted.net_config and "lora" not in merged.net_config
    assert not any(".lora_" in name or "base_layer" in name for name in merged.weights)
    ids = torch.randint(0, adapted.net_config["vocab_size"], (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(merged.build()(ids), adapted.build()(ids), rtol=0, atol=1e-5)


# [fabric]
def test_the_fabric_loop_trains_the_adapters_alone(prepared, tmp_path, corpus_dir):
    base = [o for o in tiny_train_overrides(corpus_dir, DEFAULT_MODEL) if not o.startswith("callbacks.")]
    overrides = [*base, "trainer.max_steps=2", "test=false", f"init_from={prepared.checkpoint}", "lora=default"]
    fit(compose_config("fabric", overrides, tmp_path))
    (checkpoint,) = (tmp_path / "run" / "checkpoints").glob("*.ckpt")
    saved = torch.load(checkpoint, weights_only=True)
    adapters = [name for name in saved["model"] if ".lora_" in name]
    assert adapters and len(saved["optimizer"]["state"]) == len(adapters)


# [/fabric]
# [/gpt]
