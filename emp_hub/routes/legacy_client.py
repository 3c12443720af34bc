"""The client WebSocket (`/ws/client/{client_id}`): the original emp-redis client protocol.

A client submits jobs and follows them: the submitter is subscribed to its job, and
`subscribe_job` / `request_job_status` subscribe to others (in the original they never
did); a job is followed until it ends. Job events come from the broker (published by its
scripts on the job's channel) through the replica's event bus (emp_hub/events.py), which
subscribes to a job's channel while someone on this replica follows it, so a client on one
replica follows a worker on another.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from emp_hub.auth import Principal, Role
from emp_hub.broker import (
    TERMINAL,
    BrokerError,
    DuplicateJob,
    InvalidState,
    JobNotFound,
    JobSpec,
    JobStatus,
    RateLimited,
)
from emp_hub.events import Outbox
from emp_hub.hub import Hub
from emp_hub.sockets import authenticate_ws, error_details, error_summary, ws_message
from emp_protocol.capabilities import matches

router = APIRouter()


def job_status(job_id: str, status: str, **fields: Any) -> dict[str, Any]:
    """A `response_job_status` message with every original field."""
    body = {
        "progress": None,
        "worker_id": None,
        "started_at": None,
        "completed_at": None,
        "result": None,
        "message": None,
        **fields,
    }
    return ws_message("response_job_status", job_id=job_id, status=status, **body)


#: A batch's jobs, read in one round trip: job id -> the fields asked for, or None for a
#: job that is gone (see Broker.job_fields).
JobFields = dict[str, dict[str, str | None] | None]


@dataclass(eq=False)
class ClientSession:
    """One connected client on this replica."""

    client_id: str
    websocket: WebSocket
    principal: Principal
    hub: Hub
    following: set[str] = field(default_factory=set)
    workers: dict[str, str] = field(default_factory=dict)  # job id -> worker (for progress)
    quiet_cancel: set[str] = field(default_factory=set)  # cancels this client already heard
    # Events of jobs being submitted, held until their job_accepted is sent.
    held: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    #: The events the bus gave this connection, waiting for its sender task.
    outbox: Outbox = field(init=False)

    #: How the outbox's warnings name this connection.
    kind = "client"

    def __post_init__(self) -> None:
        self.outbox = Outbox(f"{self.kind} {self.client_id}", self.send_events)

    async def close(self) -> None:
        """The connection ended: stop its sender, and follow nothing."""
        await self.outbox.close()
        await self.unfollow_all()

    async def send(self, message: dict[str, Any]) -> None:
        """Send one message."""
        await self.websocket.send_text(json.dumps(message))

    def job_message(self, message: dict[str, Any], jobs: JobFields) -> dict[str, Any]:
        """A message about a followed job, as sent (monitors add who submitted it)."""
        return message

    async def error(self, error: str, details: Any = None) -> None:
        """An `error` message; the connection stays open."""
        await self.send(ws_message("error", error=error, details=details))

    async def follow(self, job_id: str, worker: str | None = None) -> None:
        """Receive this job's events from now on (`worker`: who runs it now)."""
        if worker:
            self.workers[job_id] = worker
        self.following.add(job_id)
        await self.hub.bus.watch(job_id, self)

    def forget(self, job_id: str) -> None:
        """Stop following a job, on this side (`unfollow` tells the bus too)."""
        self.following.discard(job_id)
        self.workers.pop(job_id, None)
        self.quiet_cancel.discard(job_id)

    async def unfollow(self, job_id: str) -> None:
        """Stop following a job (it ended, or the connection did)."""
        self.forget(job_id)
        await self.hub.bus.unwatch(job_id, self)

    async def unfollow_all(self) -> None:
        """The connection ended."""
        for job_id in list(self.following):
            await self.unfollow(job_id)

    def forward(self, event: dict[str, Any]) -> None:
        """Take a broker event of a followed job (from the bus's listener: it only queues
        it; the sender task translates it)."""
        job_id = event.get("job")
        if job_id is not None and job_id in self.held:
            self.held[job_id].append(event)
        else:
            self.outbox.put(event)

    def follows(self, job_id: str) -> bool:
        """Whether this connection still wants this job's events (a client stops at the
        job's end; a monitor never does)."""
        return job_id in self.following

    def wanted(self, events: list[dict[str, Any]]) -> tuple[set[str], set[str]]:
        """The jobs a batch needs read from Redis, and their fields: who ran completed
        jobs and their results."""
        done = {e["job"] for e in events if e.get("status") == "completed"}
        return done, {"worker", "result"} if done else set()

    async def send_events(self, events: list[dict[str, Any]]) -> None:
        """Translate a batch of events into the original messages and send them: the
        batch's Redis reads first, in one round trip, then the sends; the jobs that ended
        are unfollowed after."""
        job_ids, names = self.wanted(events)
        jobs = await self.hub.broker.job_fields(job_ids, sorted(names))
        messages: list[dict[str, Any]] = []
        ended: list[str] = []
        for event in events:
            messages.extend(self.translate(event, jobs))
            job_id = event.get("job")
            if job_id is not None and event.get("status") in TERMINAL:
                self.forget(job_id)
                ended.append(job_id)
        for message in messages:
            await self.send(message)
        for job_id in ended:
            if job_id not in self.following:  # not followed again meanwhile
                await self.hub.bus.unwatch(job_id, self)

    def translate(self, event: dict[str, Any], jobs: JobFields) -> list[dict[str, Any]]:
        """What one event means in the original protocol (no message, or one)."""
        job_id = event.get("job")
        if job_id is None or not self.follows(job_id):
            return []
        message = self.job_event_message(job_id, event, jobs)
        return [] if message is None else [self.job_message(message, jobs)]

    def job_event_message(
        self, job_id: str, event: dict[str, Any], jobs: JobFields
    ) -> dict[str, Any] | None:
        """The original message for one event of a followed job, if it has one."""
        if event["type"] == "progress":
            return ws_message(
                "update_job_progress",
                job_id=job_id,
                worker_id=self.workers.get(job_id),
                progress=float(event["progress"]),
                status=event.get("stage") or "processing",
                message=event.get("message") or None,
                connector_details=json.loads(event["details"]) if event.get("details") else None,
            )
        status = event.get("status")
        if status == "active":
            self.workers[job_id] = event.get("worker", "")
            return job_status(job_id, "processing", worker_id=event.get("worker"))
        if status == "completed":
            job = jobs.get(job_id)
            if job is None:  # gone already: the original said nothing either
                return None
            stored = job.get("result")
            result = json.loads(stored) if stored else None
            return ws_message(
                "complete_job", job_id=job_id, worker_id=job.get("worker") or None, result=result
            )
        if status == "failed":
            return ws_message(
                "fail_job",
                job_id=job_id,
                worker_id=self.workers.get(job_id),
                error=event.get("error"),
            )
        if status == "delayed":
            return ws_message(
                "update_job_progress",
                job_id=job_id,
                worker_id=self.workers.get(job_id),
                progress=0,
                status="retrying",
                message=event.get("error"),
                connector_details=None,
            )
        if status == "cancelled" and job_id not in self.quiet_cancel:
            return job_status(job_id, "cancelled", message=f"Job cancelled: {event.get('reason')}")
        return None


