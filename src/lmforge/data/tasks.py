"""Task examples for fine-tuning and generation: prompts with answers, read from the files people have.

Three formats, told apart by the file (``.jsonl``/``.json``: JSON lines, or for ``.json`` one array of
rows; anything else: tab-separated):

* prompt/completion JSONL: ``{"prompt": "...", "completion": "..."}`` per line;
* chat JSONL: ``{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]}``,
  rendered by a chat template (Jinja, as in a Hugging Face ``tokenizer_config.json``; the default
  is :data:`DEFAULT_CHAT_TEMPLATE`); every assistant turn is an answer;
* tab-separated pairs ``source<TAB>target[<TAB>anything]`` (the Tatoeba / manythings format),
  turned into a prompt by ``prompt_template`` (e.g. ``"Translate English to French: {source}\\nFrench: "``).

An example is a list of :class:`Segment`: text, and whether it is an answer (trained on, ended by
the end-of-sequence token). The same rendering serves training and generation
(:func:`generation_prompt`), so a model is prompted exactly as it was trained.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmforge.errors import DataError

log = logging.getLogger("lmforge.data")

JSONL_SUFFIXES = (".jsonl", ".json")
DEFAULT_PROMPT_TEMPLATE = "{source}\n"
# A plain-text chat layout for models without their own template: a role header per turn, the
# assistant's content ended by the end-of-sequence token. Same variables as Hugging Face templates.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message.role + '|>\n' + message.content }}"
    "{% if message.role == 'assistant' %}{{ eos_token }}{% else %}{{ '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Segment:
    """A piece of an example's text. ``answer``: the loss applies to it and it ends with the
    end-of-sequence token. ``template``: rendered by a chat template, so special-token text in it
    (e.g. ``<|im_end|>``) is the special token; user text is always read literally."""

    text: str
    answer: bool
    template: bool = False


@dataclass
class ReadReport:
    """Rows skipped while reading, by reason, with the first location of each (for one warning line each)."""

    rows: int = 0
    skipped: Counter = field(default_factory=Counter)
    first: dict[str, str] = field(default_factory=dict)

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        self.first.setdefault(reason, where)

    def warn(self) -> None:
        for reason, count in self.skipped.items():
            log.warning("skipped %d of %d rows: %s (first at %s)", count, self.rows, reason, self.first[reason])


class ChatTemplate:
    """A Jinja chat template (sandboxed, as Hugging Face renders them) split into prompt and answer text."""

    def __init__(self, source: str | None, eos_token: str) -> None:
        self.source = source or DEFAULT_CHAT_TEMPLATE
        self.eos_token = eos_token
        try:
            self._template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(
                self.source
            )
        except TemplateError as exc:
            raise DataError(f"data.chat_template is not a valid Jinja template: {exc}") from exc

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, eos_token=self.eos_token, bos_token=""
            )
        except TemplateError as exc:
            raise DataError(f"data.chat_template failed to render a conversation: {exc}") from exc

    def segments(self, messages: list[dict]) -> list[Segment]:
        """The rendered conversation cut into segments: each assistant turn is an answer.

        The answer of turn ``i`` is what rendering ``messages[:i + 1]`` adds to rendering
        ``messages[:i]`` with the generation prompt; templates where that is not a prefix are refused.
        """
        segments, done = [], ""
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.render(messages[:i], add_generation_prompt=True)
            full = self.render(messages[: i + 1])
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise DataError(
                    "data.chat_template renders a conversation that does not start with its earlier turns; "
                    "use a template that appends each turn (most do), or the default (data.chat_template=null)"
                )
            segments += [Segment(prompt[len(done) :], False, True), Segment(full[len(prompt) :], True, True)]
            done = full
        return [segment for segment in segments if segment.text]


def read_chat_template(value: str | None) -> str | None:
    """``data.chat_template``: null (the default), a Jinja string, or a file: a ``tokenizer_config.json``
    holding ``chat_template`` (a Hugging Face model's) or a template file."""
    if value is None or "{" in value:
        return value
    path = Path(value)
    if not path.is_file():
        raise DataError(f"data.chat_template={value!r} is neither a Jinja template nor a file")
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".json":
        return text
    template = json.loads(text).get("chat_template")
    if isinstance(template, list):  # several named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if not isinstance(template, str):
        raise DataError(f"{path} has no chat_template; set data.chat_template to a Jinja template or null")
    return template


def pretrained_chat_template(directory: str | Path) -> str | None:
    """The chat template a pretrained model's directory holds (``chat_template.jinja``, as recent
    ``transformers`` saves it, or ``tokenizer_config.json``), None when it has none."""
    directory = Path(directory)
    for name in ("chat_template.jinja", "tokenizer_config.json"):
        if (directory / name).is_file():
            try:
                return read_chat_template(str(directory / name))
            except DataError:  # a tokenizer_config.json without a template
                continue
    return None


@dataclass
class TaskFormat:
    """How rows become examples: the TSV prompt template and the chat template."""

    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    chat_template: ChatTemplate | None = None

    def __post_init__(self) -> None:
        if "{source}" not in self.prompt_template:
            raise DataError(
                f"data.prompt_template={self.prompt_template!r} lacks {{source}}, where each pair's first column goes"
            )

    def tsv_prompt(self, source: str) -> str:
        return self.prompt_template.replace("{source}", source)


def task_files(path: str | list[str]) -> list[Path]:
    """The files named by ``data.path``: a file, a directory (its files, sorted), a glob, or a list of these."""
    paths = [path] if isinstance(path, str) else list(path)
    files: list[Path] = []
    for item in paths:
        item_path = Path(item).expanduser()
        if item_path.is_dir():
            files += sorted(p for p in item_path.rglob("*") if p.is_file() and not p.name.startswith("."))
        elif item_path.is_file():
            files.append(item_path)
        else:
            matches = sorted(p for p in Path().glob(str(item_path)) if p.is_file()) if "*" in item else []
            if not matches:
                raise DataError(f"data.path={item!r} names no file; give a JSONL or TSV file, a directory or a glob")
            files += matches
    return files


def fingerprint(files: list[Path]) -> str:
    """A hash of the files' names and contents: the cache key of what was read from them."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.resolve()).encode())
        with open(file, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def read_examples(files: list[Path], task_format: TaskFormat, report: ReadReport) -> Iterator[list[Segment]]:
    """Every valid example of ``files``, in order; bad rows are counted in ``report`` and skipped."""
    for file in files:
        rows = _jsonl_rows(file, report) if file.suffix in JSONL_SUFFIXES else _tsv_rows(file, task_format, report)
        for where, row in rows:
            report.rows += 1
            example = _example(row, task_format)
            if isinstance(example, str):
                report.skip(example, where)
            else:
                yield example


def read_prompts(file: Path, task_format: TaskFormat) -> Iterator[tuple[str, dict, list[Segment]]]:
    """The prompts of a file for generation: ``(where, row, prompt segments)``; answers in it are
    ignored (a chat row's last assistant turn is dropped, so the model writes it)."""
    report = ReadReport()
    rows = _jsonl_rows(file, report) if file.suffix in JSONL_SUFFIXES else _tsv_rows(file, task_format, report)
    for where, row in rows:
        if "messages" in row:
            messages = _messages(row["messages"])
            if isinstance(messages, str):
                raise DataError(f"{where}: {messages}")
            if messages and messages[-1]["role"] == "assistant":
                messages = messages[:-1]
            template = task_format.chat_template
            yield where, row, [Segment(template.render(messages, add_generation_prompt=True), False, True)]
        elif isinstance(row.get("prompt"), str):
            yield where, row, [Segment(row["prompt"], False)]
        else:
            raise DataError(f'{where}: a prompt row needs a "prompt" string or "messages"')
    if report.skipped:
        reason = next(iter(report.skipped))
        raise DataError(f"{report.first[reason]}: {reason}")


def reference(row: dict) -> str | None:
    """The reference answer of a row (for task metrics): its completion or last assistant turn."""
    if isinstance(row.get("completion"), str):
        return row["completion"]
    messages = row.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        if messages[-1].get("role") == "assistant" and isinstance(messages[-1].get("content"), str):
            return messages[-1]["content"]
    return None


def _jsonl_rows(file: Path, report: ReadReport) -> Iterator[tuple[str, dict]]:
    """The rows of a JSON-lines file, or of a ``.json`` file that holds one array of rows."""
    with open(file, encoding="utf-8-sig", errors="strict") as handle:  # -sig: a byte-order mark is no row
        try:
            first = handle.read(4096).lstrip()
            handle.seek(0)
            if file.suffix == ".json" and first.startswith("["):
                yield from _json_array_rows(file, handle.read(), report)
                return
            for number, line in enumerate(handle, 1):
                if line.strip():
                    yield from _checked_row(line, f"{file}:{number}", report)
        except UnicodeDecodeError as exc:
            raise DataError(f"{file} is not UTF-8 text ({exc.reason}); convert it to UTF-8") from exc


def _json_array_rows(file: Path, text: str, report: ReadReport) -> Iterator[tuple[str, dict]]:
    try:
        rows = json.loads(text)
    except ValueError as exc:
        raise DataError(f"{file} is not valid JSON ({exc}); fix it, or write one JSON object per line") from exc
    for number, row in enumerate(rows, 1):
        if isinstance(row, dict):
            yield f"{file}[{number}]", row
        else:
            report.rows += 1
            report.skip("not a JSON object", f"{file}[{number}]")


def _checked_row(line: str, where: str, report: ReadReport) -> Iterator[tuple[str, dict]]:
    """The row of one JSON line, or nothing (the reason counted in ``report``)."""
    try:
        row = json.loads(line)
    except ValueError:
        report.rows += 1
        report.skip("invalid JSON", where)
        return
    if not isinstance(row, dict):
        report.rows += 1
        report.skip("not a JSON object", where)
        return
    yield where, row


def _tsv_rows(file: Path, task_format: TaskFormat, report: ReadReport) -> Iterator[tuple[str, dict]]:
    with open(file, encoding="utf-8-sig", errors="strict") as handle:
        try:
            for number, line in enumerate(handle, 1):
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                columns = line.split("\t")
                if len(columns) < 2:
                    report.rows += 1
                    report.skip("no tab between source and target", f"{file}:{number}")
                    continue
                row = {"prompt": task_format.tsv_prompt(columns[0]), "completion": columns[1]}
                yield f"{file}:{number}", row
        except UnicodeDecodeError as exc:
            raise DataError(f"{file} is not UTF-8 text ({exc.reason}); convert it to UTF-8") from exc


def _example(row: dict, task_format: TaskFormat) -> list[Segment] | str:
    """The segments of a row, or the reason it is skipped."""
    if "messages" in row:
        messages = _messages(row["messages"])
        if isinstance(messages, str):
            return messages
        if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
            return "no assistant turn with content"
        return task_format.chat_template.segments(messages)
    prompt, completion = row.get("prompt"), row.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str):
        return 'missing "prompt" or "completion" string (or "messages")'
    if not completion.strip():
        return "empty completion"
    return [Segment(prompt, False), Segment(completion, True)]


def _messages(value: object) -> list[dict] | str:
    """The checked messages of a chat row, or the reason they are unusable."""
    if not isinstance(value, list) or not value:
        return '"messages" is not a non-empty list'
    messages = []
    for message in value:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            return 'a message without "content" text'
        if message.get("role") not in ROLES:
            return f"a message role not in {', '.join(ROLES)}"
        messages.append({"role": message["role"], "content": message["content"]})
    return messages
