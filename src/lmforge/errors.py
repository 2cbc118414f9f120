"""Errors a user can fix, and how the command line reports them.

Every user-error class lives here, and this module imports nothing else of lmforge, so any
layer can raise them (the import contracts in ``pyproject.toml`` keep it a leaf).

A problem with the user's input (a bad path, a config value that cannot work, an unusable
checkpoint, a full disk) raises an exception whose message is one line saying what is wrong
and how to fix it. :func:`reported_errors` wraps the body of each ``lmforge <command>`` and
prints such errors as ``error: <message>`` on stderr with exit code 1, without a traceback;
other exceptions (bugs) keep their traceback. ``HYDRA_FULL_ERROR=1`` or a ``debug=...``
config shows the traceback of user errors too.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue

USER_ERROR_EXIT_CODE = 1
EXTRAS_HINT = (
    "pip install 'lmforge[hf]' (model=hf, init_from, export), 'lmforge[lora]', 'lmforge[wandb]', 'lmforge[mlflow]', "
    "'lmforge[optuna]', 'lmforge[datasets]' (data=hf_dataset) or 'lmforge[stream]' (data=streaming)"
)
# Failures to write or read a file that the user fixes (free space, permissions), not bugs.
_USER_OS_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})
# How gloo and NCCL report a collective that another rank never joined (it hung or died). Gloo says
# "Application timeout caused pair closure" instead of "Timed out waiting" when its timeout fires
# while the pair is mid-transfer (seen in CI on the DDP backward all-reduce).
_COLLECTIVE_FAILURES = re.compile(
    r"Timed out waiting \d+ms|Application timeout caused pair closure|Connection closed by peer"
    r"|Connection reset by peer|collective operation timeout"
)


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and a value that does."""


class PrecisionError(ConfigError):
    """A ``trainer.precision`` the hardware or strategy cannot run; the message lists the ones it can."""


class DataError(ValueError):
    """A data problem the user can fix; the message is one line saying what is wrong and how to fix it."""


class CheckpointError(ValueError):
    """A checkpoint path that cannot be used, with a message that says how to fix it."""


class ConversionError(ValueError):
    """A model that cannot be converted from or to another format (e.g. Hugging Face); the message names why."""


class NonFiniteLossError(RuntimeError):
    """Training was stopped because the loss became NaN or infinite."""


def user_error_message(exc: BaseException) -> str | None:
    """The one-line message of a user error (unwrapping Hydra's instantiation errors), else None."""
    if isinstance(exc, InstantiationException) and exc.__cause__ is not None:
        exc = exc.__cause__
    if isinstance(exc, (DataError, CheckpointError, ConfigError, ConversionError, NonFiniteLossError)):
        return str(exc)
    if isinstance(exc, ModuleNotFoundError):  # an optional package a config option needs (a logger, the HF models)
        return f"a package this run needs is not installed ({exc}); install the extra it belongs to: {EXTRAS_HINT}"
    if isinstance(exc, (MissingMandatoryValue, InterpolationToMissingValueError)):
        missing = re.search(r"Missing mandatory value: (\S+)", str(exc))
        key = missing[1] if missing else "a required value"
        return f"{key} is required; set it on the command line, e.g. {key}=..."
    if isinstance(exc, RuntimeError) and (failure := _COLLECTIVE_FAILURES.search(str(exc))):
        rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))
        return (
            f"rank {rank}: a collective operation failed ({failure[0]}): another process of this job hung or died, "
            "see its output; if steps legitimately take that long, raise process_group_timeout (seconds)"
        )
    if isinstance(exc, OSError) and exc.errno in _USER_OS_ERRNOS:
        where = f" {exc.filename}" if exc.filename else ""
        return (
            f"cannot write or read{where}: {exc.strerror}; free disk space or fix the permissions, "
            "or point paths.log_dir / paths.data_dir at another disk"
        )
    return None


def _show_tracebacks() -> bool:
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        return True
    return HydraConfig.initialized() and HydraConfig.get().runtime.choices.get("debug") is not None


@contextmanager
def reported_errors() -> Iterator[None]:
    """Turn user errors raised in the block into ``error: <message>`` and exit code 1.

    Ctrl-C outside training (where Lightning handles it) exits with code 130 and one line.
    """
    try:
        yield
    except KeyboardInterrupt:
        if _show_tracebacks():
            raise
        print("interrupted", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    except Exception as exc:
        message = user_error_message(exc)
        if message is None or _show_tracebacks():
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT_CODE)
