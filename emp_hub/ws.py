"""The worker WebSocket (`/ws/worker/{worker_id}`) and the dispatcher that feeds it.

Pull model: a worker says how many slots are free (`request_job`); the hub claims the best
matching jobs atomically and sends `job_assigned` (with the lease token). With nothing to
do, the request stays parked in this replica; the broker's scripts publish the classes of
jobs that become pending (channel `{namespace}:work`), and every replica wakes the parked
workers that match them. Nobody polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis.exceptions
from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import ValidationError
from starlette.websockets import WebSocketDisconnected

import emp_hub
from emp_hub.app import REDIS_DOWN, Hub
from emp_hub.auth import Principal, Role
from emp_hub.broker import BrokerError, Claim, Job, JobStatus, Registration, StaleLease
from emp_hub.ws_common import error_details, ws_message
from emp_protocol.capabilities import WorkerCapabilities
from emp_protocol.hub_messages import (
    CancelJob,
    ConnectionEstablished,
    Error,
    HubMessage,
    JobAssigned,
    JobAvailable,
    JobCompletedAck,
    JobFailedAck,
    JobNotificationsSubscribed,
    JobReleased,
    WorkerHeartbeatAck,
    WorkerIdAvailable,
    WorkerRegistered,
)
from emp_protocol.messages import (
    PROTOCOL_VERSION,
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
    WorkerStatus,
    worker_message,
)

log = logging.getLogger("emp_hub.ws")
router = APIRouter()

#: A parked request is retried about this often even without a wake-up, in case an
#: announcement was missed (jittered, so thousands of idle workers do not claim in step).
SAFETY_WAKE_S = 60.0
#: How long a job offered to an original worker (job_available) stays reserved for it.
OFFER_S = 10.0
#: An offer's lease outlasts its reservation by this much (see Dispatcher.feed).
OFFER_GRACE_S = 5.0
#: How long a submit waits for the workers it woke on this replica to get their jobs.
FEED_WAIT_S = 0.01
#: Close codes of the worker socket: superseded by a newer connection of the same process;
#: refused, because another process holds the worker id.
CLOSE_SUPERSEDED = 4000
CLOSE_ID_IN_USE = 4409
#: Refused: the worker speaks another protocol version (HTTP's 426, upgrade required).
CLOSE_PROTOCOL_VERSION = 4426
#: A close the hub makes itself while it shuts down: its workers are not gone.
CLOSE_SERVICE_RESTART = 1012


class Watcher(Protocol):
    """A connection that follows jobs (a client; see ws_client.py)."""

    async def forward(self, event: dict[str, Any]) -> None:
        """Send the peer what this event means to it."""


@dataclass(eq=False)
class WorkerSession:
    """One connected worker on this replica."""

    worker_id: str
    websocket: WebSocket
    #: Names this socket in the worker id's owner record (see Broker.register_worker).
    connection: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    caps: WorkerCapabilities | None = None  # set once registered
    held: dict[str, str] = field(default_factory=dict)  # job id -> lease token
    services: dict[str, str] = field(default_factory=dict)  # job id -> service (metrics)
    wanted: int = 0
    original: bool = False  # an original emp-redis worker: offers, then claim_job
    offered: dict[str, str] = field(default_factory=dict)  # job id -> token, reserved
    status: str = ""  # the last status it reported (idle/busy), as monitors last heard it
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    fed: asyncio.Event = field(default_factory=asyncio.Event)  # set after each feeding
    closed: bool = False
    superseded: bool = False  # a newer connection of the same worker process took over
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def send(self, message: HubMessage) -> bool:
        """Send one message (serialised: the feeder and the receive loop both send).
        False when the peer has closed: the receive loop still reads what it sent before
        closing, and how it closed (a failed reply must not hide a clean goodbye)."""
        async with self.send_lock:
            try:
                await self.websocket.send_text(json.dumps(message.model_dump(mode="json")))
            except (WebSocketDisconnect, WebSocketDisconnected):
                return False
        return True

    async def error(self, error: str, details: Any = None) -> None:
        """An `error` message; the connection stays open."""
        await self.send(Error(error=error, details=details))


class Dispatcher:
    """This replica's connected workers, woken by the broker's announcements."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.sessions: dict[str, WorkerSession] = {}
        # Client connections following a job (ws_client.py), by job id; monitors follow all.
        # This replica subscribes to a job's event channel only while someone here follows
        # the job, and to all of them only while a monitor is connected: a replica nobody
        # watches through decodes no job events at all.
        self.watchers: dict[str, set[Watcher]] = {}
        self.monitors: set[Watcher] = set()
        self._pubsub = hub.redis.pubsub()
        # Set once listen() holds the pub/sub connection: before that, a subscription from
        # another task would open a second connection (redis-py keeps only one of them).
        self._listening = asyncio.Event()
        self._confirmations: dict[str, asyncio.Future[None]] = {}
        self._turn = 0
        self._stopping = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()
        # Lost workers' graces end in bursts (a network blip drops many sockets at once):
        # one requeue pass and one notice serve every grace that ended before it started.
        self._grace_pass = asyncio.Lock()
        self._grace_pass_started = float("-inf")
        # Jobs submitted through this replica wake its workers without the pub/sub round
        # trip; the announcement that comes back with this broker's origin is skipped.
        hub.broker.on_submit = self.wake_for_submit

    async def watch(self, job_id: str, watcher: Watcher) -> None:
        """Send this job's events to `watcher` from now on."""
        watchers = self.watchers.setdefault(job_id, set())
        watchers.add(watcher)
        if len(watchers) == 1:
            await self._subscribe(self.hub.broker.key("job_channel", job_id))

    async def unwatch(self, job_id: str, watcher: Watcher) -> None:
        """Stop sending this job's events to `watcher`."""
        watchers = self.watchers.get(job_id)
        if watchers is None:
            return
        watchers.discard(watcher)
        if not watchers:
            del self.watchers[job_id]
            await self._unsubscribe(self.hub.broker.key("job_channel", job_id))

    async def add_monitor(self, monitor: Watcher) -> None:
        """A monitor: every job's events, and the messages for monitors."""
        self.monitors.add(monitor)
        if len(self.monitors) == 1:
            await self._subscribe(self.hub.broker.key("job_channel", "*"), pattern=True)

    async def remove_monitor(self, monitor: Watcher) -> None:
        """The monitor went away."""
        self.monitors.discard(monitor)
        if not self.monitors:
            await self._unsubscribe(self.hub.broker.key("job_channel", "*"), pattern=True)

    async def _subscribe(self, channel: str, *, pattern: bool = False) -> None:
        """Subscribe, and return once Redis confirmed it (events published after this
        returns reach this replica)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._listening.wait(), 5)
        confirmed = asyncio.get_running_loop().create_future()
        self._confirmations[channel] = confirmed
        if pattern:
            await self._pubsub.psubscribe(channel)
        else:
            await self._pubsub.subscribe(channel)
        try:
            await asyncio.wait_for(confirmed, 5)
        except TimeoutError:
            log.warning("Redis did not confirm the subscription to %s in 5 s", channel)
        finally:
            self._confirmations.pop(channel, None)

    async def _unsubscribe(self, channel: str, *, pattern: bool = False) -> None:
        """Unsubscribe; a connection already closed (the hub stopping) has nothing to undo."""
        with contextlib.suppress(redis.exceptions.RedisError, OSError):
            if pattern:
                await self._pubsub.punsubscribe(channel)
            else:
                await self._pubsub.unsubscribe(channel)

    async def listen(self, stop: asyncio.Event) -> None:
        """Follow the work, cancel, monitor and watched jobs' channels until `stop`."""
        broker = self.hub.broker
        pubsub = self._pubsub
        await pubsub.subscribe(
            broker.key("work_channel"),
            broker.key("cancel_channel"),
            broker.key("monitor_channel"),
            broker.key("workers_channel"),
        )
        self._listening.set()
        lost = False
        try:
            while not stop.is_set():
                try:
                    message = await pubsub.get_message(timeout=0.5)
                except REDIS_DOWN:
                    # Redis went away: redis-py resubscribes when it is back. Whatever was
                    # announced meanwhile is lost, so every parked worker claims once more
                    # when it is back.
                    log.warning("lost the announcement channels; reconnecting")
                    await asyncio.sleep(0.5)
                    lost = True
                    continue
                if lost:
                    lost = False
                    self.wake_all()
                if message is None:
                    continue
                kind, channel = message["type"], message["channel"]
                if kind in {"subscribe", "psubscribe"}:
                    confirmed = self._confirmations.get(channel)
                    if confirmed is not None and not confirmed.done():
                        confirmed.set_result(None)
                elif kind in {"unsubscribe", "punsubscribe"}:
                    pass
                elif kind == "pmessage":  # every job's events: for the monitors
                    await self.forward(json.loads(message["data"]), self.monitors)
                elif channel == broker.key("work_channel"):
                    origin, *items = message["data"].split()
                    if origin != broker.origin:  # our own submits woke our workers already
                        announced = [item.rpartition(":") for item in items]
                        await self.wake({c: int(n) for c, _, n in announced})
                elif channel == broker.key("cancel_channel"):
                    await self.tell_cancel(json.loads(message["data"]))
                elif channel == broker.key("monitor_channel"):
                    await self.forward(json.loads(message["data"]), self.monitors)
                elif channel == broker.key("workers_channel"):
                    await self.on_worker_notice(json.loads(message["data"]))
                else:  # a watched job's events
                    event = json.loads(message["data"])
                    await self.forward(event, self.watchers.get(event["job"], ()))
        finally:
            self._stopping.set()
            await asyncio.gather(*self._background, return_exceptions=True)
            await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _spawn(self, work: Any) -> None:
        """Run a coroutine in the background (kept until it ends; awaited at shutdown)."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _notify_workers_channel(self, notice: dict[str, str]) -> None:
        """Tell every replica (this one too) about a worker: replaced or gone."""
        await self.hub.redis.publish(self.hub.broker.key("workers_channel"), json.dumps(notice))

    async def on_worker_notice(self, notice: dict[str, str]) -> None:
        """`replaced`: close the superseded socket if it is here. `gone`: a worker left
        the live set, so jobs that avoided the workers that failed them may now go to them:
        every parked worker claims again."""
        if notice["event"] == "replaced":
            session = self.sessions.get(notice["worker"])
            if session is not None and session.connection == notice["connection"]:
                self.supersede(session)
        elif notice["event"] == "gone":
            await self.hub.broker.live_workers(fresh=True)
            self.wake_all()

    def supersede(self, session: WorkerSession) -> None:
        """A newer connection of the same worker process took over: close this one (in
        the background: a dead peer would hold up the closing handshake)."""
        session.superseded = session.closed = True
        session.wake.set()
        if self.sessions.get(session.worker_id) is session:
            del self.sessions[session.worker_id]

        async def close() -> None:
            with contextlib.suppress(Exception):
                await session.websocket.close(CLOSE_SUPERSEDED, "replaced by a new connection")

        self._spawn(close())

    async def registered(self, session: WorkerSession, registration: Registration) -> None:
        """The session owns its worker id now: feed it, and close the one it replaced."""
        previous = self.sessions.get(session.worker_id)
        self.sessions[session.worker_id] = session
        if previous is not None and previous is not session:
            self.supersede(previous)
        elif registration.replaced and registration.replaced != session.connection:
            await self._notify_workers_channel(
                {
                    "event": "replaced",
                    "worker": session.worker_id,
                    "connection": registration.replaced,
                }
            )

    async def lost(self, session: WorkerSession) -> None:
        """The session's connection ended without a goodbye: after the reconnect grace,
        unless the worker came back, its jobs go back to pending and it no longer counts."""
        broker = self.hub.broker
        if not await broker.worker_lost(
            session.worker_id, session.connection, session.held.items()
        ):
            return  # a newer connection holds the id

        async def after_grace() -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._stopping.wait(), broker.settings.reconnect_grace_s + 0.05
                )
                return  # the hub is stopping; the leases and the next hub take care
            grace_ended = time.monotonic()
            async with self._grace_pass:
                if self._grace_pass_started >= grace_ended:
                    return  # a pass that started after this grace ended has done it
                self._grace_pass_started = time.monotonic()
                try:
                    await broker.maintain()  # requeues the leases that just ran out
                    await self._notify_workers_channel(
                        {"event": "gone", "worker": session.worker_id}
                    )
                except redis.exceptions.RedisError:
                    log.warning("could not requeue the jobs of lost worker %s", session.worker_id)

        self._spawn(after_grace())

    async def wake(self, jobs: dict[str, int]) -> list[WorkerSession]:
        """Wake parked workers that can run the new jobs (class -> how many): as many free
        slots as there are jobs, not every matching worker (no thundering herd). Sessions
        are visited from a rotating start, so the waiting is shared out. Returns them."""
        broker = self.hub.broker
        if any(c not in broker.known_classes for c in jobs):
            await broker.refresh_classes()
        left = dict(jobs)
        woken: list[WorkerSession] = []
        sessions = list(self.sessions.values())
        self._turn = (self._turn + 1) % max(1, len(sessions))
        for session in sessions[self._turn :] + sessions[: self._turn]:
            if not session.wanted or session.caps is None or session.wake.is_set():
                continue
            for c in broker.matching_classes(session.caps):
                if left.get(c, 0) > 0:
                    left[c] -= min(left[c], session.wanted)
                    session.fed.clear()
                    session.wake.set()
                    woken.append(session)
                    break
            if not any(left.values()):
                break
        return woken

    async def wake_for_submit(self, jobs: dict[str, int]) -> None:
        """Jobs were submitted through this replica: wake its parked workers and let them
        claim and send their assignments (for at most FEED_WAIT_S) before the submitting
        request goes on to build its answer, so the answer does not delay the work."""
        woken = await self.wake(jobs)
        if woken:
            waits = [asyncio.ensure_future(s.fed.wait()) for s in woken]
            _done, pending = await asyncio.wait(waits, timeout=FEED_WAIT_S)
            for waiter in pending:
                waiter.cancel()

    def wake_all(self) -> None:
        """Wake every parked worker (after announcements may have been missed)."""
        for session in self.sessions.values():
            if session.wanted:
                session.wake.set()

    async def forward(self, event: dict[str, Any], watchers: Iterable[Watcher]) -> None:
        """Pass an event to the connections that follow it."""
        for watcher in list(watchers):
            try:
                await watcher.forward(event)
            except Exception:  # a peer that just went away must not stop the others
                log.debug("could not forward an event", exc_info=True)

    async def tell_cancel(self, notice: dict[str, str]) -> None:
        """Tell the worker running a cancelled job, if it is connected here."""
        session = self.sessions.get(notice["worker"])
        job_id = notice["job_id"]
        if session is not None and session.held.pop(job_id, None) is not None:
            await session.send(CancelJob(job_id=job_id, reason=notice.get("reason", "cancelled")))

    async def feed(self, session: WorkerSession) -> None:
        """Claim jobs for the session's free slots whenever it is woken."""
        while not session.closed:
            with contextlib.suppress(TimeoutError):  # asyncio.timeout: no extra task per wait
                async with asyncio.timeout(SAFETY_WAKE_S * random.uniform(0.5, 1.5)):
                    await session.wake.wait()
            session.wake.clear()
            try:
                if not session.closed and session.wanted and session.caps is not None:
                    await self._claim_for(session)
            except REDIS_DOWN as exc:  # claimed again when woken once Redis is back
                log.warning("no claim for %s: %s", session.worker_id, exc)
            finally:
                session.fed.set()

    async def _claim_for(self, session: WorkerSession) -> None:
        """Claim jobs for the session's free slots and hand them over."""
        assert session.caps is not None
        started = time.perf_counter()
        # An offer to an original worker is leased past its reservation, so that an
        # unclaimed offer is handed back by withdraw(), not reaped as a lost worker.
        claims = await self.hub.broker.claim_many(
            session.worker_id,
            session.caps,
            session.wanted,
            lease_s=OFFER_S + OFFER_GRACE_S if session.original else None,
        )
        self.hub.metrics.claim_seconds.observe(time.perf_counter() - started)
        for claim in claims:
            session.wanted -= 1
            if session.original:
                await self.offer(session, claim)
            else:
                await self.assign(session, claim.job, claim.token)

    async def assign(self, session: WorkerSession, job: Job, token: str) -> None:
        """The worker holds the job now: remember its token, tell the worker."""
        self.hub.metrics.submit_to_start.observe((job.claimed_at or 0) - job.created_at)
        session.held[job.id] = token
        session.services[job.id] = job.service
        delivered = await session.send(
            JobAssigned(
                job_id=job.id,
                worker_id=session.worker_id,
                job_type=job.service,
                priority=job.priority,
                params=job.payload,
                lease_token=token,
                attempt=job.attempt,
                timeout=job.timeout,
                lease_expires=job.lease_expires,
                created_at=job.created_at,
            )
        )
        if not delivered:  # the worker has just gone: the job goes straight back
            session.held.pop(job.id, None)
            session.services.pop(job.id, None)
            with contextlib.suppress(BrokerError):
                await self.hub.broker.release(job.id, token)

    async def offer(self, session: WorkerSession, claim: Claim) -> None:
        """Offer a job to an original worker: it is reserved for it for OFFER_S;
        claim_job confirms it, silence hands it back."""
        job = claim.job
        session.offered[job.id] = claim.token
        await session.send(
            JobAvailable(
                job_id=job.id,
                job_type=job.service,
                priority=job.priority,
                job_request_payload=job.payload,
            )
        )
        asyncio.get_running_loop().call_later(
            OFFER_S, lambda: asyncio.ensure_future(self.withdraw(session, job.id))
        )

    async def withdraw(self, session: WorkerSession, job_id: str) -> None:
        """The offer ran out unclaimed: hand the job back, offer the next one."""
        token = session.offered.pop(job_id, None)
        if token is None:
            return
        with contextlib.suppress(BrokerError):
            await self.hub.broker.release(job_id, token)
        if not session.closed and not session.held:
            session.wanted = 1
            session.wake.set()

    async def take_offer(self, session: WorkerSession, job_id: str) -> None:
        """claim_job: the original worker takes the job it was offered."""
        token = session.offered.pop(job_id, None)
        if token is None:
            await session.error(f"job {job_id} is not offered to worker {session.worker_id}")
            return
        [still_held] = await self.hub.broker.extend([(job_id, token)])  # a full lease now
        if not still_held:
            await session.error(f"job {job_id} is no longer available")
            return
        await self.assign(session, await self.hub.broker.get(job_id), token)


