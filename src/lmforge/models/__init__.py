"""Language models, one architecture per module, sharing the ``LanguageModel`` interface."""

from lmforge.models.base import LanguageModel
from lmforge.models.gpt import GPT  # [gpt]
from lmforge.models.lstm import LSTMLanguageModel  # [lstm]

__all__ = [
    "GPT",  # [gpt]
    "LSTMLanguageModel",  # [lstm]
    "LanguageModel",
]
