"""The worker's event loop: uvloop when it is installed, asyncio's own with
EMP_WORKER_LOOP=asyncio; the choice is logged at debug."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from emp_hub.embedded import free_port

pytestmark = [pytest.mark.slow, pytest.mark.worker]  # emp-worker processes


def doctor(**env: str) -> subprocess.CompletedProcess[str]:
    """`emp-worker doctor` against a port where nothing listens, at debug level."""
    return subprocess.run(
        [sys.executable, "-m", "emp_worker.cli", "doctor"],
        env={
            **os.environ,
            "EMP_HUB_URL": f"ws://127.0.0.1:{free_port()}",
            "EMP_LOG_LEVEL": "debug",
            "EMP_CONNECTORS": "simulation",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("choice", "loop"), [(None, "uvloop"), ("uvloop", "uvloop"), ("asyncio", "asyncio")]
)
def test_the_worker_runs_on_uvloop_unless_told_otherwise(choice: str | None, loop: str) -> None:
    """uvloop is a dependency of the worker on Linux and macOS: by default it runs."""
    done = doctor(**({} if choice is None else {"EMP_WORKER_LOOP": choice}))
    assert done.returncode == 1, done.stderr  # the hub is not there
    assert f"event loop: {loop}" in done.stderr


def test_an_unknown_loop_is_refused_naming_the_variable() -> None:
    done = doctor(EMP_WORKER_LOOP="trio")
    assert done.returncode == 2
    assert "EMP_WORKER_LOOP" in done.stderr
