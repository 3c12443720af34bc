"""The monitor WebSocket (`/ws/monitor/{monitor_id}`): the original emp-redis monitor.

A monitor sees every job's messages (as clients get them, plus `client_id`), every
worker's `worker_status`, `connector_ws_status` and `service_request` (through Redis, so
from workers on any replica), and a `stats_broadcast` on connect and every couple of
seconds after: connections, workers, queues and jobs. Queue and worker figures come from
Redis, so every replica reports the whole deployment; the connection lists are this
replica's.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from emp_hub.auth import Role
from emp_hub.hub import Hub
from emp_hub.routes.legacy_client import ClientSession, JobFields
from emp_hub.sockets import authenticate_ws, ws_message

router = APIRouter()

#: Seconds between two stats broadcasts to a monitor.
STATS_INTERVAL_S = 2.0


#: How many jobs' submitting clients a monitor remembers (a cache in front of Redis).
CLIENT_CACHE = 10_000


@dataclass(eq=False)
class MonitorSession(ClientSession):
    """A monitor: a client that follows every job, and gets the stats and the workers'
    status reports."""

    clients: dict[str, str | None] = field(default_factory=dict)  # job id -> its client

    kind = "monitor"

    def follows(self, job_id: str) -> bool:
        """Every job."""
        return True

    def wanted(self, events: list[dict[str, Any]]) -> tuple[set[str], set[str]]:
        """Also the submitting clients of the jobs not met yet."""
        job_ids, names = super().wanted(events)
        unknown = {
            e["job"]
            for e in events
            if "job" in e and e["job"] not in self.clients and e.get("status") != "pending"
        }  # a pending job's event has no message: its client is read with the next one
        if unknown:
            return job_ids | unknown, names | {"client"}
        return job_ids, names

    def job_message(self, message: dict[str, Any], jobs: JobFields) -> dict[str, Any]:
        """Job messages as clients get them, plus the submitting client's id."""
        job_id = message["job_id"]
        if job_id not in self.clients:
            if len(self.clients) >= CLIENT_CACHE:
                self.clients.clear()
            job = jobs.get(job_id)
            self.clients[job_id] = (job.get("client") or None) if job is not None else None
        return {**message, "client_id": self.clients[job_id]}

    def translate(self, event: dict[str, Any], jobs: JobFields) -> list[dict[str, Any]]:
        """A job event, or a message for monitors only (`worker_status`,
        `connector_ws_status`, `service_request`, `worker_state`, `alert`: see
        EventBus.tell_monitors)."""
        if event["type"] == "monitor":
            return [event["message"]]
        return super().translate(event, jobs)


async def stats_broadcast(hub: Hub) -> dict[str, Any]:
    """The original stats message, from Redis and this replica's connections."""
    stats = await hub.broker.stats()
    live = await hub.broker.live_workers(fresh=True)
    workers = {}
    for worker_id, caps in sorted(live.items()):
        session = hub.dispatcher.sessions.get(worker_id)
        busy = bool(session and session.held)
        status = "busy" if busy else "idle"
        workers[worker_id] = {
            "status": status,
            "connection_status": status,
            "is_accepting_jobs": not busy and worker_id not in hub.broker.resting,
            # The original monitor page reads capabilities.supported_job_types.
            "capabilities": {
                **caps.model_dump(mode="json"),
                "supported_job_types": sorted(caps.services),
            },
            "supported_job_types": sorted(caps.services),
        }
    busy_workers = [w for w, info in workers.items() if info["status"] == "busy"]
    monitors = [m.client_id for m in hub.bus.monitors if isinstance(m, MonitorSession)]
    clients = sorted(
        {getattr(w, "client_id", "") for ws in hub.bus.watchers.values() for w in ws}
        - set(monitors)
    )
    return ws_message(
        "stats_broadcast",
        message_id=f"stats-{int(time.time())}",
        connections={
            "clients": clients,
            "workers": sorted(hub.dispatcher.sessions),
            "monitors": sorted(monitors),
        },
        workers=workers,
        system={
            "queues": {"priority": stats.pending, "standard": 0, "total": stats.pending},
            "jobs": {
                "total": stats.pending + stats.active + stats.delayed,
                "status": {
                    "pending": stats.pending,
                    "active": stats.active,
                    "delayed": stats.delayed,
                    "failed": stats.dead,
                },
                "active_jobs": [],
            },
            "workers": {
                "total": len(workers),
                "status": {"idle": len(workers) - len(busy_workers), "busy": len(busy_workers)},
                "active_workers": busy_workers,
            },
        },
    )


@router.websocket("/ws/monitor/{monitor_id}")
async def monitor_socket(websocket: WebSocket, monitor_id: str) -> None:
    """A monitor's connection."""
    hub: Hub = websocket.app.state.hub
    principal = await authenticate_ws(
        websocket, hub.tokens, hub.sockets, {Role.MONITOR, Role.ADMIN}
    )
    if principal is None:
        return
    await websocket.accept()
    session = MonitorSession(monitor_id, websocket, principal, hub)
    await session.send(
        ws_message(
            "connection_established", message=f"Welcome Monitor {monitor_id}! Connected to emp hub"
        )
    )
    await hub.bus.add_monitor(session)
    closed = asyncio.Event()

    async def broadcast() -> None:
        while not closed.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(closed.wait(), STATS_INTERVAL_S)
            if not closed.is_set():
                try:
                    await session.send(await stats_broadcast(hub))
                except Exception:  # the socket closed meanwhile
                    return

    ticker = asyncio.create_task(broadcast())
    try:
        await session.send(await stats_broadcast(hub))  # at once, then the ticker's
        while True:
            message = await hub.sockets.receive_json(websocket, session.error)
            kind = message.get("type") if isinstance(message, dict) else None
            if kind == "subscribe":
                await session.send(await stats_broadcast(hub))
                await session.send(
                    ws_message("subscription_confirmed", channels=message.get("channels") or [])
                )
            elif kind == "get_system_status":
                await session.send(await stats_broadcast(hub))
            elif kind == "stay_alive":
                await session.send(ws_message("stay_alive_response"))
            else:
                await session.error(f"Unsupported message type: {kind}")
    except WebSocketDisconnect:
        pass
    finally:
        closed.set()
        await hub.bus.remove_monitor(session)
        await session.close()
        await ticker  # ends by itself: a Redis read is never cut in half
