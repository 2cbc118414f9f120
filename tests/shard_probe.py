"""Test helper: a callback that records, per rank, what each process holds of the network's weights."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from torch.distributed.fsdp import FSDPModule


class ShardProbe(L.Callback):
    """Before the first optimizer step (after the backward pass, when FSDP2 has resharded every unit,
    the root included), writes ``<out_dir>/rank<N>.json``: per parameter, its global shape, the shape
    of this rank's local part and the DTensor placements (empty for a plain tensor); the names of
    the modules that are FSDP units; and torch's thread count in this process."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if trainer.global_step > 0:
            return
        params = {}
        for name, param in pl_module.net.named_parameters():
            local = param.to_local() if hasattr(param, "to_local") else param
            params[name] = {
                "shape": list(param.shape),
                "local_shape": list(local.shape),
                "placements": [repr(p) for p in getattr(param, "placements", ())],
            }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        units = [name for name, module in pl_module.net.named_modules() if isinstance(module, FSDPModule)]
        record = {"threads": torch.get_num_threads(), "params": params, "fsdp_units": units}
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
