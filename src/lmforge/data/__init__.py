"""Data pipeline: corpus sources, tokenizers, the token cache and the Lightning data module."""

from lmforge.data.cache import CachedCorpus, prepare_corpus
from lmforge.data.datamodule import LMDataModule
from lmforge.data.sft import SFTDataModule
from lmforge.data.sources import CorpusSource, DownloadedTextSource, StdlibSource, TextFilesSource
from lmforge.data.tokenizer import EOT_TOKEN, encode_documents, load_tokenizer, save_tokenizer, train_tokenizer
from lmforge.data.windows import EvalWindows, MicroBatchSampler, TrainWindows
from lmforge.errors import DataError

__all__ = [
    "EOT_TOKEN",
    "CachedCorpus",
    "CorpusSource",
    "DataError",
    "DownloadedTextSource",
    "EvalWindows",
    "LMDataModule",
    "SFTDataModule",
    "MicroBatchSampler",
    "StdlibSource",
    "TextFilesSource",
    "TrainWindows",
    "encode_documents",
    "load_tokenizer",
    "prepare_corpus",
    "save_tokenizer",
    "train_tokenizer",
]
