"""The worker runtime: one WebSocket to the hub, jobs run by connectors in their own tasks.

    connect ─► register_worker (with the jobs it still holds) ─► request_job (free slots)
       ▲            job_assigned ─► a task per job: connector.run(job, ctx)
       │                            progress ─► update_job_progress (throttled)
       │                            result ─► complete_job / fail_job / release_job
       └── lost connection: reconnect with exponential backoff and jitter; running jobs go
           on, and are announced again so the hub keeps their leases.

A worker id belongs to one process: when another live process has it, the hub refuses
the registration and `run()` raises WorkerRefused (the CLI exits non-zero with the hub's
message); while the id is kept for a process that just lost its connection, it waits.

SIGTERM or SIGINT: stop asking for work, let running jobs finish within `drain_timeout_s`,
hand back what is left, exit 0. A second signal (more than a second later) hands back at
once; the same signal twice within a second (supervisor stopping a process group) counts
once, and `emp-worker run` ignores one that comes once the drain is over and it exits.

An admin (`emp workers drain|resume|shutdown ID`, through the hub's `worker_control`) may
drain the worker (it asks for no work, running jobs finish), resume it, or shut it down
(the same drain as SIGTERM, then exit 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import websockets
from pydantic import ValidationError
from websockets.asyncio.client import ClientConnection

from emp_protocol.capabilities import GPU, CustomerAccess, WorkerCapabilities
from emp_protocol.hub_messages import (
    CancelJob,
    ConnectionEstablished,
    Error,
    HubMessage,
    JobAssigned,
    WorkerControl,
    WorkerHeartbeatAck,
    WorkerIdAvailable,
    WorkerRegistered,
    hub_message,
)
from emp_protocol.logs import JOB_ID, WORKER_ID
from emp_protocol.messages import (
    MAX_BATCH,
    PROTOCOL_VERSION,
    Batch,
    CompleteJob,
    FailJob,
    HeldJob,
    RegisterWorker,
    ReleaseJob,
    RequestJob,
    UpdateJobProgress,
    WorkerHeartbeat,
    WorkerMessage,
    frame,
)
from emp_protocol.runtime import freeze_startup_objects
from emp_worker import hardware
from emp_worker.connector import (
    HUB_OUTPUT,
    CapabilityExtras,
    Connector,
    Health,
    InputFile,
    Job,
    JobContext,
    JobFailed,
    OutputRef,
)
from emp_worker.hookspecs import Outcome, hookimpl
from emp_worker.plugins import PluginError, Plugins, first_answer
from emp_worker.settings import WorkerSettings

log = logging.getLogger("emp_worker")

#: Why the worker stopped a running job (the job_finished outcome it becomes).
StopReason = Literal["cancelled", "timed_out", "lost", "released"]

#: Signals closer together than this are one (a process group stopped by supervisor).
SAME_SIGNAL_S = 1.0
#: A connector's health check that takes longer than this counts as down.
HEALTH_TIMEOUT_S = 10.0


class WorkerRefused(Exception):
    """The hub will not take this worker: another live process has its worker id, or it
    speaks another protocol version."""


class WorkerIdKept(Exception):
    """The worker id is kept a little longer for a process that lost its connection."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TokenRefused(Exception):
    """The hub refused this worker's token (missing, unknown or revoked, wrong role)."""


def _token_refusal(message: Error) -> str:
    """What to do about the hub's auth_failed error, in one line."""
    create = "emp-hub token create --role worker"
    cause = message.cause
    if cause == "missing":
        return f"the hub needs a token: set EMP_TOKEN to a token with role worker ({create})"
    if cause == "invalid":
        return (
            "the hub does not know this token (mistyped, or revoked): set EMP_TOKEN to a "
            f"valid token with role worker ({create})"
        )
    if cause == "role":
        return f"{message.error}: set EMP_TOKEN to a token with role worker ({create})"
    return message.error


def read_hub_message(raw: str | bytes) -> HubMessage | None:
    """A message from the hub; None (and a log line) for one this worker cannot read: not
    JSON, invalid fields, or a type it does not know (a newer hub's)."""
    return _read(hub_message.validate_json, raw)


def unbatched(message: HubMessage) -> list[HubMessage]:
    """The message, or the messages a `batch` carries (those this worker can read)."""
    if not isinstance(message, Batch):
        return [message]
    read = (_read(hub_message.validate_python, item) for item in message.messages)
    return [m for m in read if m is not None and not isinstance(m, Batch)]


def _read(validate: Callable[[Any], HubMessage], raw: Any) -> HubMessage | None:
    try:
        return validate(raw)
    except ValidationError as exc:
        unknown = any(e["type"] == "union_tag_invalid" for e in exc.errors())
        log.log(
            logging.DEBUG if unknown else logging.WARNING,
            "ignoring a message from the hub: %s",
            exc.errors(include_url=False, include_input=False, include_context=False),
        )
        return None


@dataclass(eq=False)
class Running:
    """A job this worker holds."""

    job: Job
    connector: Connector
    ctx: JobContext
    task: asyncio.Task[None] | None = None
    stop_reason: StopReason | None = None  # why its task was stopped
    #: When it got a slot (monotonic); None while it is prefetched, waiting for one.
    started: float | None = None