async def authenticate_ws(websocket: WebSocket, hub: Hub, roles: set[Role]) -> Principal | None:
    """The caller of a WebSocket (token in ?token= or Authorization: Bearer), whose token
    is re-checked while the socket is open (hub.sockets). On failure, answer as the
    original hub did (an `error` message, with `code: auth_failed`, the `cause`: missing,
    invalid or role, and the roles it `needs`), then close (1008)."""
    token = websocket.query_params.get("token")
    header = websocket.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        token = header[7:].strip()
    principal = await hub.tokens.authenticate(token)
    if principal is not None and principal.role in roles:
        hub.sockets.add(websocket, principal)
        return principal
    needs = " or ".join(sorted(r.value for r in roles))
    if principal is None:  # the original hub's words, for missing and unknown tokens alike
        cause, text = ("missing" if not token else "invalid"), "Invalid token"
    else:
        cause = "role"
        text = f"this token has role {principal.role.value}; this route needs role {needs}"
    await websocket.accept()
    error = Error(
        error=f"Authentication failed: {text}", code="auth_failed", cause=cause, needs=needs
    )
    await websocket.send_text(json.dumps(error.model_dump(mode="json")))
    await websocket.close(code=1008)
    return None


@router.websocket("/ws/worker/{worker_id}")
async def worker_socket(websocket: WebSocket, worker_id: str) -> None:
    """A worker's connection: registration, pulls, progress, results."""
    hub: Hub = websocket.app.state.hub
    dispatcher: Dispatcher = websocket.app.state.dispatcher
    if await authenticate_ws(websocket, hub, {Role.WORKER, Role.ADMIN}) is None:
        return
    await websocket.accept()
    session = WorkerSession(worker_id, websocket)
    await session.send(
        ConnectionEstablished(
            message=f"Welcome Worker {worker_id}! Connected to emp hub",
            protocol_version=PROTOCOL_VERSION,
            hub_version=emp_hub.__version__,
        )
    )
    feeder = asyncio.create_task(dispatcher.feed(session))
    code = 1006
    try:
        # The socket's frames as JSON (ws_common): it reads with receive(), so a reply that
        # failed because the peer had just closed still leaves its close code to be read.
        while not session.closed:
            raw = await dispatcher.hub.sockets.receive_json(websocket, session.error)
            await handle(session, dispatcher, raw)
    except WebSocketDisconnect as exc:
        code = exc.code
    finally:
        session.closed = True
        session.wake.set()
        await feeder  # it ends by itself: no Redis command is cut in half
        if dispatcher.sessions.get(worker_id) is session:
            del dispatcher.sessions[worker_id]
        if session.caps is not None and not session.superseded:
            await _disconnected(session, dispatcher, code)


