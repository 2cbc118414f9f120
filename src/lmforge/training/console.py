"""The first screen of a command: lmforge's own lines, not third-party chatter.

Lightning announces at start-up that no GPU/TPU/HPU is used, advertises a cloud logger, says
which seed it set and that it skipped its default model summary (lmforge has its own), and
(Lightning 2.6 with torch 2.13) warns about a torch API it uses itself. None of it says anything
about the run a user asked for, and it buries lmforge's lines; real warnings stay.
"""

from __future__ import annotations

import logging
import re
import warnings

# Lightning info lines (rank_zero_info and its seed helper) that are dropped, by their start.
LIGHTNING_CHATTER = (
    "GPU available:",
    "TPU available:",
    "HPU available:",
    "💡 Tip:",
    "Seed set to",
    "Trainer already configured with model summary callbacks",
    "`Trainer.fit` stopped: `max_steps=",
    "Restoring states from the checkpoint path",
    "Loaded model weights from the checkpoint",
)
LIGHTNING_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning.fabric.utilities.seed",
)


class _DropChatter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = re.sub(r"^\[rank: \d+\] ", "", str(record.msg))  # other ranks' lines carry a prefix
        return not message.startswith(LIGHTNING_CHATTER)


def quiet_third_party_chatter() -> None:
    """Drop the known third-party start-up lines (idempotent)."""
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropChatter) for f in logger.filters):
            logger.addFilter(_DropChatter())
    # Raised inside Lightning's own pytree helper, not by anything a user wrote.
    leaf_spec = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
    warnings.filterwarnings("ignore", message=leaf_spec, category=FutureWarning)