@router.websocket("/ws/client/{client_id}")
async def client_socket(websocket: WebSocket, client_id: str) -> None:
    """A client's connection: submit jobs and follow them."""
    hub: Hub = websocket.app.state.hub
    principal = await authenticate_ws(websocket, hub.tokens, hub.sockets, {Role.CLIENT, Role.ADMIN})
    if principal is None:
        return
    await websocket.accept()
    session = ClientSession(client_id, websocket, principal, hub)
    await session.send(
        ws_message(
            "connection_established", message=f"Welcome Client {client_id}! Connected to emp hub"
        )
    )
    try:
        while True:
            await handle(session, hub, await hub.sockets.receive_json(websocket, session.error))
    except WebSocketDisconnect:
        pass
    finally:
        await session.close()


async def handle(session: ClientSession, hub: Hub, message: Any) -> None:
    """Act on one client message (a frame's JSON value): its type's handler in HANDLERS;
    bad input gets an `error` and changes nothing."""
    if not isinstance(message, dict):
        await session.error("Invalid message: expected a JSON object")
        return
    kind = message.get("type")
    if not isinstance(kind, str):
        await session.error("Invalid message: `type` must be a string")
        return
    handler = HANDLERS.get(kind)
    if handler is None:
        await session.error(f"Unsupported message type: {kind}")
        return
    job_id = message.get("job_id")
    if kind in NEEDS_JOB_ID and not isinstance(job_id, str):
        await session.error(f"Missing job_id in {kind} request")
        return
    try:
        await handler(session, hub, message)
    except JobNotFound:
        await session.error(f"Job {job_id} not found")
    except BrokerError as exc:
        await session.error(str(exc))


async def request_job_status(session: ClientSession, hub: Hub, message: dict[str, Any]) -> None:
    """The job's status now; the client follows the job from then on."""
    job = await visible(session, hub, message["job_id"])
    await session.follow(job.id, job.worker)
    await session.send(
        job_status(
            job.id,
            job.status.value,
            progress=job.progress,
            worker_id=job.worker,
            started_at=job.started_at,
            completed_at=job.finished_at if job.status is JobStatus.COMPLETED else None,
            result=job.result,
            message=job.message,
        )
    )


async def subscribe_job(session: ClientSession, hub: Hub, message: dict[str, Any]) -> None:
    """Follow a job."""
    job = await visible(session, hub, message["job_id"])
    await session.follow(job.id, job.worker)
    await session.send(
        ws_message("subscription_confirmed", job_id=job.id, monitor_id=None, channels=None)
    )


async def cancel_job(session: ClientSession, hub: Hub, message: dict[str, Any]) -> None:
    """Cancel a job (see `cancel`)."""
    reason = str(message.get("reason") or "Manually cancelled")
    await cancel(session, hub, message["job_id"], reason)