async def _disconnected(session: WorkerSession, dispatcher: Dispatcher, code: int) -> None:
    """A registered worker's connection ended: gone at once if it said goodbye holding
    nothing; lost (gone after the reconnect grace) otherwise; and neither when the hub
    itself is shutting down (the worker reconnects to the next hub)."""
    if code == CLOSE_SERVICE_RESTART:
        return
    broker = dispatcher.hub.broker
    try:
        if code in {1000, 1001} and not session.held:
            await broker.unregister_worker(session.worker_id, session.connection)
        else:
            await dispatcher.lost(session)
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


async def handle(session: WorkerSession, dispatcher: Dispatcher, raw: Any) -> None:
    """Act on one message from a worker (a frame's JSON value). Bad input gets an `error`
    and changes nothing."""
    hub = dispatcher.hub
    if not isinstance(raw, dict) or not isinstance(raw.get("type"), str):
        await session.error("message must be a JSON object with a string `type`")
        return
    try:
        message = worker_message.validate_python(raw)
    except ValidationError as exc:
        known = "union_tag_invalid" in {e["type"] for e in exc.errors()}
        if known:
            await session.error(f"unknown message type: {raw['type']}")
        else:
            await session.error(f"invalid {raw['type']} message", error_details(exc))
        return
    broker = hub.broker
    worker_id = session.worker_id
    try:
        if isinstance(message, RegisterWorker):
            if message.protocol_version not in {None, PROTOCOL_VERSION}:
                await refuse_protocol(session, message.protocol_version)
                return
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
            await dispatcher.registered(session, registration)
            tokens = {h.job_id: h.lease_token for h in message.jobs}
            kept = await broker.extend(tokens.items())
            session.held.update(
                {job: token for (job, token), ok in zip(tokens.items(), kept, strict=True) if ok}
            )
            await session.send(
                WorkerRegistered(worker_id=worker_id, status="active", jobs=sorted(session.held))
            )
            if message.subscribe_to_jobs:
                await session.send(JobNotificationsSubscribed(worker_id=worker_id))
        elif session.caps is None:
            await session.error("register_worker first")
        elif isinstance(message, RequestJob):
            session.wanted = message.slots
            session.wake.set()
        elif isinstance(message, ClaimJob):
            await dispatcher.take_offer(session, message.job_id)
        elif isinstance(message, WorkerHeartbeat | WorkerStatus):
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
                await tell_monitors(
                    hub,
                    ws_message(
                        "worker_status",
                        message_id=f"worker-status-{int(time.time())}",
                        worker_id=worker_id,
                        status=message.status,
                        connector_statuses=extra.get("connector_statuses"),
                    ),
                )
        elif isinstance(message, ConnectorWsStatus | ServiceRequest):
            await tell_monitors(hub, {**message.model_dump(mode="json"), "worker_id": worker_id})
        else:
            await job_message(session, hub, message)
        if session.original and not session.held and not session.offered and not session.wanted:
            session.wanted = 1  # idle again: offer the next job
            session.wake.set()
    except StaleLease as exc:
        session.held.pop(getattr(message, "job_id", ""), None)
        await session.error(str(exc))
    except BrokerError as exc:
        await session.error(str(exc))


