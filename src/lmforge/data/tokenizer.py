"""Tokenizers built with the Hugging Face ``tokenizers`` library.

Three kinds are supported:

* ``"bpe"``: byte-level BPE (GPT-2 style) trained on the corpus; round-trips any text.
* ``"char"``: one token per character seen in the training text, plus ``[UNK]``.
* ``"bytes"``: one token per byte (256 tokens); needs no training and round-trips any text.

Every tokenizer also has the special token :data:`EOT_TOKEN`, which the token cache
appends after every document.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from lmforge.errors import DataError

EOT_TOKEN = "<|endoftext|>"
UNK_TOKEN = "[UNK]"
TOKENIZER_KINDS = ("bpe", "char", "bytes")
# What separates documents in the token stream: lmforge's EOT, else the end-of-text token of
# a pretrained tokenizer (Llama 3, Llama 2 / Mistral, chat models, Gemma), in this order.
END_OF_TEXT_TOKENS = (EOT_TOKEN, "<|end_of_text|>", "</s>", "<|im_end|>", "<eos>")
MIN_BPE_VOCAB = 257  # 256 byte tokens + EOT

log = logging.getLogger("lmforge.data")


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int | None = None) -> Tokenizer:
    """Build a tokenizer of ``kind`` from ``texts``, which are consumed once (streaming).

    ``vocab_size`` is the target size for ``"bpe"`` and ignored by the other kinds. A corpus
    too small for the requested size gives a smaller vocabulary: ``get_vocab_size()`` is the truth.
    """
    if kind == "bpe":
        return _train_bpe(texts, vocab_size)
    if kind == "char":
        return _build_char(texts)
    if kind == "bytes":
        return _build_bytes()
    raise DataError(f"unknown tokenizer {kind!r}; use one of {', '.join(TOKENIZER_KINDS)}")


def _train_bpe(texts: Iterable[str], vocab_size: int | None) -> Tokenizer:
    if vocab_size is None or vocab_size < MIN_BPE_VOCAB:
        raise DataError(
            f"vocab_size={vocab_size} is too small for byte-level BPE: it needs at least "
            f"{MIN_BPE_VOCAB} (256 bytes + {EOT_TOKEN}); set data.vocab_size >= {MIN_BPE_VOCAB}"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    if tokenizer.get_vocab_size() < vocab_size:
        log.warning(
            "the corpus supports only %d BPE tokens (requested %d); using %d",
            tokenizer.get_vocab_size(),
            vocab_size,
            tokenizer.get_vocab_size(),
        )
    return tokenizer


def _build_char(texts: Iterable[str]) -> Tokenizer:
    chars: set[str] = set()
    for text in texts:
        chars.update(text)
    vocab = {ch: i for i, ch in enumerate(sorted(chars))}
    vocab[UNK_TOKEN] = len(vocab)
    vocab[EOT_TOKEN] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    # every character (newlines included) is its own pre-token; Fuse joins them back
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens([EOT_TOKEN])
    return tokenizer


def _build_bytes() -> Tokenizer:
    # A BPE model without merges over the byte-level alphabet: one token per byte.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([EOT_TOKEN])
    return tokenizer


def eot_id(tokenizer: Tokenizer) -> int:
    """The id of the token that ends each document: :data:`EOT_TOKEN`, or in a pretrained model's
    tokenizer that lacks it, the first of its end-of-text tokens in :data:`END_OF_TEXT_TOKENS`."""
    for token in END_OF_TEXT_TOKENS:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    raise DataError(
        f"the tokenizer has no end-of-text token (none of {', '.join(END_OF_TEXT_TOKENS)}); "
        "rebuild it with lmforge, or use a tokenizer that has one"
    )


def encode_documents(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Encode ``texts`` in parallel (Rust threads), without adding special tokens.

    Text that looks like a special token (e.g. a literal ``<|endoftext|>`` in a document) is
    encoded as ordinary text, so EOT ids only ever come from document boundaries.
    """
    previous = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = True
    try:
        # encode_batch_fast (tokenizers >= 0.20) skips computing offsets: about 3x faster
        encode_batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
        encodings = encode_batch(texts, add_special_tokens=False)
    finally:
        tokenizer.encode_special_tokens = previous
    return [encoding.ids for encoding in encodings]


def save_tokenizer(tokenizer: Tokenizer, path: str | Path) -> None:
    """Write ``tokenizer`` as a ``tokenizer.json`` file."""
    Path(path).write_text(tokenizer.to_str(), encoding="utf-8")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Read a tokenizer written by :func:`save_tokenizer`."""
    return Tokenizer.from_str(Path(path).read_text(encoding="utf-8"))
