"""The worker WebSocket (`/ws/worker/{worker_id}`): registration, pulls, progress,
results, one handler per message type (`HANDLERS`). The dispatcher (emp_hub/dispatch.py)
feeds the connected workers their jobs."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis.exceptions
from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import ValidationError

import emp_hub
from emp_hub.auth import Role
from emp_hub.broker import (
    BrokerError,
    Completion,
    Failure,
    JobReport,
    JobStatus,
    Progress,
    Registration,
    StaleLease,
)
from emp_hub.dispatch import WorkerSession
from emp_hub.hub import Hub
from emp_hub.sockets import authenticate_ws, error_details, ws_message
from emp_protocol.hub_messages import (
    ConnectionEstablished,
    Error,
    JobCompletedAck,
    JobFailedAck,
    JobNotificationsSubscribed,
    JobReleased,
    WorkerControl,
    WorkerHeartbeatAck,
    WorkerIdAvailable,
    WorkerRegistered,
)
from emp_protocol.logs import WORKER_ID
from emp_protocol.messages import (
    PROTOCOL_VERSION,
    Batch,
    ClaimJob,
    CompleteJob,
    ConnectorWsStatus,
    FailJob,
    RegisterWorker,
    ReleaseJob,
    RequestJob,
    ServiceRequest,
    UpdateJobProgress,
    WorkerHeartbeat,
    WorkerMessage,
    WorkerStatus,
    worker_message,
)

log = logging.getLogger("emp_hub.ws")
#: A worker's messages on a job it holds that the broker records (Broker.report).
JobReportMessage = UpdateJobProgress | CompleteJob | FailJob
#: The metrics' outcome of an attempt that ended with this status (else "failed").
OUTCOMES = {JobStatus.COMPLETED: "completed", JobStatus.DELAYED: "retrying"}
router = APIRouter()

#: Close codes of the worker socket (and CLOSE_SUPERSEDED, in dispatch.py): refused,
#: because another process holds the worker id.
CLOSE_ID_IN_USE = 4409
#: Refused: the worker speaks another protocol version (HTTP's 426, upgrade required).
CLOSE_PROTOCOL_VERSION = 4426
#: A close the hub makes itself while it shuts down: its workers are not gone.
CLOSE_SERVICE_RESTART = 1012


@router.websocket("/ws/worker/{worker_id}")
async def worker_socket(websocket: WebSocket, worker_id: str) -> None:
    """A worker's connection: registration, pulls, progress, results."""
    hub: Hub = websocket.app.state.hub
    if await authenticate_ws(websocket, hub.tokens, hub.sockets, {Role.WORKER, Role.ADMIN}) is None:
        return
    await websocket.accept()
    # The connection's log lines (its feeder's and its jobs' too) name the worker.
    context = WORKER_ID.set(worker_id)
    session = WorkerSession(worker_id, websocket)
    await session.send(
        ConnectionEstablished(
            message=f"Welcome Worker {worker_id}! Connected to emp hub",
            protocol_version=PROTOCOL_VERSION,
            hub_version=emp_hub.__version__,
        )
    )
    dispatcher = hub.dispatcher
    feeder = asyncio.create_task(dispatcher.feed(session))
    code = 1006
    try:
        # The socket's frames as JSON (sockets.py): it reads with receive(), so a reply that
        # failed because the peer had just closed still leaves its close code to be read.
        while not session.closed:
            raw = await hub.sockets.receive_json(websocket, session.error)
            await handle(session, hub, raw)
    except WebSocketDisconnect as exc:
        code = exc.code
    finally:
        session.closed = True
        session.wake.set()
        await feeder  # it ends by itself: no Redis command is cut in half
        if dispatcher.sessions.get(worker_id) is session:
            del dispatcher.sessions[worker_id]
        if session.caps is not None and not session.superseded:
            await _disconnected(session, hub, code)
        WORKER_ID.reset(context)


