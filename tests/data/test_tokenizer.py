import pytest
from tokenizers import Tokenizer, models

from lmforge.data import EOT_TOKEN, DataError, encode_documents, load_tokenizer, save_tokenizer, train_tokenizer
from lmforge.data.tokenizer import eot_id

TRAIN_TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "Hello, world! The quick brown fox jumps over the lazy dog.\r\n",
    "tabs\tand  double  spaces   \n\n",
] * 20

HARD_TEXTS = [
    "",
    "plain ascii",
    "emoji 😀🚀 and CJK 漢字かな 한국어",
    "tabs\t\tinside\tand trailing spaces   ",
    "windows\r\nline\r\nendings\r\n",
    "   leading spaces and\nnew\n\nlines\n",
    "zero-width\u200bjoiner and combining e\u0301",
]


def roundtrip(tokenizer, text):
    return tokenizer.decode(encode_documents(tokenizer, [text])[0])


@pytest.fixture(scope="module")
def bpe():
    return train_tokenizer("bpe", iter(TRAIN_TEXTS), 300)


@pytest.mark.parametrize("text", HARD_TEXTS)
def test_bpe_roundtrips_any_text(bpe, text):
    assert roundtrip(bpe, text) == text


def test_bpe_vocab_and_eot(bpe):
    assert 257 < bpe.get_vocab_size() <= 300
    assert bpe.token_to_id(EOT_TOKEN) is not None


def test_bpe_vocab_too_small():
    with pytest.raises(DataError, match="vocab_size=256 is too small for byte-level BPE: it needs at least 257"):
        train_tokenizer("bpe", TRAIN_TEXTS, 256)


def test_bpe_small_corpus_gives_smaller_vocab(caplog):
    tokenizer = train_tokenizer("bpe", ["ab ab ab"], 5000)
    assert tokenizer.get_vocab_size() < 5000
    assert "supports only" in caplog.text


def test_unknown_kind():
    with pytest.raises(DataError, match="unknown tokenizer 'words'"):
        train_tokenizer("words", [], None)


def test_char_tokenizer():
    tokenizer = train_tokenizer("char", ["ba\n", "c\r\n\ta 😀"], None)
    vocab = tokenizer.get_vocab()
    chars = sorted("ba\nc\r\t 😀")
    assert [vocab[ch] for ch in chars] == list(range(len(chars)))
    assert tokenizer.get_vocab_size() == len(chars) + 2  # + [UNK] + EOT
    text = "abc\r\n\t😀 a\n"
    ids = encode_documents(tokenizer, [text])[0]
    assert len(ids) == len(text)
    assert tokenizer.decode(ids) == text
    unknown = encode_documents(tokenizer, ["aZb"])[0]
    assert unknown[1] == vocab["[UNK]"]
    assert tokenizer.decode(unknown) == "a[UNK]b"


def test_char_vocab_is_deterministic():
    a = train_tokenizer("char", ["xyz", "abc"], None)
    b = train_tokenizer("char", ["cba", "zyx"], None)
    assert a.to_str() == b.to_str()


@pytest.mark.parametrize("text", HARD_TEXTS)
def test_bytes_roundtrip(text):
    tokenizer = train_tokenizer("bytes", [], None)
    assert tokenizer.get_vocab_size() == 257
    ids = encode_documents(tokenizer, [text])[0]
    assert len(ids) == len(text.encode("utf-8"))
    assert roundtrip(tokenizer, text) == text


def test_literal_special_token_is_plain_text(bpe):
    text = f"a {EOT_TOKEN} b"
    ids = encode_documents(bpe, [text])[0]
    assert bpe.token_to_id(EOT_TOKEN) not in ids
    assert bpe.decode(ids) == text


def test_save_load(tmp_path, bpe):
    save_tokenizer(bpe, tmp_path / "tokenizer.json")
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    texts = HARD_TEXTS + TRAIN_TEXTS[:3]
    assert encode_documents(loaded, texts) == encode_documents(bpe, texts)


def test_a_pretrained_tokenizer_without_lmforge_eot_ends_documents_with_its_own_end_of_text():
    vocab = {"a": 0, "b": 1, "</s>": 2, "<s>": 3}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="a"))
    tokenizer.add_special_tokens(["</s>", "<s>"])
    assert eot_id(tokenizer) == 2
    tokenizer = Tokenizer(models.WordLevel({"a": 0}, unk_token="a"))
    with pytest.raises(DataError, match="no end-of-text token"):
        eot_id(tokenizer)
