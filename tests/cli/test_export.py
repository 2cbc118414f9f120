"""`lmforge export`: checkpoints of both loops become Hugging Face directories that `transformers`
loads with the same logits, and `lmforge generate temperature=0` picks the tokens of its greedy `generate`."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_one_clear_error, compose_config, run_cli, tiny_train_overrides
from transformers import AutoModelForCausalLM, AutoTokenizer

import lmforge.training.pretrained as pretrained
from lmforge.cli.export import export
from lmforge.errors import ConversionError
from lmforge.fabric.loop import fit  # [fabric]
from lmforge.training.checkpoint import read_network

TOLERANCE = 1e-4


def logits_agree(checkpoint, exported) -> torch.Tensor:
    """Assert that the checkpoint's network and transformers' load of ``exported`` agree; returns the ids used."""
    net = read_network(checkpoint).build()
    hf_model = AutoModelForCausalLM.from_pretrained(exported).eval()
    ids = torch.randint(0, net.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf_model(ids).logits - net(ids)).abs().max().item() <= TOLERANCE
    return hf_model


def test_trainer_checkpoint_exports_and_generates_the_tokens_of_transformers(prepared, tmp_path):
    out = tmp_path / "hf"
    result = run_cli("export", f"ckpt_path={prepared.checkpoint}", f"out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wrote {out}" in result.stdout
    hf_model = logits_agree(prepared.checkpoint, out)
    assert hf_model.config.model_type == "gpt2"

    prompt = "def add("
    generated = run_cli(
        "generate", f"ckpt_path={prepared.checkpoint}", f"prompt={prompt!r}", "max_new_tokens=20", "temperature=0"
    )
    assert generated.returncode == 0, generated.stderr[-3000:]
    hf_tokenizer = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([hf_tokenizer(prompt)["input_ids"]])
    new = hf_model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0
    )
    assert generated.stdout.rstrip("\n").endswith(prompt + hf_tokenizer.decode(new[0, ids.size(1) :]))

    again = run_cli("export", f"ckpt_path={prepared.checkpoint}", f"out={out}")
    assert_one_clear_error(again.returncode, again.stderr, f"{out} already exists")


# [fabric]
def test_fabric_checkpoint_of_a_llama_shaped_gpt_exports_in_the_llama_layout(tmp_path, corpus_dir):
    llama = ["model.pos_embedding=rope", "model.norm=rmsnorm", "model.mlp=swiglu", "model.n_head=4"]
    overrides = [o for o in tiny_train_overrides(corpus_dir, "gpt", *llama) if not o.startswith("callbacks.")]
    overrides += ["model.n_kv_head=2", "trainer.max_steps=4", "trainer.val_check_interval=4", "test=false"]
    fit(compose_config("fabric", overrides, tmp_path))
    (checkpoint,) = (tmp_path / "run" / "checkpoints").glob("*.ckpt")
    out = export(str(checkpoint), str(tmp_path / "hf"))
    hf_model = logits_agree(checkpoint, out)
    assert (hf_model.config.model_type, hf_model.config.num_key_value_heads) == ("llama", 2)


# [/fabric]


def test_without_the_hf_extra_the_command_names_it(monkeypatch, prepared, tmp_path):
    monkeypatch.setattr(pretrained, "save_file", None)
    with pytest.raises(ConversionError, match=r"pip install 'lmforge\[hf\]'"):
        export(str(prepared.checkpoint), str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()


def test_only_the_gpt_and_wrapped_models_export(tmp_path):
    with pytest.raises(ConversionError, match="only the GPT and model=hf have a Hugging Face layout; .*RecurrentLM"):
        pretrained.export_hf({"_target_": "my_models.RecurrentLM"}, {}, "{}", tmp_path / "hf")