@dataclass(eq=False, slots=True)
class Queued:
    """A message waiting for the next frame, and its sender's future (did it go?). Made
    moot by a newer message, it stays in the queue as None (found in O(1), not searched)."""

    message: WorkerMessage | None
    sent: asyncio.Future[bool]


@dataclass
class Stats:
    """What this worker did (for logs and tests)."""

    completed: int = 0
    failed: int = 0
    released: int = 0
    cancelled: int = 0


#: How long a frame of messages may wait for more that are about to be sent (batching).
COALESCE_S = 0.002
#: HTTP statuses of an input's fetch worth a retry: the file may be there later.
RETRYABLE_STATUS = frozenset({408, 409, 425, 429})
#: How a kept-alive connection fails when the server closed it just as it was reused: the
#: request (an output's PUT or GET: idempotent) is sent once more, on a new connection.
STALE_CONNECTION = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)
#: Idle connections to the hub are dropped after this, well before servers drop them
#: (uvicorn after 5 s), so that a reused one is rarely found closed.
KEEPALIVE_S = 2.0


async def send_once_more(send: Callable[[], Awaitable[httpx.Response]]) -> httpx.Response:
    """`send()`, and once more if its connection turned out to be closed."""
    try:
        return await send()
    except STALE_CONNECTION:
        return await send()


async def get_input(
    http: httpx.AsyncClient, url: str, headers: dict[str, str] | None = None
) -> InputFile:
    """GET an input file; JobFailed when it fails: retryable when it may work later (no
    answer, a 5xx, a 408/409/425/429), not retryable when it is not there (404, 403...)."""
    try:
        response = await send_once_more(
            lambda: http.get(url, headers=headers, follow_redirects=True)
        )
    except httpx.HTTPError as exc:
        raise JobFailed(f"input {url}: {type(exc).__name__}: {exc}") from exc
    if response.status_code >= 400:
        detail = response.text[:500]
        with contextlib.suppress(ValueError, AttributeError, KeyError, TypeError):
            detail = str(response.json()["detail"])  # the hub's reason
        raise JobFailed(
            f"input {url}: HTTP {response.status_code} {detail}",
            retryable=response.status_code >= 500 or response.status_code in RETRYABLE_STATUS,
        )
    kind = response.headers.get("content-type", "application/octet-stream")
    name = httpx.URL(url).path.rsplit("/", 1)[-1] or "input"
    return InputFile(name=name, content_type=kind, data=response.content)


class HubOutputs:
    """The default output store: upload to the hub (PUT /api/jobs/{id}/outputs/{name});
    and the default input source: the hub's outputs read as the job, other URLs fetched."""

    #: Its name among the plugins (Plugins.register_builtin).
    NAME = "emp-worker:hub-outputs"

    @classmethod
    async def close_in(cls, plugins: Plugins) -> None:
        """Close the connections of the one registered in `plugins`, if any."""
        store = plugins.pm.get_plugin(cls.NAME)
        if isinstance(store, cls):
            await store.aclose()

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self._http: httpx.AsyncClient | None = None

    @property
    def http(self) -> httpx.AsyncClient:
        """One client for every upload and fetch (made on first use): its connections to
        the hub are kept alive between requests, so an upload opens no new connection (a
        new one cost more than the rest of an upload), and the CAs are loaded once."""
        if self._http is None:
            self._http = httpx.AsyncClient(
                timeout=120, limits=httpx.Limits(keepalive_expiry=KEEPALIVE_S)
            )
        return self._http

    async def aclose(self) -> None:
        """Close the connections (when the worker stops)."""
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    @hookimpl(trylast=True)
    async def store_output(
        self, context: JobContext, name: str, data: bytes, content_type: str
    ) -> OutputRef:
        """Upload with the job's lease token; the hub serves it to the job's readers."""
        headers = {"X-Lease-Token": context.job.lease_token, "Content-Type": content_type}
        if self.settings.token is not None:
            headers["Authorization"] = f"Bearer {self.settings.token.get_secret_value()}"
        url = f"{self.settings.http_url}/api/jobs/{context.job.id}/outputs/{name}"
        response = await send_once_more(lambda: self.http.put(url, content=data, headers=headers))
        if response.status_code >= 400:
            raise JobFailed(
                f"uploading output {name} failed: HTTP {response.status_code} "
                f"{response.text[:500]}"  # the hub's reason, e.g. the size cap it hit
            )
        body = response.json()
        return OutputRef(
            name=name,
            size=len(data),
            content_type=content_type,
            url=body.get("url", f"/api/jobs/{context.job.id}/outputs/{name}"),
        )

    @hookimpl(trylast=True)
    async def fetch_output(self, context: JobContext, url: str) -> InputFile:
        """An output on the hub (its path, or its URL under the hub's address), read as the
        job (the worker's token, the job's lease token: the hub lets a job read the
        outputs of its own customer's jobs); any other http(s) URL with a plain GET."""
        hub = self.settings.http_url
        headers = {}
        if HUB_OUTPUT.match(url) or (
            url.startswith(hub + "/") and HUB_OUTPUT.match(url[len(hub) :])
        ):
            url = url if url.startswith(hub) else hub + url
            headers = {"X-Job-Id": context.job.id, "X-Lease-Token": context.job.lease_token}
            if self.settings.token is not None:
                headers["Authorization"] = f"Bearer {self.settings.token.get_secret_value()}"
        elif not url.startswith(("http://", "https://")):
            raise JobFailed(f"input {url}: not a hub output or an http(s) URL", retryable=False)
        return await get_input(self.http, url, headers)


