"""Task data for fine-tuning: formats, bad rows, the loss mask, EOS, truncation and the batch order."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from helpers import write_task_data

from lmforge.data import SFTDataModule
from lmforge.data.sft import TaskTrainBatches
from lmforge.data.tasks import DEFAULT_CHAT_TEMPLATE, ChatTemplate
from lmforge.errors import DataError
from lmforge.training.loss import batch_loss


def write_jsonl(path, rows) -> str:
    path.write_text("\n".join(row if isinstance(row, str) else json.dumps(row) for row in rows) + "\n")
    return str(path)


def data_module(tmp_path, path, **settings) -> SFTDataModule:
    settings = {"tokenizer": "bytes", "block_size": 64, "batch_size": 2, "val_size": 1, **settings}
    module = SFTDataModule(path, cache_dir=str(tmp_path / "cache"), **settings)
    module.prepare_data()
    return module


def answers_of(module: SFTDataModule, split: str = "train") -> list[str]:
    """The text of every trained target of each example in ``split``."""
    examples = module.examples(split)
    texts = []
    for i in range(len(examples)):
        _, targets = examples.batch(np.array([i]))
        texts.append(module.tokenizer.decode(targets[targets != -100].tolist(), skip_special_tokens=False))
    return texts


def test_prompt_completion_rows_train_on_the_answer_and_its_end_of_sequence_token(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "Q: 2+2?\nA: ", "completion": "4"}] * 3)
    module = data_module(tmp_path, path)
    examples = module.examples("train")
    inputs, targets = examples.batch(np.array([0]))
    prompt_len = len("Q: 2+2?\nA: ")
    assert module.tokenizer.decode(inputs[0].tolist()) == "Q: 2+2?\nA: 4"
    assert (targets[0, : prompt_len - 1] == -100).all()  # no target inside the prompt carries loss
    eos = module.tokenizer.token_to_id("<|endoftext|>")
    assert targets[0, prompt_len - 1 :].tolist() == [module.tokenizer.token_to_id("4"), eos]  # answer, then EOS
    assert answers_of(module) == ["4<|endoftext|>"] * 2


def test_whole_sequence_setting_trains_on_the_prompt_too(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "Q: 2+2?\nA: ", "completion": "4"}] * 3)
    module = data_module(tmp_path, path, mask_prompt=False)
    assert answers_of(module) == ["Q: 2+2?\nA: 4<|endoftext|>"[1:]] * 2


def test_chat_rows_train_on_every_assistant_turn(tmp_path):
    conversation = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Ciao"},
        ]
    }
    module = data_module(tmp_path, write_jsonl(tmp_path / "chat.jsonl", [conversation] * 3), block_size=128)
    assert answers_of(module) == ["Hello<|endoftext|>Ciao<|endoftext|>"] * 2
    inputs, _ = module.examples("train").batch(np.array([0]))
    rendered = module.tokenizer.decode(inputs[0].tolist(), skip_special_tokens=False)
    assert (
        rendered
        == "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello<|endoftext|><|user|>\nBye\n<|assistant|>\nCiao"
    )
    # generation renders the same prefix for the same turns
    template = ChatTemplate(DEFAULT_CHAT_TEMPLATE, "<|endoftext|>")
    assert rendered.startswith(template.render(conversation["messages"][:4], add_generation_prompt=True))


def test_a_chat_template_from_a_tokenizer_config_is_used(tmp_path):
    config = tmp_path / "tokenizer_config.json"
    template = (
        "{% for m in messages %}[{{ m.role }}] {{ m.content }}{% if m.role == 'assistant' %}{{ eos_token }}"
        "{% endif %}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    config.write_text(json.dumps({"chat_template": template}))
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    module = data_module(tmp_path, write_jsonl(tmp_path / "chat.jsonl", [row] * 3), chat_template=str(config))
    assert answers_of(module) == ["Yo<|endoftext|>"] * 2  # Jinja's trim_blocks drops the newline after endif
    inputs, _ = module.examples("train").batch(np.array([0]))
    assert module.tokenizer.decode(inputs[0].tolist(), skip_special_tokens=False).startswith("[user] Hi[assistant] Yo")


def test_tab_separated_pairs_become_prompts_by_the_template(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("Hi.\tSalut.\tCC-BY 2.0 (France) Attribution: tatoeba.org\nRun!\tCours !\n" * 2)
    module = data_module(tmp_path, str(path), prompt_template="English: {source}\nFrench: ")
    inputs, _ = module.examples("train").batch(np.array([0]))
    assert module.tokenizer.decode(inputs[0].tolist()).startswith("English: ")
    assert sorted(answers_of(module)) == ["Cours !<|endoftext|>", "Salut.<|endoftext|>", "Salut.<|endoftext|>"]


def test_bad_rows_are_skipped_and_counted_with_their_first_line(tmp_path, caplog):
    good = {"prompt": "p", "completion": "c"}
    rows = [good, '{"prompt": "p"', {"prompt": "p"}, {"prompt": "p", "completion": "  "}, good, {"messages": "x"}, good]
    with caplog.at_level(logging.WARNING, logger="lmforge.data"):
        data_module(tmp_path, write_jsonl(tmp_path / "rows.jsonl", rows))
    warnings = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "skipped 1 of 7 rows: invalid JSON (first at" in warnings and "rows.jsonl:2)" in warnings
    assert 'missing "prompt" or "completion" string' in warnings and "rows.jsonl:3)" in warnings
    assert "empty completion (first at" in warnings and "rows.jsonl:4)" in warnings
    assert "rows.jsonl:6)" in warnings


def test_a_file_without_a_usable_row_is_one_clear_error(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match="no usable example in .*bad.jsonl \\(1 rows read\\)"):
        data_module(tmp_path, path)
    with pytest.raises(DataError, match="names no file"):
        data_module(tmp_path, str(tmp_path / "missing.jsonl"))


def test_long_examples_are_truncated_and_counted_and_prompt_only_ones_dropped(tmp_path, caplog):
    rows = [{"prompt": "short ", "completion": "answer"}] * 4
    rows += [{"prompt": "p" * 10, "completion": "a" * 40}, {"prompt": "p" * 40, "completion": "a"}]
    with caplog.at_level(logging.WARNING, logger="lmforge.data"):
        module = data_module(tmp_path, write_jsonl(tmp_path / "long.jsonl", rows), block_size=20, val_size=1, seed=3)
        examples = [module.examples("train"), module.examples("val")]
    assert sum(e.truncated for e in examples) == 2
    assert sum(e.dropped for e in examples) == 1  # its answer starts after token 21
    assert max(int(e.lengths.max()) for e in examples) == 20
    assert "truncated" in caplog.text


def test_loss_ignores_prompt_tokens_unless_the_whole_sequence_is_trained(tmp_path):
    """A model that predicts each token from the previous one alone: changing a prompt token that does
    not condition the answer leaves the masked loss unchanged, and changes the whole-sequence loss."""
    torch.manual_seed(0)
    bigram = torch.nn.Sequential(torch.nn.Embedding(257, 257))
    losses = {}
    for mask_prompt in (True, False):
        for first in ("Q", "Z"):
            path = write_jsonl(tmp_path / f"{first}.jsonl", [{"prompt": f"{first}uestion: ", "completion": "42"}] * 3)
            module = data_module(tmp_path, path, mask_prompt=mask_prompt)
            losses[mask_prompt, first] = batch_loss(bigram, module.examples("train").batch(np.array([0])))[0].item()
    assert losses[True, "Q"] == losses[True, "Z"]
    assert losses[False, "Q"] != losses[False, "Z"]


def test_batches_follow_the_global_order_and_weight_the_step_by_its_tokens(tmp_path):
    """1 process x 2 accumulation steps sees what 2 processes x 1 see (examples, and the per-step mean
    loss-token count), and the accumulated loss is the mean over every answer token of the step."""
    module = data_module(tmp_path, str(write_task_data(tmp_path / "qa.jsonl")), batch_size=4, val_size=0.1)
    examples = module.examples("train")
    alone = TaskTrainBatches(examples, 4, module.seed, rank=0, world_size=1, accumulate_grad_batches=2)
    pair = [TaskTrainBatches(examples, 4, module.seed, rank=r, world_size=2) for r in (0, 1)]
    for k in range(60):  # beyond an epoch of 54 micro-batches
        for a, b in zip(alone[k], pair[k % 2][k // 2]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Embedding(257, 257))
    step = [alone[0], alone[1]]
    accumulated = sum(batch_loss(net, batch)[0] for batch in step) / 2
    logits = [net(batch[0]) for batch in step]
    token_sum = sum(
        torch.nn.functional.cross_entropy(lg.reshape(-1, 257), b[1].reshape(-1), reduction="sum")
        for lg, b in zip(logits, step)
    )
    tokens = sum(int((b[1] != -100).sum()) for b in step)
    torch.testing.assert_close(accumulated, token_sum / tokens)
    # a resumed loader continues the same sequence
    loader = module.train_loader(start_micro_batch=7, rank=0, world_size=1, accumulate_grad_batches=2)
    first = next(iter(loader))
    for a, b in zip(first, alone[7]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_length_buckets_waste_less_padding_than_random_batches(tmp_path):
    rows = [{"prompt": "x" * (i % 40), "completion": "y"} for i in range(400)]
    module = data_module(tmp_path, write_jsonl(tmp_path / "mixed.jsonl", rows), batch_size=8, val_size=0.1)
    examples = module.examples("train")
    batches = TaskTrainBatches(examples, 8, seed=0, rank=0)
    padded = sum(batches[k][0].numel() for k in range(40))
    real = sum(int(examples.lengths[batches._indices(k)].sum()) for k in range(40))
    rng = np.random.default_rng(0)
    random_padded = sum(int(examples.lengths[rng.choice(len(examples), 8)].max()) * 8 for _ in range(40))
    assert padded / real < 1.1 < random_padded / real


def test_the_cache_is_reused_and_keyed_by_contents(tmp_path):
    path = write_task_data(tmp_path / "qa.jsonl")
    first = data_module(tmp_path, str(path)).cache_path
    assert data_module(tmp_path, str(path)).cache_path == first
    path.write_text(path.read_text() + json.dumps({"prompt": "new", "completion": "row"}) + "\n")
    assert data_module(tmp_path, str(path)).cache_path != first


def test_a_json_array_file_and_a_byte_order_mark_are_read(tmp_path):
    rows = [{"prompt": f"Q{i} ", "completion": f"A{i}"} for i in range(4)]
    array = tmp_path / "rows.json"
    array.write_text(json.dumps(rows, indent=2))
    module = data_module(tmp_path, str(array), val_size=1)
    assert len(module.examples("train")) + len(module.examples("val")) == 4
    bom = tmp_path / "bom.jsonl"
    bom.write_text("\ufeff" + "\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8")
    module = data_module(tmp_path, str(bom), val_size=1)
    assert len(module.examples("train")) + len(module.examples("val")) == 4
