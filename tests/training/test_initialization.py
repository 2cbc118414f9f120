"""``init_from``: a run starts from a Hugging Face model or an lmforge checkpoint of either loop, with
the source's architecture, tokenizer and weights, at step 0 with a new optimizer."""

from __future__ import annotations

import pytest
import torch
from helpers import DEFAULT_MODEL, SHORT_RUN, compose_config, tiny_train_overrides
from hydra.utils import instantiate
from transformers import GPT2Config, GPT2LMHeadModel  # [gpt]

from lmforge.cli.prepare import prepare
from lmforge.cli.train import train
from lmforge.data.tokenizer import train_tokenizer  # [gpt]
from lmforge.errors import ConfigError
from lmforge.fabric.loop import fit  # [fabric]
from lmforge.training.checkpoint import read_network
from lmforge.training.run import check_run, load_initial_weights, prepare_run


def network_of_run(cfg, loop: str = "train") -> torch.nn.Module:
    """The network a run of ``cfg`` starts training from."""
    run = prepare_run(cfg, check_run(cfg, loop), loop)
    net = instantiate(run.net_config)
    load_initial_weights(run, net)
    return net.eval()


def assert_same_weights(net: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    for name, tensor in net.state_dict().items():
        torch.testing.assert_close(tensor, weights[name], rtol=0, atol=0, msg=name)


# [gpt]
@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, corpus_dir):
    """A tiny random GPT-2 saved by transformers, with a BPE tokenizer of the test corpus as its tokenizer.json."""
    texts = [p.read_text(encoding="utf-8") for p in sorted(corpus_dir.iterdir())]
    tokenizer = train_tokenizer("bpe", texts, 300)
    config = GPT2Config(vocab_size=tokenizer.get_vocab_size(), n_positions=64, n_embd=32, n_layer=2, n_head=4)
    directory = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(directory)
    (directory / "tokenizer.json").write_text(tokenizer.to_str(), encoding="utf-8")
    return directory


def test_init_from_a_hugging_face_directory_takes_its_architecture_tokenizer_and_weights(
    gpt2_dir, tmp_path, corpus_dir
):
    overrides = [*tiny_train_overrides(corpus_dir, "gpt", *SHORT_RUN), f"init_from={gpt2_dir}", "model.dropout=0.1"]
    cfg = compose_config("train", overrides, tmp_path / "check")
    net = network_of_run(cfg)
    hf_model = GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()
    ids = torch.randint(0, 100, (2, 32))
    with torch.no_grad():
        assert (net(ids) - hf_model(ids).logits).abs().max().item() <= 1e-4
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.mlp, cfg.model.dropout) == (2, 32, "gelu_tanh", 0.1)

    metrics = train(compose_config("train", overrides, tmp_path / "run_a"))
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))
    trained = read_network(tmp_path / "run_a" / "run" / "checkpoints" / "last.ckpt")
    assert trained.checkpoint["global_step"] == 6  # counted from step 0
    assert trained.tokenizer_json == (gpt2_dir / "tokenizer.json").read_text(encoding="utf-8")
    assert trained.net_config["n_layer"] == 2 and trained.net_config["block_size"] == 32


def test_prepare_with_init_from_fills_the_cache_that_the_run_reuses(gpt2_dir, tmp_path, corpus_dir):
    overrides = [*tiny_train_overrides(corpus_dir, "gpt"), f"init_from={gpt2_dir}"]
    cache = prepare(compose_config("prepare", overrides, tmp_path))
    cfg = compose_config("train", overrides, tmp_path)
    run = prepare_run(cfg, check_run(cfg, "train"), "train")
    assert str(run.datamodule.cache_path) == cache
    assert run.datamodule.tokenizer_json == (gpt2_dir / "tokenizer.json").read_text(encoding="utf-8")


def test_a_data_tokenizer_larger_than_the_model_vocabulary_is_one_line(tmp_path, corpus_dir):
    config = GPT2Config(vocab_size=100, n_positions=64, n_embd=16, n_layer=1, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "no-tokenizer")  # no tokenizer.json: the data's is used
    overrides = tiny_train_overrides(corpus_dir, "gpt", "data.tokenizer=bytes", f"init_from={tmp_path}/no-tokenizer")
    cfg = compose_config("train", overrides, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"the data's tokenizer has 257 tokens but init_from=.* embeds only 100"):
        prepare_run(cfg, check_run(cfg, "train"), "train")


def test_learned_positions_are_not_invented_beyond_the_source(prepared, tmp_path, corpus_dir):
    overrides = [*tiny_train_overrides(corpus_dir), "data.block_size=64", f"init_from={prepared.checkpoint}"]
    with pytest.raises(Exception, match="fewer than block_size=64; set data.block_size to at most that"):
        check_run(compose_config("train", overrides, tmp_path), "train")


# [/gpt]


def test_init_from_a_trainer_checkpoint_starts_at_step_zero_with_its_weights(prepared, tmp_path, corpus_dir):
    source = read_network(prepared.checkpoint)
    overrides = [*tiny_train_overrides(corpus_dir, DEFAULT_MODEL, *SHORT_RUN), f"init_from={prepared.checkpoint}"]
    assert_same_weights(network_of_run(compose_config("train", overrides, tmp_path / "check")), source.weights)
    train(compose_config("train", overrides, tmp_path / "run"))
    assert read_network(tmp_path / "run" / "run" / "checkpoints" / "last.ckpt").checkpoint["global_step"] == 6


# [fabric]
def test_the_fabric_loop_starts_from_a_trainer_checkpoint_and_the_trainer_from_a_fabric_one(
    prepared, tmp_path, corpus_dir
):
    base = [o for o in tiny_train_overrides(corpus_dir, DEFAULT_MODEL) if not o.startswith("callbacks.")]
    fabric_overrides = [*base, "trainer.max_steps=2", "trainer.val_check_interval=2", "test=false"]
    fabric_cfg = compose_config("fabric", [*fabric_overrides, f"init_from={prepared.checkpoint}"], tmp_path / "f")
    assert_same_weights(network_of_run(fabric_cfg, "fabric"), read_network(prepared.checkpoint).weights)
    fit(compose_config("fabric", [*fabric_overrides, f"init_from={prepared.checkpoint}"], tmp_path / "fabric"))
    (fabric_checkpoint,) = (tmp_path / "fabric" / "run" / "checkpoints").glob("*.ckpt")
    assert read_network(fabric_checkpoint).checkpoint["step"] == 2

    trainer_overrides = [*tiny_train_overrides(corpus_dir, DEFAULT_MODEL, *SHORT_RUN), f"init_from={fabric_checkpoint}"]
    trainer_cfg = compose_config("train", trainer_overrides, tmp_path / "t")
    assert_same_weights(network_of_run(trainer_cfg), read_network(fabric_checkpoint).weights)


# [/fabric]


def test_a_resumed_run_takes_the_weights_of_its_checkpoint_not_of_init_from(prepared, tmp_path, corpus_dir):
    periodic = prepared.checkpoint.with_name("periodic-step000002.ckpt")
    overrides = [
        *tiny_train_overrides(corpus_dir, DEFAULT_MODEL, *SHORT_RUN),
        f"init_from={prepared.checkpoint}",
        f"ckpt_path={periodic}",
    ]
    cfg = compose_config("train", overrides, tmp_path)
    run = prepare_run(cfg, check_run(cfg, "train"), "train")
    net = instantiate(run.net_config)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    load_initial_weights(run, net)
    assert_same_weights(net, before)  # untouched: the Trainer loads the resume checkpoint itself