async def _disconnected(session: WorkerSession, hub: Hub, code: int) -> None:
    """A registered worker's connection ended: gone at once if it said goodbye holding
    nothing; lost (gone after the reconnect grace) otherwise; and neither when the hub
    itself is shutting down (the worker reconnects to the next hub)."""
    if code == CLOSE_SERVICE_RESTART:
        return
    try:
        if code in {1000, 1001} and not session.held:
            await hub.broker.unregister_worker(session.worker_id, session.connection)
        else:
            await hub.dispatcher.lost(session)
    except redis.exceptions.RedisError:  # the lease and the worker TTL remain the guard
        log.warning("could not record that worker %s disconnected", session.worker_id)


def _refusal(worker_id: str, registration: Registration) -> Error:
    """The error that refuses a worker id another process holds."""
    if registration.holder_connected:
        recheck = registration.recheck_after  # through a replica that may have just died
        return Error(
            error=f"worker id {worker_id} is already connected from another process; give "
            "each worker process its own id (EMP_WORKER_ID)",
            code="worker_id_in_use",
            worker_id=worker_id,
            recheck_after=round(recheck, 3) if recheck else None,
        )
    left = registration.retry_after
    return Error(
        error=f"worker id {worker_id} is kept {left:.1f} s more for another process that lost "
        "its connection; retry then, or give this worker its own id (EMP_WORKER_ID)",
        code="worker_id_in_use",
        worker_id=worker_id,
        retry_after=round(left, 3),
    )


async def refuse(session: WorkerSession, registration: Registration) -> None:
    """Another process holds the worker id: say so, and close (4409)."""
    await session.send(_refusal(session.worker_id, registration))
    session.closed = True
    await session.websocket.close(CLOSE_ID_IN_USE, "worker id in use")


async def refuse_protocol(session: WorkerSession, version: int | None) -> None:
    """The worker speaks another protocol version: say both, and close (4426)."""
    error = (
        f"this worker speaks protocol {version}; this hub speaks protocol "
        f"{PROTOCOL_VERSION}: upgrade the older one"
    )
    await session.send(Error(error=error, code="protocol_version"))
    session.closed = True
    await session.websocket.close(CLOSE_PROTOCOL_VERSION, "protocol version")


async def handle(session: WorkerSession, hub: Hub, raw: Any) -> None:
    """Act on one message from a worker (a frame's JSON value): its type's handler in
    HANDLERS. Bad input gets an `error` and changes nothing."""
    message = await parse(session, raw)
    if message is None:
        return
    holding = bool(session.held)
    await dispatch(session, hub, message)
    if holding and not session.held:
        await hub.dispatcher.job_left(session)
    if session.original and not session.held and not session.offered and not session.wanted:
        session.wanted = 1  # idle again: offer the next job
        session.wake.set()


async def parse(session: WorkerSession, raw: Any) -> WorkerMessage | None:
    """The message a JSON value is, or None after telling the worker what is wrong."""
    if not isinstance(raw, dict) or not isinstance(raw.get("type"), str):
        await session.error("message must be a JSON object with a string `type`")
        return None
    try:
        message: WorkerMessage = worker_message.validate_python(raw)
    except ValidationError as exc:
        if "union_tag_invalid" in {e["type"] for e in exc.errors()}:
            await session.error(f"unknown message type: {raw['type']}")
        else:
            await session.error(f"invalid {raw['type']} message", error_details(exc))
        return None
    if session.caps is None and not isinstance(message, RegisterWorker):
        await session.error("register_worker first")
        return None
    return message


async def dispatch(session: WorkerSession, hub: Hub, message: WorkerMessage) -> None:
    """Run the message's handler; a broker refusal becomes an `error` message."""
    try:
        await HANDLERS[type(message)](session, hub, message)
    except StaleLease as exc:
        session.held.pop(getattr(message, "job_id", ""), None)
        await session.error(str(exc))
    except BrokerError as exc:
        await session.error(str(exc))


async def batch(session: WorkerSession, hub: Hub, message: Batch) -> None:
    """Several messages in one frame, handled in order; each run of job reports among them
    (progress, complete_job, fail_job) is one broker call, and gets no acknowledgement."""
    run: list[JobReportMessage] = []
    for raw in message.messages:
        inner = await parse(session, raw)
        if isinstance(inner, JobReportMessage):
            run.append(inner)
            continue
        await reports(session, hub, run, ack=False)
        run = []
        if isinstance(inner, Batch):
            await session.error("a batch cannot hold a batch")
        elif isinstance(inner, RegisterWorker):
            await session.error("register_worker cannot be part of a batch")
        elif inner is not None:
            await dispatch(session, hub, inner)
    await reports(session, hub, run, ack=False)