async def force_retry_job(session: ClientSession, hub: Hub, message: dict[str, Any]) -> None:
    """Retry a failed job, or one waiting after failures, on any worker."""
    job = await visible(session, hub, message["job_id"])
    waiting = job.status in {JobStatus.DELAYED, JobStatus.PENDING} and job.failures
    if job.status is JobStatus.FAILED or waiting:
        await hub.broker.retry(job.id)
        await session.send(
            job_status(
                job.id,
                "pending",
                message="Job failure history cleared. Job can now be assigned to any worker.",
            )
        )
    else:
        await session.send(
            job_status(job.id, job.status.value, message="Job has no failure history to clear.")
        )


async def stay_alive(session: ClientSession, hub: Hub, message: dict[str, Any]) -> None:
    """The original client's keep-alive."""
    await session.send(job_status("keep-alive", "acknowledged", message="Connection is alive"))


async def subscribe_stats(session: ClientSession, hub: Hub, message: dict[str, Any]) -> None:
    """Confirmed, as the original did (stats go to monitors only)."""
    await session.send(
        ws_message("subscription_confirmed", job_id="stats", monitor_id=None, channels=["stats"])
    )


async def request_stats(session: ClientSession, hub: Hub, message: dict[str, Any]) -> None:
    """Refused, as the original did."""
    await session.error("Stats requests are restricted to monitors only")


async def visible(session: ClientSession, hub: Hub, job_id: str) -> Any:
    """The job, if this client may see it (JobNotFound otherwise)."""
    job = await hub.broker.get(job_id)
    if not session.principal.may_see(job.customer):
        raise JobNotFound(job_id)
    return job


async def submit(session: ClientSession, hub: Hub, message: dict[str, Any]) -> None:
    """submit_job: accept, follow, and say where the job stands. It spends the token's
    submission allowance, as an HTTP submit does."""
    job_id = message.get("message_id") or f"job-{uuid.uuid4()}"
    try:
        spec = JobSpec(
            id=job_id,
            service=message.get("job_type") or "",
            payload=message.get("payload") or {},
            priority=message.get("priority") or 0,
            customer=session.principal.customer,
            client_id=session.client_id,
            urgency=message.get("urgency"),
            deadline=message.get("deadline"),
            deadline_in_s=message.get("deadline_in_s"),
            tier=session.principal.tier,
        )
    except ValidationError as exc:
        details = error_details(exc, {"id": "message_id", "service": "job_type"})
        await session.error(f"Invalid submit_job: {error_summary(details)}", details)
        return
    # Follow the job before it exists (its first events may come at once), and hold its
    # events until the client has its job_accepted.
    known = job_id in session.following
    session.held[job_id] = []
    await session.follow(job_id)
    try:
        [submitted] = await hub.submit([spec], session.principal.token_id)
    except (DuplicateJob, RateLimited) as exc:
        session.held.pop(job_id, None)
        if not known:
            await session.unfollow(job_id)
        if isinstance(exc, RateLimited):
            await session.error(str(exc))
        else:
            await session.error(f"Job id {job_id} already exists; choose another message_id")
        return
    except BaseException:
        session.held.pop(job_id, None)
        if not known:
            await session.unfollow(job_id)
        raise
    hub.metrics.submitted.labels(spec.service).inc()
    position = submitted.position
    requirements = spec.job_requirements()
    live = await hub.broker.live_workers()
    able = sum(1 for caps in live.values() if matches(requirements, caps))
    await session.send(
        ws_message(
            "job_accepted",
            job_id=submitted.id,
            status="pending",
            position=None if position is None else position + 1,
            estimated_start=None,
            notified_workers=able,
        )
    )
    for event in session.held.pop(job_id, []):
        session.forward(event)


async def cancel(session: ClientSession, hub: Hub, job_id: str, reason: str) -> None:
    """cancel_job: answered once (the original answered twice); its worker is told."""
    try:
        job = await visible(session, hub, job_id)
        session.quiet_cancel.add(job_id)
        await hub.cancel(job, reason)
    except (JobNotFound, InvalidState):
        session.quiet_cancel.discard(job_id)
        await session.error(
            f"Failed to cancel job {job_id}. Job may not exist or is already in a terminal state."
        )
        return
    await session.send(job_status(job_id, "cancelled", message=f"Job cancelled: {reason}"))


#: The handler of each message type a client sends, and the types that name a job.
HANDLERS: dict[str, Callable[[ClientSession, Hub, dict[str, Any]], Awaitable[None]]] = {
    "submit_job": submit,
    "request_job_status": request_job_status,
    "subscribe_job": subscribe_job,
    "cancel_job": cancel_job,
    "force_retry_job": force_retry_job,
    "stay_alive": stay_alive,
    "subscribe_stats": subscribe_stats,
    "request_stats": request_stats,
}
NEEDS_JOB_ID = {"request_job_status", "subscribe_job", "cancel_job", "force_retry_job"}