async def tell_monitors(hub: Hub, message: dict[str, Any]) -> None:
    """Send a message to the monitors of every replica (through the monitor channel)."""
    event = {"type": "monitor", "message": message}
    await hub.redis.publish(hub.broker.key("monitor_channel"), json.dumps(event))


async def job_message(
    session: WorkerSession,
    hub: Hub,
    message: UpdateJobProgress | CompleteJob | FailJob | ReleaseJob,
) -> None:
    """Progress, result, failure or release of a job this connection holds."""
    token = session.held.get(message.job_id)
    if token is None:
        await session.error(f"worker {session.worker_id} does not hold job {message.job_id}")
        return
    broker = hub.broker
    worker_id = session.worker_id
    service = session.services.get(message.job_id, "unknown")
    if not isinstance(message, UpdateJobProgress):
        session.services.pop(message.job_id, None)  # the job leaves this worker
    if isinstance(message, UpdateJobProgress):
        if message.progress < 0:  # keep-alive
            await broker.extend([(message.job_id, token)])
        else:
            details = (message.model_extra or {}).get("connector_details")
            await broker.progress(
                message.job_id,
                token,
                message.progress,
                message.message or "",
                message.status,
                details,
            )
    elif isinstance(message, CompleteJob):
        await broker.complete(message.job_id, token, message.result)
        del session.held[message.job_id]
        hub.metrics.finished.labels(service, "completed").inc()
        await session.send(JobCompletedAck(job_id=message.job_id, worker_id=worker_id))
    elif isinstance(message, FailJob):
        status = await broker.fail(
            message.job_id, token, message.error, retryable=message.retryable
        )
        del session.held[message.job_id]
        outcome = "retrying" if status is JobStatus.DELAYED else "failed"
        hub.metrics.finished.labels(service, outcome).inc()
        await session.send(
            JobFailedAck(
                job_id=message.job_id, worker_id=worker_id, error=message.error, status=status
            )
        )
    else:
        await broker.release(message.job_id, token)
        del session.held[message.job_id]
        hub.metrics.finished.labels(service, "released").inc()
        await session.send(JobReleased(job_id=message.job_id, worker_id=worker_id))
