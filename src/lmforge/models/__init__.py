"""Language models: a GPT-style transformer and an LSTM, sharing the ``LanguageModel`` interface."""

from lmforge.models.base import LanguageModel
from lmforge.models.gpt import GPT
from lmforge.models.lstm import LSTMLanguageModel

__all__ = ["GPT", "LSTMLanguageModel", "LanguageModel"]
