"""The hooks a worker plugin may implement (pluggy, project name "emp_worker").

A plugin is a module with functions marked `@hookimpl`, registered through the entry-point
group `emp_worker`. docs/hooks.md has a page per hook with a worked example; docs/plugins.md
the rest of the contract. Hooks are plain functions, except `store_output` and
`fetch_output`, which may also be `async def`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Literal

import pluggy

if TYPE_CHECKING:
    from emp_worker.connector import (
        CapabilityExtras,
        Connector,
        InputFile,
        JobContext,
        OutputRef,
    )

hookspec = pluggy.HookspecMarker("emp_worker")
hookimpl = pluggy.HookimplMarker("emp_worker")

#: How a job ended on this worker (`job_finished`): it completed; it failed (the
#: connector raised); it was cancelled (a client asked); it timed out (its `job_timeout`);
#: it was lost (the hub gave its lease to another worker, e.g. after a long disconnect);
#: it was released (handed back to the hub unfinished, when the worker stopped).
Outcome = Literal["completed", "failed", "cancelled", "timed_out", "lost", "released"]


@hookspec
def register_connectors(register: Callable[[type[Connector]], None]) -> None:
    """Register connector classes: call `register(MyConnector)` for each."""


@hookspec
def worker_capabilities() -> CapabilityExtras | None:
    """Contribute capabilities: tags, a region, models per service. Merged with the
    detected ones and the connectors'; a dict is read as a CapabilityExtras."""


@hookspec
def job_started(context: JobContext) -> None:
    """A job is about to run on a connector."""


@hookspec
def job_finished(context: JobContext, outcome: Outcome, error: str | None) -> None:
    """A job ended on this worker: `outcome` is completed, failed, cancelled, timed_out,
    lost or released; `error` says why for failed and timed_out, else None."""


@hookspec(firstresult=True)
def store_output(
    context: JobContext, name: str, data: bytes, content_type: str
) -> OutputRef | Awaitable[OutputRef | None] | None:
    """Store one output file of a job and return its reference, or None to let the next
    plugin store it (plain or `async def`: each answer is awaited before the next plugin
    is asked). The first answer wins; the built-in default uploads to the hub."""


@hookspec(firstresult=True)
def fetch_output(context: JobContext, url: str) -> InputFile | Awaitable[InputFile | None] | None:
    """Fetch a file a job takes as input (`ctx.fetch`), given by its URL: an output that
    `store_output` stored (this plugin's, or the hub's `/api/jobs/<id>/outputs/<name>`), or
    any http(s) URL. Return an InputFile, or None to let the next plugin fetch it (plain or
    `async def`). The first answer wins; the built-in default, asked last, reads the hub's
    outputs as the job and any other http(s) URL with a plain GET."""