async def register(session: WorkerSession, hub: Hub, message: RegisterWorker) -> None:
    """Take the worker id (or say who holds it), keep the jobs it still runs."""
    if message.protocol_version not in {None, PROTOCOL_VERSION}:
        await refuse_protocol(session, message.protocol_version)
        return
    worker_id, broker = session.worker_id, hub.broker
    caps = message.worker_capabilities()
    registration = await broker.register_worker(
        worker_id,
        caps,
        instance=message.instance,
        connection=session.connection,
        dry_run=message.dry_run,
    )
    if message.dry_run:  # emp-worker doctor: could it register?
        await session.send(
            _refusal(worker_id, registration)
            if not registration.ok
            else WorkerIdAvailable(worker_id=worker_id)
        )
        return
    if not registration.ok:
        await refuse(session, registration)
        return
    session.caps = caps
    session.original = message.original
    session.batch = message.batch
    session.action = await broker.worker_state(worker_id)  # drained before: stays drained
    await hub.dispatcher.registered(session, registration)
    tokens = {h.job_id: h.lease_token for h in message.jobs}
    kept = await broker.extend(tokens.items())
    session.held.update(
        {job: token for (job, token), ok in zip(tokens.items(), kept, strict=True) if ok}
    )
    await session.send(
        WorkerRegistered(
            worker_id=worker_id, status="active", jobs=sorted(session.held), batch=True
        )
    )
    if message.subscribe_to_jobs:
        await session.send(JobNotificationsSubscribed(worker_id=worker_id))
    if session.action is not None:  # so that it does not ask for work
        await session.send(WorkerControl(worker_id=worker_id, action=session.action))


async def request_job(session: WorkerSession, hub: Hub, message: RequestJob) -> None:
    """Free slots: the dispatcher claims for them now or when jobs come; and prefetch,
    claimed now only."""
    note_loaded(session, message.loaded_models)
    session.request = message
    session.wake.set()


def note_loaded(session: WorkerSession, loaded: dict[str, list[str]] | None) -> None:
    """Remember the models the worker reports loaded (None: unchanged)."""
    if loaded is not None:
        session.loaded = {service: frozenset(models) for service, models in loaded.items()}


async def claim_job(session: WorkerSession, hub: Hub, message: ClaimJob) -> None:
    """An original worker takes the job it was offered."""
    await hub.dispatcher.take_offer(session, message.job_id)


async def heartbeat(
    session: WorkerSession, hub: Hub, message: WorkerHeartbeat | WorkerStatus
) -> None:
    """Alive: renew the worker and its leases (say which jobs it lost); a changed status
    goes to the monitors."""
    worker_id, broker = session.worker_id, hub.broker
    if isinstance(message, WorkerHeartbeat):
        note_loaded(session, message.loaded_models)
    await broker.touch_worker(worker_id)
    held = list(session.held.items())
    kept = await broker.extend(held)
    lost = [job for (job, _), ok in zip(held, kept, strict=True) if not ok]
    for job in lost:
        session.held.pop(job, None)
    if isinstance(message, WorkerHeartbeat):
        await session.send(WorkerHeartbeatAck(worker_id=worker_id, lost=lost))
    if isinstance(message, WorkerStatus) or message.status != session.status:
        session.status = message.status
        extra = message.model_extra or {}
        await hub.bus.tell_monitors(
            ws_message(
                "worker_status",
                message_id=f"worker-status-{int(time.time())}",
                worker_id=worker_id,
                status=message.status,
                connector_statuses=extra.get("connector_statuses"),
            )
        )


async def for_monitors(
    session: WorkerSession, hub: Hub, message: ConnectorWsStatus | ServiceRequest
) -> None:
    """The original worker's reports for monitors: passed on."""
    await hub.bus.tell_monitors({**message.model_dump(mode="json"), "worker_id": session.worker_id})


