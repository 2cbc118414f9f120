"""``model=hf init_from=<dir>``: any ``AutoModelForCausalLM`` fine-tuned in both loops, with DDP and
with FSDP2 sharding per decoder layer; its checkpoints rebuild without the source directory and
export back to ``transformers``."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from helpers import SHORT_RUN, TESTS_DIR, TINY_RUN, compose_config, run_cli, succeeded
from hydra.utils import instantiate
from tokenizers import Tokenizer  # [gpt]
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,  # [gpt]
    GPTNeoXConfig,
)

from lmforge.cli.export import export  # [gpt]
from lmforge.cli.train import train
from lmforge.data.tokenizer import train_tokenizer
from lmforge.errors import ConfigError, ConversionError
from lmforge.fabric.loop import fit  # [fabric]
from lmforge.training.checkpoint import read_network
from lmforge.training.run import check_run, load_initial_weights, prepare_run


@pytest.fixture(scope="module")
def neox_dir(tmp_path_factory, corpus_dir):
    """A tiny random GPT-NeoX (unlike lmforge's own models: parallel residual, partial rotary) saved by transformers,
    with a BPE tokenizer of the test corpus as its tokenizer.json."""
    texts = [p.read_text(encoding="utf-8") for p in sorted(corpus_dir.iterdir())]
    tokenizer = train_tokenizer("bpe", texts, 300)
    config = GPTNeoXConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        rotary_pct=0.25,
    )
    directory = tmp_path_factory.mktemp("neox")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    (directory / "tokenizer.json").write_text(tokenizer.to_str(), encoding="utf-8")
    return directory


def hf_overrides(corpus_dir, source, *extra: str) -> list[str]:
    return ["data=text_files", f"data.path={corpus_dir}", "model=hf", f"init_from={source}", *TINY_RUN, *extra]


def logits(net: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net.eval()(ids)


def test_a_run_starts_from_the_models_weights_and_tokenizer_and_its_checkpoint_rebuilds_offline(
    neox_dir, corpus_dir, tmp_path
):
    source = shutil.copytree(neox_dir, tmp_path / "source")
    overrides = hf_overrides(corpus_dir, source, *SHORT_RUN, "model.dropout=0.1")
    cfg = compose_config("train", overrides, tmp_path / "check")
    run = prepare_run(cfg, check_run(cfg, "train"), "train")
    assert run.datamodule.tokenizer_json == (source / "tokenizer.json").read_text(encoding="utf-8")
    net = instantiate(run.net_config)
    load_initial_weights(run, net)
    reference = AutoModelForCausalLM.from_pretrained(source).eval()
    ids = torch.randint(0, 300, (2, 32))
    torch.testing.assert_close(logits(net, ids), reference(input_ids=ids).logits, rtol=0, atol=1e-5)
    assert net.hf.config.hidden_dropout == 0.1  # the run's setting, not the model's

    metrics = train(compose_config("train", overrides, tmp_path / "train"))
    assert metrics["val/loss"] < 5.7  # from the random model's ~ln(300) = 5.7
    shutil.rmtree(source)  # the checkpoint holds the architecture: no need for the source any more
    trained = read_network(tmp_path / "train" / "run" / "checkpoints" / "last.ckpt")
    assert trained.checkpoint["global_step"] == 6
    rebuilt = instantiate(trained.net_config)
    rebuilt.load_state_dict(trained.weights)
    assert type(rebuilt).__name__ == "HFCausalLM" and rebuilt.hf.config.model_type == "gpt_neox"
    assert not torch.allclose(logits(rebuilt, ids), reference(input_ids=ids).logits)
    # [gpt]
    exported = export(str(tmp_path / "train" / "run" / "checkpoints" / "last.ckpt"), str(tmp_path / "exported"))
    handed_back = AutoModelForCausalLM.from_pretrained(exported).eval()
    torch.testing.assert_close(handed_back(input_ids=ids).logits, logits(rebuilt, ids), rtol=0, atol=1e-5)
    text = "def add(a, b):\n    return a + b\n"
    expected_ids = Tokenizer.from_str(trained.tokenizer_json).encode(text).ids
    assert AutoTokenizer.from_pretrained(exported)(text)["input_ids"] == expected_ids
    # [/gpt]


# [fabric]
def test_the_fabric_loop_fine_tunes_it_too(neox_dir, corpus_dir, tmp_path):
    overrides = [o for o in hf_overrides(corpus_dir, neox_dir) if not o.startswith("callbacks.")]
    metrics = fit(compose_config("fabric", [*overrides, "trainer.max_steps=4", "test=false"], tmp_path))
    assert metrics["val/loss"] < 5.7
    (checkpoint,) = (tmp_path / "run" / "checkpoints").glob("*.ckpt")
    assert read_network(checkpoint).net_config["_target_"] == "lmforge.models.hf.HFCausalLM"


# [/fabric]


def test_model_hf_without_init_from_is_one_line(corpus_dir, tmp_path):
    cfg = compose_config("train", ["data=text_files", f"data.path={corpus_dir}", "model=hf", *TINY_RUN], tmp_path)
    with pytest.raises(ConfigError, match=r"model=hf wraps a pretrained Hugging Face model: set init_from="):
        check_run(cfg, "train")


# [gpt]
def test_an_architecture_the_gpt_lacks_points_to_the_wrapper(neox_dir, corpus_dir, tmp_path):
    overrides = ["data=text_files", f"data.path={corpus_dir}", "model=gpt", f"init_from={neox_dir}", *TINY_RUN]
    with pytest.raises(ConversionError, match=r"model_type 'gpt_neox' has no lmforge GPT layout .*\(model=hf\)"):
        check_run(compose_config("train", overrides, tmp_path), "train")


# [/gpt]


@pytest.mark.slow
def test_ddp_on_two_processes_and_generation_from_its_checkpoint(neox_dir, corpus_dir, tmp_path):
    overrides = hf_overrides(corpus_dir, neox_dir, "logger=csv", "test=false", "trainer.max_steps=4")
    paths = [f"paths.log_dir={tmp_path}/logs", f"paths.data_dir={tmp_path}/data"]
    assert succeeded(run_cli("train", "trainer=ddp_sim", *overrides, *paths))
    (checkpoint,) = (tmp_path / "logs").glob("train/runs/*/checkpoints/last.ckpt")
    assert read_network(checkpoint).checkpoint["global_step"] == 4
    generated = run_cli("generate", f"ckpt_path={checkpoint}", 'prompt="def add("', "max_new_tokens=8", "temperature=0")
    assert succeeded(generated) and "def add(" in generated.stdout


@pytest.mark.slow
def test_fsdp2_shards_each_decoder_layer_on_two_processes(neox_dir, corpus_dir, tmp_path):
    probe_dir = tmp_path / "probe"
    overrides = hf_overrides(
        corpus_dir,
        neox_dir,
        "logger=csv",
        "test=false",
        "trainer.max_steps=4",
        "+callbacks.shard_probe._target_=shard_probe.ShardProbe",
        f"+callbacks.shard_probe.out_dir={probe_dir}",
    )
    paths = [f"paths.log_dir={tmp_path}/logs", f"paths.data_dir={tmp_path}/data"]
    python_path = os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")]))
    result = run_cli("train", "trainer=fsdp", "trainer.devices=2", *overrides, *paths, env={"PYTHONPATH": python_path})
    assert succeeded(result)
    records = [json.loads((probe_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for record in records:
        assert record["fsdp_units"] == ["", "hf.gpt_neox.layers.0", "hf.gpt_neox.layers.1"]
        assert all(param["placements"] == ["Shard(dim=0)"] for param in record["params"].values())
    (checkpoint,) = (tmp_path / "logs").glob("train/runs/*/checkpoints/last.ckpt")
    assert read_network(checkpoint).checkpoint["global_step"] == 4


def test_chat_rows_are_rendered_with_the_pretrained_models_own_template(neox_dir, tmp_path):
    """A chat model's directory brings its chat template: training renders chat rows with it, the
    checkpoint carries it, and generation prompts with it."""
    model_dir = tmp_path / "chat-model"
    shutil.copytree(neox_dir, model_dir)
    template = (
        "{% for m in messages %}### {{ m.role }}: {{ m.content }}{% if m.role == 'assistant' %}{{ eos_token }}"
        "{% endif %}\n{% endfor %}{% if add_generation_prompt %}### assistant: {% endif %}"
    )
    (model_dir / "chat_template.jinja").write_text(template)
    rows = [
        {"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": f"{i}"}]}
        for i in range(40)
    ]
    chats = tmp_path / "chats.jsonl"
    chats.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    overrides = [
        "data=sft",
        f"data.path={chats}",
        "model=hf",
        f"init_from={model_dir}",
        *TINY_RUN,
        "trainer.max_steps=2",
    ]
    cfg = compose_config("train", [o for o in overrides if not o.startswith("data.eval_windows")], tmp_path)
    run = prepare_run(cfg, check_run(cfg, "train"), "train")
    assert run.metadata["data"]["chat_template"] == template
    ids = run.datamodule.examples("train").ids
    assert run.tokenizer.decode(list(ids[:40])).startswith("### user: say ")
