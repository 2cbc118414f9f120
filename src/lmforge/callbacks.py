"""Callbacks for language-model training: text samples, throughput, learning rate and progress bar."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch import callbacks as pl_callbacks
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import RunningStage
from tokenizers import Tokenizer

from lmforge.lm_module import is_logging_step
from lmforge.parallel import is_sharded


def generate_text(
    net: torch.nn.Module,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> str:
    """Continue ``prompt`` with ``net`` and return prompt + continuation as text."""
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    if not ids:
        raise ValueError("the prompt encodes to no tokens; give a non-empty prompt")
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    out = net.generate(
        idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
    )
    return tokenizer.decode(out[0].tolist(), skip_special_tokens=False)


def generate_sample(net: torch.nn.Module, tokenizer: Tokenizer, sample: Any, device: torch.device | str) -> str:
    """:func:`generate_text` with the settings of a ``sample`` config node."""
    return generate_text(
        net, tokenizer, sample.prompt, sample.max_new_tokens,
        temperature=sample.temperature, top_k=sample.top_k, seed=sample.seed, device=device,
    )


class TextSamples(L.Callback):
    """Logs a sample continuation of a fixed prompt to TensorBoard after each validation."""

    def __init__(
        self,
        prompt: str = "\n",
        max_new_tokens: int = 128,
        temperature: float = 0.8,
        top_k: int | None = 50,
        seed: int = 0,
    ) -> None:
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_k = top_k
        self.seed = seed
        self.last_sample: str | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or pl_module.tokenizer_json is None:
            return
        # Rank 0 samples alone, except that a sharded (FSDP) network runs only with every rank.
        if not (trainer.is_global_zero or is_sharded(pl_module.net)):
            return
        tokenizer = Tokenizer.from_str(pl_module.tokenizer_json)
        self.last_sample = generate_text(
            pl_module.net,
            tokenizer,
            self.prompt,
            self.max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            seed=self.seed,
            device=pl_module.device,
        )
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                # Markdown code block keeps whitespace and newlines intact in the Text tab.
                text = "```\n" + self.last_sample.replace("```", "ʼʼʼ") + "\n```"
                logger.experiment.add_text("samples", text, global_step=trainer.global_step)


class LMThroughputMonitor(ThroughputMonitor):
    """Lightning's ``ThroughputMonitor`` for ``(inputs, targets)`` token batches.

    Logs batches, samples and tokens ("items") per second, and FLOPs/MFU from the
    model's ``flops_per_token``. ``peak_flops`` (FLOP/s of one device) overrides
    Lightning's lookup table, which does not know every device (nor any CPU).
    """

    def __init__(self, window_size: int = 50, peak_flops: float | None = None, **kwargs: Any) -> None:
        super().__init__(
            batch_size_fn=_batch_size, length_fn=_batch_tokens, window_size=window_size, **kwargs
        )
        self.peak_flops = peak_flops

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.peak_flops:
            self.available_flops = self.peak_flops
            for throughput in self._throughputs.values():
                throughput.available_flops = self.peak_flops

    def training_rates(self) -> dict[str, float]:
        """Latest training rates on rank 0 (tokens/s is ``items_per_sec``); empty before any."""
        throughput = self._throughputs.get(RunningStage.TRAINING)
        return throughput.compute() if throughput is not None else {}


def _batch_size(batch: tuple[torch.Tensor, torch.Tensor]) -> int:
    return batch[0].size(0)


def _batch_tokens(batch: tuple[torch.Tensor, torch.Tensor]) -> int:
    return batch[0].numel()


class LearningRateMonitor(pl_callbacks.LearningRateMonitor):
    """Lightning's learning-rate monitor, idle (instead of an error) in a run without a logger."""

    def on_train_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_epoch_start(trainer, *args, **kwargs)


class ProgressBar(pl_callbacks.RichProgressBar):
    """Lightning's rich progress bar, re-reading the logged values only after the steps that log them.

    Lightning's bar collects every logged metric after each training batch (~0.2 ms of Python on
    a CPU, several % of a small model's step); the training values change only on the logging
    steps, and the validation values at the end of validation.
    """

    def _update_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.training and not is_logging_step(trainer, trainer.global_step):
            return
        super()._update_metrics(trainer, pl_module)
