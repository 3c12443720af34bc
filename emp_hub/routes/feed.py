"""The dashboard's live feed (`GET /api/dashboard/feed`): server-sent events that say WHAT
changed, for a page that re-reads over HTTP what it shows.

At most one `changes` event per FEED_INTERVAL_S while anything changes, and a keep-alive
comment after KEEPALIVE_S of quiet. The feed is on the replica's event bus as a monitor
(every job's events, the messages for monitors), but its `forward` only counts: a few
dict updates per event, no Redis read, no JSON encoding; one event is encoded per interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from emp_hub.hub import Hub
from emp_hub.routes.api import HubDep, Operator

router = APIRouter()

#: Seconds between two `changes` events, at least.
FEED_INTERVAL_S = 0.5
#: Seconds of quiet before a keep-alive comment.
KEEPALIVE_S = 15.0
#: The most job ids, alert messages and worker states one `changes` event names.
MAX_NAMED = 50
#: The monitors' messages that say a worker changed.
WORKER_MESSAGES = {"worker_status", "connector_ws_status", "service_request", "worker_state"}


class FeedWatcher:
    """What changed since the last `changes` event, counted as the bus hands events on."""

    def __init__(self) -> None:
        self.changed = asyncio.Event()
        self._reset()

    def _reset(self) -> None:
        self.changed.clear()
        self.jobs = 0
        self.statuses: dict[str, int] = {}
        self.job_ids: dict[str, None] = {}  # in order of first event, at most MAX_NAMED
        self.more_job_ids = False  # jobs changed that job_ids does not name
        self.workers = False
        self.alerts: list[str] = []
        self.worker_states: list[dict[str, Any]] = []

    def forward(self, event: dict[str, Any]) -> None:
        """Count a job event, or note a message for monitors (from the bus's listener)."""
        if event["type"] == "monitor":
            self._note(event["message"])
        else:
            self.jobs += 1
            status = event.get("status")
            if status:
                self.statuses[status] = self.statuses.get(status, 0) + 1
            job_id = event["job"]
            if len(self.job_ids) < MAX_NAMED:
                self.job_ids[job_id] = None
            elif job_id not in self.job_ids:
                self.more_job_ids = True
        self.changed.set()

    def _note(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind in WORKER_MESSAGES:
            self.workers = True
        if kind == "worker_state" and len(self.worker_states) < MAX_NAMED:
            self.worker_states.append(
                {"worker_id": message.get("worker_id"), "state": message.get("state")}
            )
        elif kind == "alert" and len(self.alerts) < MAX_NAMED:
            self.alerts.append(str(message.get("message", "")))

    def take(self) -> dict[str, Any]:
        """The changes so far, as one `changes` event's data; starts counting afresh."""
        changes = {
            "jobs": self.jobs,
            "statuses": self.statuses,
            "job_ids": list(self.job_ids),
            "more_job_ids": self.more_job_ids,
            "workers": self.workers,
            "alerts": self.alerts,
            "worker_states": self.worker_states,
        }
        self._reset()
        return changes


async def feed_stream(hub: Hub) -> AsyncIterator[str]:
    """The feed of one request: a first comment once it is on the bus, then `changes`
    events and keep-alives, until the caller goes away."""
    watcher = FeedWatcher()
    await hub.bus.add_monitor(watcher)
    loop = asyncio.get_running_loop()
    try:
        yield ": open\n\n"
        last = float("-inf")
        while True:
            try:
                await asyncio.wait_for(watcher.changed.wait(), KEEPALIVE_S)
            except TimeoutError:
                yield ": keep-alive\n\n"
                continue
            wait = last + FEED_INTERVAL_S - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            last = loop.time()
            data = json.dumps(watcher.take(), separators=(",", ":"))
            yield f"event: changes\ndata: {data}\n\n"
    finally:
        # Cancelled when the caller goes away: the unsubscription is not cut in half.
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(hub.bus.remove_monitor(watcher))


@router.get(
    "/api/dashboard/feed",
    tags=["operations"],
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def dashboard_feed(hub: HubDep, principal: Operator) -> StreamingResponse:
    """What changes, live (server-sent events): at most one `changes` event per 500 ms
    while anything does, and a keep-alive comment every 15 s of quiet."""
    return StreamingResponse(
        hub.until_stopping(feed_stream(hub)),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
