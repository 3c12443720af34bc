"""The hooks a worker plugin may implement (pluggy, project name "emp_worker").

A plugin is a module with functions marked `@hookimpl`, registered through the entry-point
group `emp_worker`. See docs/plugins.md. Hooks may be plain functions; `store_output` may
also return an awaitable.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from emp_worker.connector import Connector, JobContext, OutputRef

hookspec = pluggy.HookspecMarker("emp_worker")
hookimpl = pluggy.HookimplMarker("emp_worker")


@hookspec
def register_connectors(register: Callable[[type[Connector]], None]) -> None:
    """Register connector classes: call `register(MyConnector)` for each."""


@hookspec
def worker_capabilities() -> dict[str, Any] | None:
    """Contribute capabilities: a dict with any of `tags` (list), `region`, `models`
    ({service: [model, ...]}). Merged with the detected ones and the connectors'."""


@hookspec
def job_started(context: JobContext) -> None:
    """A job is about to run on a connector."""


@hookspec
def job_finished(context: JobContext, outcome: str, error: str | None) -> None:
    """A job ended on this worker: `outcome` is completed, failed, cancelled, timed_out
    or released."""


@hookspec(firstresult=True)
def store_output(
    context: JobContext, name: str, data: bytes, content_type: str
) -> OutputRef | Awaitable[OutputRef | None] | None:
    """Store one output file of a job and return its reference, or None to let the next
    plugin store it. The first answer wins; the built-in default uploads to the hub."""
