"""emp_worker.testing.eventually: the one polling helper of the tests."""

from __future__ import annotations

import asyncio

import pytest

from emp_worker.testing import eventually
from tests.processes import eventually_sync


async def test_returns_the_first_true_answer_of_a_function() -> None:
    answers = iter([0, None, "", 7, 8])
    assert await eventually(lambda: next(answers), every_s=0) == 7


async def test_awaits_a_coroutine_function() -> None:
    calls = 0

    async def check() -> list[int]:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0)
        return [calls] if calls == 3 else []

    assert await eventually(check, every_s=0) == [3]


async def test_says_what_did_not_come_true_and_the_last_answer() -> None:
    jobs: list[str] = []
    with pytest.raises(AssertionError, match=r"a job did not come true within 0.1 s: \[\]"):
        await eventually(lambda: jobs, within_s=0.1, what="a job")


def test_the_sync_twin_returns_the_first_true_answer() -> None:
    answers = iter([0, None, "", 7, 8])
    assert eventually_sync(lambda: next(answers), every_s=0) == 7


def test_the_sync_twin_says_what_the_last_answer_and_the_log() -> None:
    log = ["started"]

    def still_nothing() -> list[str]:
        log.append("polled")
        return []

    with pytest.raises(AssertionError) as failed:
        eventually_sync(
            still_nothing, within_s=0.1, every_s=0.01, what="a job", log=lambda: log[-1]
        )
    assert str(failed.value) == "a job did not come true within 0.1 s: []\npolled"


def test_the_sync_twin_fails_at_once_when_the_check_raises() -> None:
    def dead() -> bool:
        raise AssertionError("the process exited")

    with pytest.raises(AssertionError, match="the process exited"):
        eventually_sync(dead, within_s=60)