def _tell(sent: asyncio.Future[bool], ok: bool) -> None:
    """Tell a sender whether its message went, unless it stopped waiting (cancelled)."""
    if not sent.done():
        sent.set_result(ok)


class Worker:
    """One worker process: its connectors, its hub connection, its running jobs."""

    def __init__(
        self, settings: WorkerSettings, plugins: Plugins, connectors: list[Connector]
    ) -> None:
        self.settings = settings
        self.plugins = plugins
        self.connectors = connectors
        self.by_service: dict[str, Connector] = {}
        for connector in connectors:
            for service in connector.capabilities().services:
                self.by_service.setdefault(service, connector)
        self.slots = {c.name: asyncio.Semaphore(c.concurrency) for c in connectors}
        self.capacity = sum(c.concurrency for c in connectors)
        self.gpus: list[GPU] = hardware.gpus()
        self.worker_id = settings.effective_worker_id(bool(self.gpus))
        #: Names this process to the hub: it may take its worker id over from its own
        #: earlier connection at once, while another process with the id is refused.
        self.instance = uuid.uuid4().hex[:16]
        self._rechecked = False  # asked again once after a refusal through another replica
        self.running: dict[str, Running] = {}
        #: job -> (lease token, its final message), kept until sent
        self.outbox: dict[str, tuple[str, CompleteJob | FailJob | ReleaseJob]] = {}
        self.conn: ClientConnection | None = None
        self.send_lock = asyncio.Lock()
        #: The hub takes `batch` messages (it said so in worker_registered).
        self.batching = False
        self._queue: list[Queued] = []
        #: What a newer message makes moot, while still queued: the request_job, and
        #: per job its progress reports.
        self._queued_request: Queued | None = None
        self._queued_progress: dict[str, list[Queued]] = {}
        self._flusher: asyncio.Task[None] | None = None
        self._posted = 0  # messages queued so far (a frame waits while more come)
        #: Seconds its recent jobs took (a moving average; None before the first ended).
        self.pace: float | None = None
        #: Jobs asked for in the last request_job and not assigned yet (as far as it knows).
        self._on_the_way = 0
        self.draining = False
        #: Drained by an admin (worker_control drain): asks for no work until resumed.
        self.paused = False
        self.done = asyncio.Event()
        self.stats = Stats()
        #: Each connector's last health check (by name); one that is not ok has its
        #: services withdrawn from the capabilities until it is ok again.
        self.health: dict[str, Health] = {}
        self._caps = self.capabilities()
        self._last_signal = float("-inf")
        self._changed = asyncio.Event()  # set when a job ended or the outbox was flushed
        self._drain: asyncio.Task[None] | None = None

    # -- capabilities ---------------------------------------------------------------------

    def capabilities(self) -> WorkerCapabilities:
        """Services and models of the connectors (but those that are down), the machine,
        and plugins' additions."""
        services: set[str] = set()
        models: dict[str, set[str]] = {}
        for connector in self.connectors:
            if not self.healthy(connector):
                continue
            caps = connector.capabilities()
            services |= caps.services
            for service, names in caps.models.items():
                models.setdefault(service, set()).update(names)
        tags, region = set(self.settings.tags), self.settings.region
        for extra in self._capability_extras():
            tags.update(extra.tags)
            region = extra.region or region
            for service, more in extra.models.items():
                models.setdefault(service, set()).update(more)
        index = self.settings.gpu_index
        return WorkerCapabilities(
            services=frozenset(services),
            models={s: frozenset(m) for s, m in models.items()},
            gpus=tuple(self.gpus[index : index + 1]),
            cpu_cores=hardware.cpu_cores(),
            ram_gb=hardware.ram_gb(),
            disk_gb=hardware.disk_gb(),
            region=region,
            tags=frozenset(tags),
            customer_access=CustomerAccess(
                isolation=self.settings.customer_isolation,
                allowed=frozenset(self.settings.customers_allowed),
                denied=frozenset(self.settings.customers_denied),
            ),
        )

    def loaded_models(self) -> dict[str, list[str]] | None:
        """The models the connectors (but those that are down) have loaded now, per service
        they serve; None when none of them can tell (the hub then keeps no affinity)."""
        report: dict[str, set[str]] | None = None
        for connector in self.connectors:
            models = connector.loaded_models() if self.healthy(connector) else None
            if models is None:
                continue
            report = report if report is not None else {}
            for service in connector.capabilities().services:
                report.setdefault(service, set()).update(models)
        return None if report is None else {s: sorted(m) for s, m in report.items()}

    def healthy(self, connector: Connector) -> bool:
        """Whether the connector's last health check was ok (or it was not checked yet)."""
        health = self.health.get(connector.name)
        return health is None or health.ok

    async def check_health(self) -> bool:
        """Check every connector's health (at once; one that raises or takes longer than
        HEALTH_TIMEOUT_S is down); True when which ones are down changed."""

        async def check(connector: Connector) -> Health:
            try:
                return await asyncio.wait_for(connector.health(), HEALTH_TIMEOUT_S)
            except TimeoutError:
                return Health(ok=False, detail=f"no health answer within {HEALTH_TIMEOUT_S:g} s")
            except Exception as exc:
                return Health(ok=False, detail=f"health check raised {type(exc).__name__}: {exc}")

        answers = await asyncio.gather(*(check(c) for c in self.connectors))
        changed = False
        for connector, health in zip(self.connectors, answers, strict=True):
            was = self.healthy(connector)
            self.health[connector.name] = health
            if health.ok != was:
                changed = True
                services = ", ".join(sorted(connector.capabilities().services))
                if health.ok:
                    log.info("connector %s is back: offering %s again", connector.name, services)
                else:
                    log.warning(
                        "connector %s is down (%s): not offering %s until it is back",
                        connector.name,
                        health.detail,
                        services,
                    )
        return changed

    def _capability_extras(self) -> list[CapabilityExtras]:
        """The plugins' worker_capabilities answers (one that raises is left out, see
        Plugins.call); PluginError names a plugin whose answer is not a CapabilityExtras
        (a dict is read as one)."""
        extras = []
        for plugin, answer in self.plugins.call("worker_capabilities"):
            try:
                extras.append(CapabilityExtras.model_validate(answer))
            except ValidationError as exc:
                problems = "; ".join(
                    f"{'.'.join(str(p) for p in e['loc']) or 'answer'}: {e['msg']}"
                    for e in exc.errors()
                )
                raise PluginError(
                    f"plugin {plugin}: worker_capabilities answered {answer!r}, not a "
                    f"CapabilityExtras ({problems})"
                ) from exc
        return extras

    # -- the connection -------------------------------------------------------------------

    async def run(self) -> int:
        """Run until stopped by a signal (or `stop()`); returns the exit status."""
        context = WORKER_ID.set(self.worker_id)  # every line it logs names this worker
        try:
            return await self._run()
        finally:
            WORKER_ID.reset(context)

    async def _run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.on_signal)
        for connector in self.connectors:
            await connector.start()
        await self.check_health()  # a service that is down is not offered from the start
        self._caps = self.capabilities()  # what the connectors found as they started
        freeze_startup_objects()
        refresher = asyncio.create_task(self._refresh_capabilities())
        watcher = asyncio.create_task(self._watch_health())
        failures = 0
        try:
            while not self.done.is_set():
                kept_for: float | None = None
                try:
                    await self._session()
                    failures = 0
                except WorkerIdKept as exc:
                    log.warning("hub: %s", exc)
                    kept_for = exc.retry_after
                except TokenRefused as exc:
                    kept_for = self.settings.auth_retry_s
                    log.error("%s; trying again in %g s", exc, kept_for)
                except (OSError, websockets.WebSocketException, TimeoutError) as exc:
                    log.warning("hub connection: %s", exc or type(exc).__name__)
                self.conn = None
                if self.done.is_set():
                    break
                failures += 1
                delay = min(
                    self.settings.reconnect_max_s,
                    self.settings.reconnect_min_s * 2 ** min(failures - 1, 16),
                )
                delay *= random.uniform(0.5, 1.0)  # equal jitter: replicas do not stampede
                if kept_for is not None:  # not a network problem: no backoff
                    delay = kept_for + 0.1
                log.info("reconnecting in %.1f s", delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.done.wait(), delay)
        finally:
            refresher.cancel()
            watcher.cancel()
            for running in list(self.running.values()):
                if running.task is not None:
                    running.task.cancel()
            for connector in self.connectors:
                with contextlib.suppress(Exception):
                    await connector.stop()
        return 0

    def _connect(self, open_timeout: float = 10) -> websockets.connect:
        """Open this worker's socket on the hub (with its token)."""
        headers = {}
        if self.settings.token is not None:
            headers["Authorization"] = f"Bearer {self.settings.token.get_secret_value()}"
        url = f"{self.settings.hub_url}/ws/worker/{self.worker_id}"
        # No permessage-deflate: small JSON frames, where compressing cost both sides CPU
        # for nothing (docs/benchmarks.md).
        return websockets.connect(
            url,
            additional_headers=headers,
            open_timeout=open_timeout,
            max_size=None,
            compression=None,
        )

    async def probe(self) -> dict[str, dict[str, Any]]:
        """What `run` needs from the hub, checked without registering (emp-worker doctor):
        the token is accepted on the worker route, the protocol versions agree, and no
        other process holds this worker id. Each check: {"ok": bool, "detail": str}."""
        checks: dict[str, dict[str, Any]] = {}
        try:
            async with self._connect(open_timeout=5) as conn:
                greeting = read_hub_message(await asyncio.wait_for(conn.recv(), 5))
                if isinstance(greeting, Error):
                    checks["token"] = {"ok": False, "detail": _token_refusal(greeting)}
                    return checks
                checks["token"] = {"ok": True, "detail": "accepted on the worker route"}
                version, hub_version = (
                    (greeting.protocol_version, greeting.hub_version)
                    if isinstance(greeting, ConnectionEstablished)
                    else (None, None)
                )
                checks["protocol"] = {
                    "ok": version == PROTOCOL_VERSION,
                    "detail": f"hub {hub_version or '?'} speaks protocol "
                    f"{version if version is not None else '? (not an emp hub)'}, this "
                    f"worker {PROTOCOL_VERSION}",
                }
                dry_run = self._registration().model_copy(update={"dry_run": True})
                await conn.send(json.dumps(dry_run.model_dump(mode="json")))
                answer = read_hub_message(await asyncio.wait_for(conn.recv(), 5))
                free = isinstance(answer, WorkerIdAvailable)
                detail = (
                    "free" if free else f"{answer.error if isinstance(answer, Error) else answer}"
                )
                checks["worker_id"] = {"ok": free, "detail": f"{self.worker_id}: {detail}"}
        except (OSError, websockets.WebSocketException, TimeoutError) as exc:
            checks["token"] = {"ok": False, "detail": f"worker socket: {exc or type(exc).__name__}"}
        return checks

    async def _session(self) -> None:
        """One connection: register, ask for work, handle messages until it closes."""
        async with self._connect() as conn:
            await self._register(conn)
            self.conn = conn
            log.info("connected to %s as %s", self.settings.hub_url, self.worker_id)
            await self._flush_outbox()
            await self.request_work()
            beats = asyncio.create_task(self._heartbeats())
            try:
                async for raw in conn:
                    if (message := read_hub_message(raw)) is not None:
                        for each in unbatched(message):
                            await self._handle(each)
                    if self.done.is_set():
                        break
            finally:
                self.conn = None
                beats.cancel()

    def _registration(self) -> RegisterWorker:
        """register_worker: who we are, what we offer, and the jobs we still hold (running,
        or finished with a result not yet delivered)."""
        held = [(job_id, r.job.lease_token) for job_id, r in self.running.items()]
        held += [(job_id, token) for job_id, (token, _) in self.outbox.items()]
        return RegisterWorker(
            worker_id=self.worker_id,
            instance=self.instance,
            protocol_version=PROTOCOL_VERSION,
            capabilities=self._caps.model_dump(mode="json"),
            jobs=[HeldJob(job_id=job_id, lease_token=token) for job_id, token in held],
            batch=True,
        )

    async def _register(self, conn: ClientConnection) -> None:
        """Register with the jobs still held; drop those the hub no longer gives us."""
        greeting = read_hub_message(await asyncio.wait_for(conn.recv(), 30))
        if isinstance(greeting, Error) and greeting.code == "auth_failed":
            raise TokenRefused(_token_refusal(greeting))  # before a send fails on the close
        if isinstance(greeting, ConnectionEstablished) and greeting.protocol_version not in (
            None,
            PROTOCOL_VERSION,
        ):
            log.warning(
                "the hub speaks protocol %s, this worker %s: upgrade the older one",
                greeting.protocol_version,
                PROTOCOL_VERSION,
            )
        await conn.send(json.dumps(self._registration().model_dump(mode="json")))
        while True:
            message = read_hub_message(await asyncio.wait_for(conn.recv(), 30))
            if isinstance(message, WorkerRegistered):
                break
            if isinstance(message, Error):
                error = message.error
                if message.code == "protocol_version":
                    raise WorkerRefused(error)
                if message.code == "worker_id_in_use":
                    if message.retry_after is not None:
                        raise WorkerIdKept(error, message.retry_after)
                    if message.recheck_after is not None and not self._rechecked:
                        # The holder came through another hub replica, which may be dead:
                        # ask once more when that would show; a live holder means exit.
                        self._rechecked = True
                        raise WorkerIdKept(error, message.recheck_after)
                    raise WorkerRefused(error)
                raise websockets.InvalidHandshake(error)
        self._rechecked = False
        self.batching = message.batch
        kept = set(message.jobs)
        for job_id in [j for j in self.running if j not in kept]:
            log.warning("job %s was lost while disconnected; stopping it", job_id)
            self._stop_job(job_id, "lost")
        for job_id in [j for j in self.outbox if j not in kept]:
            del self.outbox[job_id]

    async def send(self, message: WorkerMessage) -> bool:
        """Send a message if connected; False when it could not be sent. When the hub
        takes batches, the messages sent while a frame is being written go together in
        the next frame (a newer request_job replaces one still waiting)."""
        conn = self.conn
        if conn is None:
            return False
        if not self.batching:
            return await self._send_frame(conn, [message])
        return await self._post(message)

    def _post(self, message: WorkerMessage) -> asyncio.Future[bool]:
        """Queue a message for the next frame; the future says whether it was sent. It
        replaces what it makes moot: a newer request_job the one still queued, a job's
        result its progress reports still queued (the hub stamps started_at at the
        result then)."""
        if isinstance(message, RequestJob):
            moot = [self._queued_request] if self._queued_request is not None else []
        elif isinstance(message, CompleteJob):
            moot = self._queued_progress.pop(message.job_id, [])
        else:
            moot = []
        for entry in moot:
            entry.message = None
            _tell(entry.sent, True)
        entry = Queued(message, asyncio.get_running_loop().create_future())
        self._queue.append(entry)
        if isinstance(message, RequestJob):
            self._queued_request = entry
        elif isinstance(message, UpdateJobProgress):
            self._queued_progress.setdefault(message.job_id, []).append(entry)
        self._posted += 1
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return entry.sent

    def _take(self, count: int) -> list[Queued]:
        """The first `count` entries of the queue, out of it (moot ones left out): being
        sent, nothing makes them moot any more."""
        taken, self._queue = self._queue[:count], self._queue[count:]
        out = []
        for entry in taken:
            message = entry.message
            if message is None:
                continue
            out.append(entry)
            if entry is self._queued_request:
                self._queued_request = None
            elif isinstance(message, UpdateJobProgress):
                reports = self._queued_progress[message.job_id]
                reports.remove(entry)  # the first, or nearly: reports go in order
                if not reports:
                    del self._queued_progress[message.job_id]
        return out

    def pending_messages(self) -> list[WorkerMessage]:
        """The messages waiting for the next frame, in order."""
        return [e.message for e in self._queue if e.message is not None]

    async def _flush(self) -> None:
        """Write the queued messages, a frame at a time, until none is left, on the
        connection of the moment (none: not sent)."""
        try:
            loop = asyncio.get_running_loop()
            while self._queue:
                # What is about to be said joins this frame: wait while each turn of the
                # loop adds messages, for at most COALESCE_S.
                until, seen = loop.time() + COALESCE_S, -1
                while seen != self._posted and len(self._queue) < MAX_BATCH:
                    if loop.time() >= until:
                        break
                    seen = self._posted
                    await asyncio.sleep(0)
                batch = self._take(MAX_BATCH)
                if not batch:
                    continue  # every one of them was made moot
                conn = self.conn
                messages = [e.message for e in batch if e.message is not None]
                ok = conn is not None and await self._send_frame(conn, messages)
                for entry in batch:
                    _tell(entry.sent, ok)
        finally:  # cancelled: what is left was not sent
            for entry in self._take(len(self._queue)):
                _tell(entry.sent, False)

    async def _send_frame(self, conn: ClientConnection, messages: list[WorkerMessage]) -> bool:
        """Send messages in one frame (a batch when there are several)."""
        try:
            async with self.send_lock:
                await conn.send(frame(messages))
        except websockets.ConnectionClosed:
            return False
        return True

    async def request_work(self, *, top_up: bool = False) -> None:
        """Tell the hub what work it takes now (see work_request), if anything new."""
        if (request := self.work_request(top_up=top_up)) is not None:
            self._on_the_way = request.slots + request.prefetch
            await self.send(request)

    def work_request(self, *, top_up: bool = False) -> RequestJob | None:
        """The request_job for now: its free slots, and how many more jobs the hub may
        claim for it as prefetch; none of either while draining or drained. `top_up` (a
        job has ended): None unless a slot is free, or half the prefetch is gone and not
        on its way, so that the hub claims several at a time."""
        held = len(self.running)
        if self.draining or self.paused:
            return None if top_up else RequestJob(slots=0, prefetch=0, held=held)
        free = max(0, self.capacity - held)
        target = self._prefetch()
        room = max(0, self.capacity + target - held - free)
        if top_up and not free and room - self._on_the_way < max(1, (target + 1) // 2):
            return None
        return RequestJob(slots=free, prefetch=room, held=held, loaded_models=self.loaded_models())

    def _prefetch(self) -> int:
        """How many jobs to hold beyond the slots: as many as it starts within
        prefetch_wait_s at the pace of its recent jobs, at most `prefetch`; none before
        a job has ended."""
        if self.pace is None:
            return 0
        per_job = self.pace / max(1, self.capacity)
        return min(self.settings.prefetch, int(self.settings.prefetch_wait_s / max(per_job, 1e-6)))

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            await self.send(
                WorkerHeartbeat(
                    worker_id=self.worker_id,
                    status="busy" if self.running else "idle",
                    load=self._started() / max(1, self.capacity),
                    loaded_models=self.loaded_models(),
                )
            )

    async def _refresh_capabilities(self) -> None:
        """Detect the capabilities again now and then; tell the hub when they changed."""
        while True:
            await asyncio.sleep(self.settings.capabilities_refresh_s)
            await self._update_capabilities()

    async def _watch_health(self) -> None:
        """Check the connectors' health now and then: when one went down or came back,
        detect the capabilities again (without its services while it is down). Running
        jobs are left alone."""
        while True:
            await asyncio.sleep(self.settings.health_interval_s)
            if await self.check_health():
                await self._update_capabilities()

    async def _update_capabilities(self) -> None:
        """Detect the capabilities; when they changed, register again and ask for work."""
        try:
            caps = await asyncio.to_thread(self.capabilities)
        except PluginError as exc:
            log.error("%s; keeping the capabilities of before", exc)
            return
        stable = {"disk_gb": 0.0, "ram_gb": 0.0}
        if caps.model_copy(update=stable) != self._caps.model_copy(update=stable):
            log.info("capabilities changed; registering again")
            self._caps = caps
            if await self.send(self._registration()):
                await self.request_work()  # jobs the new capabilities match

    async def _handle(self, message: HubMessage) -> None:
        if isinstance(message, JobAssigned):
            self._start_job(message)
        elif isinstance(message, CancelJob):
            self._stop_job(message.job_id, "cancelled")
        elif isinstance(message, WorkerHeartbeatAck):
            for job_id in message.lost:
                log.warning("job %s: lease lost; stopping it", job_id)
                self._stop_job(job_id, "lost")
        elif isinstance(message, WorkerControl):
            await self._obey(message)
        elif isinstance(message, Error):
            log.warning("hub: %s", message.error)

    async def _obey(self, message: WorkerControl) -> None:
        """An admin's worker_control: drain (ask for nothing more), resume (ask again), or
        shutdown (drain as SIGTERM does, then `run` returns 0)."""
        if message.action == "shutdown":
            log.info("the hub asks this worker to shut down")
            self.stop()
            return
        paused = message.action == "drain"
        if paused != self.paused:
            log.info(
                "the hub %s this worker: %d jobs running",
                "drained" if paused else "resumed",
                len(self.running),
            )
        self.paused = paused
        if paused:
            self._release_waiting()
        await self.request_work()

    # -- jobs -----------------------------------------------------------------------------

    def _start_job(self, message: JobAssigned) -> None:
        self._on_the_way = max(0, self._on_the_way - 1)
        job = Job(
            id=message.job_id,
            service=message.job_type,
            payload=message.params,
            priority=message.priority,
            attempt=message.attempt,
            timeout=message.timeout,
            lease_token=message.lease_token,
            created_at=message.created_at,
        )
        if job.id in self.running:
            return
        connector = self.by_service.get(job.service)
        ctx = JobContext(
            job=job,
            _progress=lambda pct, msg, stage: self._progress(job.id, pct, msg, stage),
            _store=self._store_output,
            _fetch=self._fetch_input,
            progress_interval_s=self.settings.progress_interval_s,
        )
        if connector is None:  # the hub should not do that; say so and hand it back
            log.error("job %s is for %s, which no connector here runs", job.id, job.service)
            asyncio.get_running_loop().create_task(self.send(ReleaseJob(job_id=job.id)))
            return
        running = Running(job, connector, ctx)
        self.running[job.id] = running
        running.task = asyncio.create_task(self._run_job(running), name=f"job-{job.id}")

    def _stop_job(self, job_id: str, reason: StopReason) -> None:
        running = self.running.get(job_id)
        if running is None or running.task is None or running.stop_reason is not None:
            return
        running.stop_reason = reason
        running.ctx.cancelled.set()
        if reason in {"cancelled", "timed_out"}:  # tell the service too
            asyncio.get_running_loop().create_task(self._cancel_service(running))
        running.task.cancel()

    async def _cancel_service(self, running: Running) -> None:
        try:
            await running.connector.cancel(running.job)
        except Exception:
            log.exception("connector %s could not interrupt job", running.connector.name)

    async def _progress(self, job_id: str, percent: float, message: str, stage: str) -> None:
        """Send a job's progress; with batching, queued for the next frame (the job goes
        on without waiting for the write)."""
        report = UpdateJobProgress(job_id=job_id, progress=percent, message=message, status=stage)
        if self.batching and self.conn is not None:
            self._post(report)
        else:
            await self.send(report)

    async def _store_output(
        self, context: JobContext, name: str, data: bytes, content_type: str
    ) -> OutputRef:
        ref = await first_answer(
            self.plugins.pm.hook.store_output,
            context=context,
            name=name,
            data=data,
            content_type=content_type,
        )
        if ref is None:
            raise JobFailed(f"no plugin stored output {name}")
        return OutputRef.model_validate(ref)

    async def _fetch_input(self, context: JobContext, url: str) -> InputFile:
        fetched = await first_answer(self.plugins.pm.hook.fetch_output, context=context, url=url)
        if fetched is None:
            raise JobFailed(f"input {url}: no plugin fetched it", retryable=False)
        return InputFile.model_validate(fetched)

    async def _run_job(self, running: Running) -> None:
        job, ctx = running.job, running.ctx
        JOB_ID.set(job.id)  # this task's lines (the connector's too) name the job
        outcome: Outcome = "completed"
        error: str | None = None
        final: CompleteJob | FailJob | ReleaseJob | None = None
        started = time.monotonic()
        timer = None
        try:
            async with self.slots[running.connector.name]:
                running.started = time.monotonic()
                log.info(
                    "job %s: started (%s, attempt %d)",
                    job.id,
                    job.service,
                    job.attempt,
                    extra={"event": "started", "service": job.service, "attempt": job.attempt},
                )
                # The hub records the start (started_at) at the first progress: say it now,
                # not at the connector's first report (which then counts as a later one).
                await ctx.progress(0, "started", "started")
                self.plugins.call("job_started", context=ctx)
                if job.timeout:  # stopped like a cancel: the connector sees ctx.cancelled
                    timer = asyncio.get_running_loop().call_later(
                        job.timeout, self._stop_job, job.id, "timed_out"
                    )
                result = await running.connector.run(job, ctx)
            if ctx.outputs and isinstance(result, dict):
                result.setdefault("outputs", [o.model_dump() for o in ctx.outputs])
            elif ctx.outputs and result is None:
                result = {"outputs": [o.model_dump() for o in ctx.outputs]}
            final = CompleteJob(job_id=job.id, result=result)
        except JobFailed as exc:
            outcome, error = "failed", str(exc)
            final = FailJob(job_id=job.id, error=error, retryable=exc.retryable)
        except asyncio.CancelledError:
            reason = running.stop_reason
            if reason is None:
                raise  # the worker itself is going down
            outcome = reason
            if reason == "released":
                final = ReleaseJob(job_id=job.id)
            elif reason == "timed_out":
                error = f"timed out after {job.timeout:g} s"
                final = FailJob(job_id=job.id, error=error)
        except Exception as exc:
            log.exception("job %s failed in connector %s", job.id, running.connector.name)
            outcome, error = "failed", f"{type(exc).__name__}: {exc}"
            final = FailJob(job_id=job.id, error=error, retryable=True)
        finally:
            if timer is not None:
                timer.cancel()
            ctx.end()
            self.running.pop(job.id, None)
        self._record(running, outcome, error, time.monotonic() - started)
        if final is not None and not await self.send(final):
            self.outbox[job.id] = (job.lease_token, final)  # sent after the reconnect
        self._changed.set()
        await self.request_work(top_up=True)

    def _record(self, running: Running, outcome: str, error: str | None, seconds: float) -> None:
        if running.started is not None:  # the pace of its jobs, for the prefetch
            took = time.monotonic() - running.started
            self.pace = took if self.pace is None else 0.8 * self.pace + 0.2 * took
        counters = {"completed": "completed", "failed": "failed", "timed_out": "failed"}
        name = counters.get(outcome, "released" if outcome == "released" else "cancelled")
        setattr(self.stats, name, getattr(self.stats, name) + 1)
        log.info(
            "job %s: %s in %.2f s%s",
            running.job.id,
            outcome,
            seconds,
            f" ({error})" if error else "",
            extra={"event": outcome, "seconds": round(seconds, 3)},
        )
        self.plugins.call("job_finished", context=running.ctx, outcome=outcome, error=error)

    async def _flush_outbox(self) -> None:
        for job_id, (_token, final) in list(self.outbox.items()):
            if await self.send(final):
                del self.outbox[job_id]
        self._changed.set()

    # -- stopping -------------------------------------------------------------------------

    def on_signal(self) -> None:
        """SIGTERM/SIGINT: drain; a later second signal: hand back at once."""
        now = time.monotonic()
        if now - self._last_signal < SAME_SIGNAL_S:
            return  # the same stop, delivered twice
        first = self._last_signal == float("-inf")
        self._last_signal = now
        if first:
            log.info("stopping: no new jobs; %d running may finish", self._started())
            self._drain = asyncio.get_running_loop().create_task(self.drain())
        else:
            log.info("stopping now: handing back %d jobs", len(self.running))
            self._release_all()

    def _release_all(self) -> None:
        for job_id in list(self.running):
            self._stop_job(job_id, "released")

    def _started(self) -> int:
        """How many of its jobs have started (the others are prefetched)."""
        return sum(1 for r in self.running.values() if r.started is not None)

    def _release_waiting(self) -> None:
        """Hand back the prefetched jobs that have not started: another worker may."""
        for job_id, running in list(self.running.items()):
            if running.started is None:
                self._stop_job(job_id, "released")

    async def drain(self) -> None:
        """Stop asking for work, let running jobs finish within the budget, hand back the
        rest, deliver what is left to say, and stop."""
        self.draining = True
        self._release_waiting()
        await self.request_work()
        await self._until(lambda: not self.running, self.settings.drain_timeout_s)
        self._release_all()
        tasks = [r.task for r in self.running.values() if r.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        # Results that could not be sent yet: give a reconnecting session a moment.
        await self._until(lambda: not self.outbox, 5)
        self.done.set()
        if self.conn is not None:
            with contextlib.suppress(Exception):
                await self.conn.close()

    async def _until(self, condition: Callable[[], bool], seconds: float) -> None:
        """Wait until `condition()` holds (checked whenever a job ends), at most `seconds`."""
        deadline = time.monotonic() + seconds
        while not condition() and (left := deadline - time.monotonic()) > 0:
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    def stop(self, *, now: bool = False) -> None:
        """Stop as a first signal would (for embedding and tests); `now`: also hand back
        the running jobs at once, as a second signal does."""
        if self._drain is None:
            self.on_signal()
        if now:
            self._release_all()
