"""lmforge: a PyTorch Lightning + Hydra template for training language models."""

__version__ = "0.1.0"
