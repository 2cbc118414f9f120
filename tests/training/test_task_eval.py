"""Answers to task prompts and their scores: EOS stops generation, metrics equal sacreBLEU's, and
generate / eval / validation report them."""

from __future__ import annotations

import json

import pytest
import sacrebleu
import torch
from helpers import DEFAULT_MODEL, compose_config, tiny_sft_overrides, write_task_data
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lmforge.cli.eval import evaluate
from lmforge.cli.generate import generate
from lmforge.cli.train import train
from lmforge.data import SFTDataModule
from lmforge.data.tokenizer import train_tokenizer
from lmforge.errors import ConfigError, DataError
from lmforge.models.base import LanguageModel
from lmforge.training.task_eval import TaskScores, answer_prompts, exact_match, task_sample


class Counter(LanguageModel):
    """Predicts the previous token + 1 (mod the vocabulary): a model whose answers are known."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.calls = 0

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.nn.functional.one_hot((idx + 1) % self.vocab_size, self.vocab_size).float()

    def init_state(self, batch_size, device):
        return None

    def forward_step(self, idx, state):
        return self(idx), None


def test_generation_stops_once_every_prompt_has_ended():
    tokenizer = train_tokenizer("bytes", [])  # ids 0-255 are bytes, 256 is the end-of-sequence token
    net = Counter(257)
    out = net.generate(torch.tensor([[250], [253]]), max_new_tokens=50, temperature=0, stop_token=256)
    assert out.shape == (2, 7) and net.calls == 6  # the first row reaches 256 after 6 tokens
    answers = answer_prompts(net, tokenizer, [[250], [1, 2, 253], [10]], max_new_tokens=4)
    decode = tokenizer.decode
    assert answers == [decode([251, 252, 253, 254]), decode([254, 255]), decode([11, 12, 13, 14])]


def test_the_summary_sample_of_task_data_answers_a_validation_prompt(tmp_path):
    rows = [{"prompt": "count: ab", "completion": "cd"}] * 4
    (tmp_path / "count.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    module = SFTDataModule(
        str(tmp_path / "count.jsonl"), tokenizer="bytes", batch_size=2, val_size=1, max_answer_tokens=3
    )
    module.cache_dir = tmp_path / "cache"
    assert task_sample(Counter(257), module) == "count: abcde"  # the Counter continues b with c, d, e
    assert task_sample(Counter(257), object()) is None


def test_scores_equal_sacrebleu_on_known_strings():
    outputs = ["Le chat est sur le tapis.", " Il pleut  aujourd'hui.", "Bonjour !", ""]
    references = ["Le chat est sur le tapis.", "Il pleut aujourd'hui.", "Salut !", "Rien."]
    scores = TaskScores()
    scores.update(outputs[:2], references[:2])  # updates add up: the corpus statistics of all four
    scores.update(outputs[2:], references[2:])
    values = scores.compute()
    assert values["bleu"] == pytest.approx(sacrebleu.corpus_bleu(outputs, [references]).score, abs=1e-3)
    assert values["chrf"] == pytest.approx(sacrebleu.corpus_chrf(outputs, [references]).score, abs=1e-3)
    assert values["exact_match"] == pytest.approx(50.0)  # whitespace runs do not count
    perfect = TaskScores()
    perfect.update(references, references)
    assert perfect.compute() == {"exact_match": 100.0, "chrf": 100.0, "bleu": pytest.approx(100.0)}
    assert perfect.compute() == {}  # compute resets
    assert exact_match(" a  b ", "a b") and not exact_match("a b.", "a b")


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory):
    """A tiny fine-tuning run (Trainer) on a task file: its directory, task file and checkpoint."""
    root = tmp_path_factory.mktemp("fine_tuned")
    task_file = write_task_data(root / "qa.jsonl")
    train(compose_config("train", tiny_sft_overrides(task_file, DEFAULT_MODEL, "data.metric_examples=8"), root))
    return root, task_file, root / "run" / "checkpoints" / "last.ckpt"


def test_validation_logs_task_scores_and_answers_as_text(fine_tuned):
    root, _, _ = fine_tuned
    events = EventAccumulator(str(root / "run" / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    val_loss_steps = [event.step for event in events.Scalars("loss/val")]
    assert len(val_loss_steps) == 2
    for name in ("exact_match", "chrf", "bleu"):
        # at every validation, beside val/loss (tag loss/val); not in the sanity check before training
        assert [event.step for event in events.Scalars(f"val/{name}")] == val_loss_steps, name
        assert 0 <= events.Scalars(f"test/{name}")[-1].value <= 100
    assert "val/answers/text_summary" in events.Tags()["tensors"]


def test_generate_answers_a_prompts_file_and_scores_it(fine_tuned, tmp_path, capsys):
    root, task_file, checkpoint = fine_tuned
    prompts = tmp_path / "prompts.jsonl"
    rows = [json.loads(line) for line in task_file.read_text().splitlines()[:5]]
    chat = {"messages": [{"role": "user", "content": "What is 1 plus 2?"}], "id": 7}
    prompts.write_text("\n".join(json.dumps(row) for row in [*rows, chat]) + "\n")
    output = tmp_path / "answers.jsonl"
    overrides = [f"ckpt_path={checkpoint}", f"prompts_file={prompts}", f"output_file={output}", "temperature=0"]
    answers = generate(compose_config("generate", [*overrides, "max_new_tokens=8"], tmp_path))
    written = [json.loads(line) for line in output.read_text().splitlines()]
    assert [{k: v for k, v in row.items() if k != "output"} for row in written] == [*rows, chat]
    assert [row["output"] for row in written] == answers
    assert all(len(answer) <= 8 and "<|endoftext|>" not in answer for answer in answers)
    assert f"5 answers against the references in {prompts.name}: exact_match " in capsys.readouterr().out


def test_eval_reports_task_scores_of_a_checkpoint(fine_tuned, tmp_path):
    _, _, checkpoint = fine_tuned
    metrics = evaluate(compose_config("eval", [f"ckpt_path={checkpoint}", "trainer.accelerator=cpu"], tmp_path))
    assert {"val/exact_match", "val/chrf", "val/bleu", "test/bleu"} <= set(metrics)


def test_a_bad_prompts_file_is_one_clear_error(fine_tuned, tmp_path):
    _, _, checkpoint = fine_tuned
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"question": "no prompt"}\n')
    cases = {
        "output_file=null": "prompts_file needs output_file",
        f"prompts_file={tmp_path}/missing.jsonl": "is not a file",
        f"prompts_file={bad}": "bad.jsonl:2: a prompt row needs",
    }
    for override, message in cases.items():
        overrides = [f"ckpt_path={checkpoint}", f"prompts_file={bad}", f"output_file={tmp_path}/out.jsonl", override]
        with pytest.raises((ConfigError, DataError), match=message):
            generate(compose_config("generate", overrides, tmp_path))
    assert not (tmp_path / "out.jsonl").exists()
