"""Which exceptions are user errors, and their one-line messages."""

import pytest
from hydra.errors import InstantiationException

from lmforge.errors import user_error_message


@pytest.mark.parametrize(
    "backend_message",
    [
        "[../gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 20000ms for recv operation to complete",
        "[../gloo/transport/tcp/pair.cc:534] Application timeout caused pair closure",
        "[../gloo/transport/tcp/pair.cc:598] Connection closed by peer [127.0.0.1]:4242",
        "NCCL watchdog: collective operation timeout: WorkNCCL(SeqNum=7, OpType=ALLREDUCE)",
    ],
)
def test_a_collective_that_another_rank_never_joined_is_one_actionable_line(backend_message, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    message = user_error_message(RuntimeError(backend_message))
    assert message is not None
    assert message.startswith("rank 3: a collective operation failed (")
    assert "process_group_timeout" in message and "\n" not in message


def test_other_runtime_errors_are_bugs_not_user_errors():
    assert user_error_message(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None


def test_a_missing_optional_package_names_the_extras():
    """A logger or model whose package is not installed (Hydra wraps the constructor's error)."""
    try:
        raise InstantiationException("Error in call to target 'WandbLogger'") from ModuleNotFoundError(
            "Requirement 'wandb>=0.12.10' not met"
        )
    except InstantiationException as wrapped:
        message = user_error_message(wrapped)
    assert message.startswith("a package this run needs is not installed (Requirement 'wandb>=0.12.10' not met)")
    assert "'lmforge[wandb]'" in message and "\n" not in message