async def job_message(session: WorkerSession, hub: Hub, message: JobReportMessage) -> None:
    """Progress, result or failure of a job this connection holds."""
    await reports(session, hub, [message], ack=True)


async def reports(
    session: WorkerSession, hub: Hub, messages: list[JobReportMessage], *, ack: bool
) -> None:
    """Record a worker's reports on the jobs it holds, in one broker call; `ack`: answer
    each complete_job and fail_job (a single message; a batch gets no acks)."""
    sent: list[tuple[JobReportMessage, JobReport]] = []
    for message in messages:
        token = await held_token(session, message.job_id)
        if token is None:
            continue
        if isinstance(message, UpdateJobProgress) and message.progress < 0:  # keep-alive
            await hub.broker.extend([(message.job_id, token)])
        else:
            sent.append((message, _report(message, token)))
    if not sent:
        return
    results = await hub.broker.report([r for _, r in sent])
    ended: collections.Counter[tuple[str, str]] = collections.Counter()
    for (message, _), result in zip(sent, results, strict=True):
        if isinstance(result, BrokerError):
            if isinstance(result, StaleLease):
                session.held.pop(message.job_id, None)
                session.services.pop(message.job_id, None)
            await session.error(str(result))
        elif result is not JobStatus.ACTIVE:
            ended[await _finished(session, message, result, ack)] += 1
    for (service, outcome), n in ended.items():  # counted once a frame, not once a job
        hub.metrics.finished.labels(service, outcome).inc(n)
        if outcome != "retrying":
            hub.metrics.series.count(outcome, n)


async def held_token(session: WorkerSession, job_id: str) -> str | None:
    """The lease token of a job this connection holds; None after telling the worker it
    does not hold it."""
    token = session.held.get(job_id)
    if token is None:
        await session.error(f"worker {session.worker_id} does not hold job {job_id}")
    return token


def _report(message: JobReportMessage, token: str) -> JobReport:
    """The broker's report for a worker's message on a job it holds (`token`)."""
    if isinstance(message, UpdateJobProgress):
        details = (message.model_extra or {}).get("connector_details")
        return Progress(
            message.job_id, token, message.progress, message.message or "", message.status, details
        )
    if isinstance(message, CompleteJob):
        return Completion(message.job_id, token, message.result)
    return Failure(message.job_id, token, message.error, message.retryable)


async def _finished(
    session: WorkerSession,
    message: JobReportMessage,
    status: JobStatus,
    ack: bool,
) -> tuple[str, str]:
    """A held job's attempt ended (completed, or failed: retry or dead letter): it leaves
    the session; acknowledged when `ack`. Returns its service and outcome, to be counted."""
    job_id, worker_id = message.job_id, session.worker_id
    session.held.pop(job_id, None)
    service = session.services.pop(job_id, "unknown")
    outcome = OUTCOMES.get(status, "failed")
    if ack and isinstance(message, CompleteJob):
        await session.send(JobCompletedAck(job_id=job_id, worker_id=worker_id))
    elif ack and isinstance(message, FailJob):
        await session.send(
            JobFailedAck(job_id=job_id, worker_id=worker_id, error=message.error, status=status)
        )
    return service, outcome


async def release_job(session: WorkerSession, hub: Hub, message: ReleaseJob) -> None:
    """Hand a held job back: pending again, in its place."""
    token = await held_token(session, message.job_id)
    if token is None:
        return
    await hub.broker.release(message.job_id, token)
    del session.held[message.job_id]
    service = session.services.pop(message.job_id, "unknown")
    hub.metrics.finished.labels(service, "released").inc()
    await session.send(JobReleased(job_id=message.job_id, worker_id=session.worker_id))


#: The handler of each message type a worker sends.
HANDLERS: dict[type[Any], Callable[[WorkerSession, Hub, Any], Awaitable[None]]] = {
    RegisterWorker: register,
    RequestJob: request_job,
    ClaimJob: claim_job,
    WorkerHeartbeat: heartbeat,
    WorkerStatus: heartbeat,
    ConnectorWsStatus: for_monitors,
    ServiceRequest: for_monitors,
    UpdateJobProgress: job_message,
    CompleteJob: job_message,
    FailJob: job_message,
    ReleaseJob: release_job,
    Batch: batch,
}
