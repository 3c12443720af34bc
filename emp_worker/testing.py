"""Unit tests of a connector without a hub: `fake_context()` (the real hub and worker for
connector tests are in `emp_hub.testing`, which needs the hub's extra).

    from emp_worker.testing import fake_context

    async def test_my_connector_alone():
        ctx = fake_context("my-service", {"prompt": "a fox"})
        result = await MyConnector().run(ctx.job, ctx)
        assert ctx.reports[-1].percent == 100

`eventually(check)` waits for a condition in any test (a fake service got a request, a job
reached a state) instead of a hand-written polling loop.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, overload

import httpx

from emp_worker.connector import InputFile, Job, JobContext, JobFailed, OutputRef
from emp_worker.worker import get_input

T = TypeVar("T")


@dataclass
class ProgressReport:
    """One `ctx.progress(...)` report, as a fake context records it."""

    percent: float
    message: str
    stage: str


@dataclass
class FakeContext(JobContext):
    """A JobContext without a hub (see `fake_context`): it records what the connector did."""

    #: The progress reports that passed the throttle, in order.
    reports: list[ProgressReport] = field(default_factory=list)
    #: The outputs' contents by name (their references are in `outputs`).
    files: dict[str, bytes] = field(default_factory=dict)
    #: What `ctx.fetch` finds, by URL (e.g. `"/api/jobs/a/outputs/x.png"`); any other
    #: http(s) URL is fetched with a plain GET.
    inputs: dict[str, InputFile] = field(default_factory=dict)


def fake_context(
    service: str = "test",
    payload: dict[str, Any] | None = None,
    *,
    job: Job | None = None,
    progress_interval_s: float = 0,
    inputs: dict[str, bytes | InputFile] | None = None,
) -> FakeContext:
    """A context to call `connector.run(ctx.job, ctx)` with in a unit test, no hub needed:
    `ctx.job` is `job` (or a job of `service` with `payload`), `ctx.reports` records the
    progress reports, `ctx.files` and `ctx.outputs` the outputs, and `ctx.cancelled` is
    yours to set. `progress_interval_s` (0: every report is recorded; the worker's
    default is 0.5) applies the worker's throttle. `inputs`: what `ctx.fetch` finds, by
    URL (bytes are served as application/octet-stream, named after the URL); other
    http(s) URLs are fetched with a plain GET, other hub outputs are not found."""

    async def fetch(context: JobContext, url: str) -> InputFile:
        if url in ctx.inputs:
            return ctx.inputs[url]
        if url.startswith(("http://", "https://")):
            async with httpx.AsyncClient(timeout=60) as http:
                return await get_input(http, url)
        raise JobFailed(f"input {url}: HTTP 404 not in fake_context(inputs=...)", retryable=False)

    async def progress(percent: float, message: str, stage: str) -> None:
        ctx.reports.append(ProgressReport(percent, message, stage))

    async def store(context: JobContext, name: str, data: bytes, content_type: str) -> OutputRef:
        ctx.files[name] = data
        url = f"memory://{context.job.id}/{name}"
        return OutputRef(name=name, size=len(data), content_type=content_type, url=url)

    ctx = FakeContext(
        job=job or Job(id="test-job", service=service, payload=payload or {}),
        _progress=progress,
        _store=store,
        _fetch=fetch,
        progress_interval_s=progress_interval_s,
    )
    for url, data in (inputs or {}).items():
        name = httpx.URL(url).path.rsplit("/", 1)[-1] or "input"
        ctx.inputs[url] = data if isinstance(data, InputFile) else InputFile(name=name, data=data)
    return ctx


@overload
async def eventually(
    check: Callable[[], Awaitable[T | None]],
    *,
    within_s: float = 10,
    every_s: float = 0.02,
    what: str = "the condition",
) -> T: ...


@overload
async def eventually(
    check: Callable[[], T | None],
    *,
    within_s: float = 10,
    every_s: float = 0.02,
    what: str = "the condition",
) -> T: ...


async def eventually(
    check: Callable[[], Any],
    *,
    within_s: float = 10,
    every_s: float = 0.02,
    what: str = "the condition",
) -> Any:
    """Call `check` (a function or a coroutine function) every `every_s` until it returns
    something true, and return that; AssertionError naming `what` and the last answer
    when `within_s` passes first."""
    deadline = time.monotonic() + within_s
    while True:
        answer = check()
        if inspect.isawaitable(answer):
            answer = await answer
        if answer:
            return answer
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} did not come true within {within_s} s: {answer!r}")
        await asyncio.sleep(every_s)
