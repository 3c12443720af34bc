"""The dispatcher: this replica's connected workers, fed jobs as they become pending.

Pull model: a worker says how many slots are free (`request_job`); the hub claims the best
matching jobs atomically and sends `job_assigned` (with the lease token). With nothing to
do, the request stays parked in this replica; the broker's scripts announce the classes of
jobs that become pending (the work channel, heard through the event bus), and every replica
wakes the parked workers that match them. Nobody polls. Jobs submitted through this replica
wake its workers at once (`submitted`, called by `Hub.submit`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import redis.exceptions
from fastapi import WebSocket, WebSocketDisconnect
from starlette.websockets import WebSocketDisconnected

from emp_hub.broker import (
    REDIS_DOWN,
    Broker,
    BrokerError,
    Claim,
    Job,
    Registration,
    WorkerAction,
)
from emp_hub.events import EventBus
from emp_hub.metrics import Metrics
from emp_protocol.capabilities import WorkerCapabilities
from emp_protocol.hub_messages import (
    CancelJob,
    Error,
    HubMessage,
    JobAssigned,
    JobAvailable,
    WorkerControl,
)
from emp_protocol.messages import MAX_BATCH, RequestJob, frame

log = logging.getLogger("emp_hub.dispatch")

#: A parked request is retried about this often even without a wake-up, in case an
#: announcement was missed (jittered, so thousands of idle workers do not claim in step).
SAFETY_WAKE_S = 60.0
#: How long a job offered to an original worker (job_available) stays reserved for it.
OFFER_S = 10.0
#: An offer's lease outlasts its reservation by this much (see Dispatcher.feed).
OFFER_GRACE_S = 5.0
#: How long a submit waits for the workers it woke on this replica to get their jobs.
FEED_WAIT_S = 0.01
#: The close code of a socket superseded by a newer connection of the same worker process.
CLOSE_SUPERSEDED = 4000

#: A worker's state as /api/workers, the dashboard and `emp workers` show it.
WorkerState = Literal["active", "draining", "drained", "stopping"]
#: What an admin may ask of a worker (POST /api/workers/{id}/{action}).
ControlAction = Literal["drain", "resume", "shutdown"]


def state_name(action: WorkerAction | None, holding: bool) -> WorkerState:
    """The state of a worker with this stored action, holding jobs or not."""
    if action == "shutdown":
        return "stopping"
    if action == "drain":
        return "draining" if holding else "drained"
    return "active"


def worker_state_message(worker_id: str, state: WorkerState) -> dict[str, Any]:
    """The monitors' message that a worker's state changed."""
    return {
        "type": "worker_state",
        "timestamp": time.time(),
        "worker_id": worker_id,
        "state": state,
    }


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
    wanted: int = 0  # free slots: claimed for now, or parked until jobs come
    #: Its last request_job not yet acted on (the feeder does, between its claims).
    request: RequestJob | None = None
    batch: bool = False  # it reads `batch` messages: its assignments go in one frame
    original: bool = False  # an original emp-redis worker: offers, then claim_job
    offered: dict[str, str] = field(default_factory=dict)  # job id -> token, reserved
    status: str = ""  # the last status it reported (idle/busy), as monitors last heard it
    #: The models it reported loaded, per service (model-warm affinity); original: none.
    loaded: dict[str, frozenset[str]] = field(default_factory=dict)
    action: WorkerAction | None = None  # drain/shutdown, as an admin asked: nothing assigned
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    fed: asyncio.Event = field(default_factory=asyncio.Event)  # set after each feeding
    closed: bool = False
    superseded: bool = False  # a newer connection of the same worker process took over
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: Held while claiming for it (its feeder, or a submit that claims for it): one at a time.
    claim_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def send(self, message: HubMessage) -> bool:
        """Send one message (serialised: the feeder and the receive loop both send).
        False when the peer has closed: the receive loop still reads what it sent before
        closing, and how it closed (a failed reply must not hide a clean goodbye)."""
        return await self._send_frame(frame([message]))

    async def send_all(self, messages: list[HubMessage]) -> bool:
        """Send messages in order: in `batch` frames of at most MAX_BATCH when the worker
        reads those, else one a frame."""
        size = MAX_BATCH if self.batch else 1
        for i in range(0, len(messages), size):
            if not await self._send_frame(frame(messages[i : i + size])):
                return False
        return True

    async def _send_frame(self, text: str) -> bool:
        async with self.send_lock:
            try:
                await self.websocket.send_text(text)
            except (WebSocketDisconnect, WebSocketDisconnected):
                return False
        return True

    async def error(self, error: str, details: Any = None) -> None:
        """An `error` message; the connection stays open."""
        await self.send(Error(error=error, details=details))


class Dispatcher:
    """This replica's connected workers, woken by the broker's announcements."""

    def __init__(
        self,
        broker: Broker,
        bus: EventBus,
        metrics: Metrics,
        on_lost: Callable[[str, str, list[str]], Awaitable[None]] | None = None,
    ) -> None:
        self.broker = broker
        self.bus = bus
        self.metrics = metrics
        #: Told (worker id, connection, job ids) when a worker is lost holding jobs.
        self.on_lost = on_lost
        self.sessions: dict[str, WorkerSession] = {}
        self._turn = 0
        self._stopping = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()
        # Lost workers' graces end in bursts (a network blip drops many sockets at once):
        # one requeue pass and one notice serve every grace that ended before it started.
        self._grace_pass = asyncio.Lock()
        self._grace_pass_started = float("-inf")
        bus.on("work_channel", self._on_work)
        bus.on("cancel_channel", self._on_cancel)
        bus.on("workers_channel", self._on_worker_notice)
        bus.on("control_channel", self._on_control)
        bus.on_reconnect(self.wake_all)  # announcements may have been missed meanwhile

    async def close(self) -> None:
        """The hub is stopping: lost workers' graces end here; wait for what is under way."""
        self._stopping.set()
        await asyncio.gather(*self._background, return_exceptions=True)

    async def _on_work(self, data: str) -> None:
        """Jobs became pending: "<origin> class:count ...". Jobs submitted through this
        replica woke its workers already (`submitted`): their announcement is skipped."""
        origin, *items = data.split()
        if origin != self.broker.origin:
            announced = [item.rpartition(":") for item in items]
            await self.wake({c: int(n) for c, _, n in announced})

    async def _on_cancel(self, data: str) -> None:
        await self.tell_cancel(json.loads(data))

    async def _on_worker_notice(self, data: str) -> None:
        await self.on_worker_notice(json.loads(data))

    async def _on_control(self, data: str) -> None:
        notice = json.loads(data)
        await self.control(notice["worker"], notice["action"])

    async def publish_control(self, worker_id: str, action: ControlAction) -> None:
        """Have the replica holding the worker's socket (this one too) obey an admin's
        action (the stored state already keeps claims from it; this tells the worker)."""
        notice = {"worker": worker_id, "action": action}
        await self.bus.redis.publish(self.broker.key("control_channel"), json.dumps(notice))

    async def control(self, worker_id: str, action: ControlAction) -> None:
        """An admin's action for a worker, if it is connected here: no more claims for it
        (drain, shutdown) or claims again (resume), and the worker is told."""
        session = self.sessions.get(worker_id)
        if session is None or session.closed:
            return
        session.action = None if action == "resume" else action
        await session.send(WorkerControl(worker_id=worker_id, action=action))
        if action == "resume":
            if session.original and not session.held and not session.offered:
                session.wanted = max(session.wanted, 1)
            session.wake.set()

    async def job_left(self, session: WorkerSession) -> None:
        """A job left the session: a draining worker holding nothing more is drained
        (the monitors are told)."""
        if session.action == "drain" and not session.held and not session.offered:
            await self.bus.tell_monitors(worker_state_message(session.worker_id, "drained"))

    def _spawn(self, work: Any) -> None:
        """Run a coroutine in the background (kept until it ends; awaited at shutdown)."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _notify_workers_channel(self, notice: dict[str, str]) -> None:
        """Tell every replica (this one too) about a worker: replaced or gone."""
        await self.bus.redis.publish(self.broker.key("workers_channel"), json.dumps(notice))

    async def on_worker_notice(self, notice: dict[str, str]) -> None:
        """`replaced`: close the superseded socket if it is here. `gone`: a worker left
        the live set, so jobs that avoided the workers that failed them may now go to them:
        every parked worker claims again."""
        if notice["event"] == "replaced":
            session = self.sessions.get(notice["worker"])
            if session is not None and session.connection == notice["connection"]:
                self.supersede(session)
        elif notice["event"] == "gone":
            await self.broker.live_workers(fresh=True)
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
        broker = self.broker
        if not await broker.worker_lost(
            session.worker_id, session.connection, session.held.items()
        ):
            return  # a newer connection holds the id
        if self.on_lost is not None and session.held:
            try:
                await self.on_lost(session.worker_id, session.connection, list(session.held))
            except redis.exceptions.RedisError:
                log.warning("could not record that worker %s was lost", session.worker_id)

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

    def _parked(self) -> Iterator[tuple[WorkerSession, WorkerCapabilities]]:
        """The workers with free slots waiting for jobs (not being fed, not drained), with
        their capabilities, from a start that moves at each call: the waiting is shared
        out."""
        sessions = list(self.sessions.values())
        self._turn = (self._turn + 1) % max(1, len(sessions))
        for session in sessions[self._turn :] + sessions[: self._turn]:
            caps, ready = session.caps, session.wanted and session.action is None
            if ready and caps is not None and not session.wake.is_set():
                yield session, caps

    async def wake(self, jobs: dict[str, int]) -> list[WorkerSession]:
        """Wake parked workers that can run the new jobs (class -> how many): as many free
        slots as there are jobs, not every matching worker (no thundering herd). Returns
        them."""
        broker = self.broker
        if any(c not in broker.known_classes for c in jobs):
            await broker.refresh_classes()
        left = dict(jobs)
        woken: list[WorkerSession] = []
        for session, caps in self._parked():
            for c in broker.matching_classes(caps):
                if left.get(c, 0) > 0:
                    left[c] -= min(left[c], session.wanted)
                    session.fed.clear()
                    session.wake.set()
                    woken.append(session)
                    break
            if not any(left.values()):
                break
        return woken

    async def reserve(self, classes: Collection[str]) -> WorkerSession | None:
        """A worker parked here, waiting for jobs of one of these classes, for a submit to
        claim for in its own script (Hub.submit): returned with its claim lock held (the
        caller releases it), or None. A worker whose request is not acted on yet, or that
        its feeder is about to feed, is left to its feeder."""
        broker = self.broker
        if any(c not in broker.known_classes for c in classes):
            return None  # its class list is refreshed when the workers are woken
        for session, caps in self._parked():
            if (
                session.original
                or session.closed
                or session.request is not None
                or session.claim_lock.locked()
            ):
                continue
            if not set(broker.matching_classes(caps)).isdisjoint(classes):
                await session.claim_lock.acquire()  # free: taken at once, no other task runs
                return session
        return None

    async def claimed(self, session: WorkerSession, claims: list[Claim]) -> None:
        """Jobs claimed for a worker by a submit: its free slots take them, it is told."""
        session.wanted -= min(len(claims), session.wanted)
        if claims:
            await self.assign(session, [(claim.job, claim.token) for claim in claims])

    async def submitted(self, jobs: dict[str, int]) -> None:
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

    async def tell_cancel(self, notice: dict[str, str]) -> None:
        """Tell the worker running a cancelled job, if it is connected here."""
        session = self.sessions.get(notice["worker"])
        job_id = notice["job_id"]
        if session is not None and session.held.pop(job_id, None) is not None:
            await session.send(CancelJob(job_id=job_id, reason=notice.get("reason", "cancelled")))
            await self.job_left(session)

    async def feed(self, session: WorkerSession) -> None:
        """Claim jobs for the session's free slots whenever it is woken."""
        while not session.closed:
            with contextlib.suppress(TimeoutError):  # asyncio.timeout: no extra task per wait
                async with asyncio.timeout(SAFETY_WAKE_S * random.uniform(0.5, 1.5)):
                    await session.wake.wait()
            session.wake.clear()
            try:
                if (
                    not session.closed
                    and (session.wanted or session.request is not None)
                    and session.caps is not None
                    and session.action is None
                ):
                    async with session.claim_lock:
                        await self._claim_for(session)
            except REDIS_DOWN as exc:  # claimed again when woken once Redis is back
                log.warning("no claim for %s: %s", session.worker_id, exc)
            finally:
                session.fed.set()

    async def _claim_for(self, session: WorkerSession) -> None:
        """Claim jobs for the session's free slots (and its prefetch, right after it
        asked) and hand them over."""
        assert session.caps is not None
        count = session.wanted
        if (request := session.request) is not None:
            session.request = None
            # The jobs assigned since it asked are on their way: they count.
            on_the_way = 0 if request.held is None else max(0, len(session.held) - request.held)
            session.wanted = max(0, request.slots - on_the_way)
            count = max(0, request.slots + request.prefetch - on_the_way)
        if not count:
            return
        started = time.perf_counter()
        # An offer to an original worker is leased past its reservation, so that an
        # unclaimed offer is handed back by withdraw(), not reaped as a lost worker.
        claims = await self.broker.claim_many(
            session.worker_id,
            session.caps,
            count,
            lease_s=OFFER_S + OFFER_GRACE_S if session.original else None,
            loaded=session.loaded,
        )
        self.metrics.claim_seconds.observe(time.perf_counter() - started)
        session.wanted -= min(len(claims), session.wanted)
        if session.original:
            for claim in claims:
                await self.offer(session, claim)
        elif claims:
            await self.assign(session, [(claim.job, claim.token) for claim in claims])

    async def assign(self, session: WorkerSession, jobs: list[tuple[Job, str]]) -> None:
        """The worker holds the jobs now (with their tokens): remember them, tell it (in
        one frame when it reads batches)."""
        messages: list[HubMessage] = []
        for job, token in jobs:
            session.held[job.id] = token
            session.services[job.id] = job.service
            messages.append(
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
        if not await session.send_all(messages):  # the worker has just gone: jobs go back
            for job, token in jobs:
                session.held.pop(job.id, None)
                session.services.pop(job.id, None)
                with contextlib.suppress(BrokerError):
                    await self.broker.release(job.id, token)
            return
        for job, _ in jobs:  # counted once the worker has been told (not on its way)
            latency = (job.claimed_at or 0) - job.created_at
            self.metrics.submit_to_start.observe(latency)
            self.metrics.series.started(latency)

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
            await self.broker.release(job_id, token)
        if not session.closed and not session.held:
            session.wanted = 1
            session.wake.set()

    async def take_offer(self, session: WorkerSession, job_id: str) -> None:
        """claim_job: the original worker takes the job it was offered."""
        token = session.offered.pop(job_id, None)
        if token is None:
            await session.error(f"job {job_id} is not offered to worker {session.worker_id}")
            return
        [still_held] = await self.broker.extend([(job_id, token)])  # a full lease now
        if not still_held:
            await session.error(f"job {job_id} is no longer available")
            return
        await self.assign(session, [(await self.broker.get(job_id), token)])
