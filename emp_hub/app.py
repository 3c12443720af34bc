"""The hub: a FastAPI app over the broker. Stateless: every replica on one Redis is alike."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import redis.asyncio
import redis.exceptions
from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import emp_hub
from emp_hub.auth import TokenStore
from emp_hub.broker import Broker, BrokerError, CancelResult, Job, connect
from emp_hub.embedded import EmbeddedValkey
from emp_hub.logs import redact, redact_secrets_in_logs
from emp_hub.metrics import Metrics
from emp_hub.ratelimit import RateLimiter
from emp_hub.settings import HubSettings
from emp_hub.ws_common import OpenSockets

log = logging.getLogger("emp_hub")

#: What a request that finds Redis unreachable is told (HTTP 503, WebSocket close 1013).
UNAVAILABLE = "the hub's Redis is unavailable; retry later"
#: The `Retry-After` of those 503 answers, in seconds.
RETRY_AFTER_S = 2
REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


@dataclass
class Hub:
    """What the routes of one hub process share."""

    settings: HubSettings
    redis: redis.asyncio.Redis
    broker: Broker
    tokens: TokenStore
    limiter: RateLimiter
    metrics: Metrics
    sockets: OpenSockets = field(default_factory=OpenSockets)  # this replica's WebSockets

    async def cancel(self, job: Job, reason: str) -> CancelResult:
        """Cancel a job and, when it was running, tell its worker on whichever replica
        holds its connection (channel `{namespace}:cancel`)."""
        result = await self.broker.cancel(job.id, reason)
        if result.worker is not None:
            self.metrics.finished.labels(job.service, "cancelled").inc()
            notice = {"job_id": job.id, "worker": result.worker, "reason": reason}
            await self.redis.publish(self.broker.key("cancel_channel"), json.dumps(notice))
        return result


async def maintain_until(
    stop: asyncio.Event, broker: Broker, interval: float, outputs: Path | None = None
) -> None:
    """Run the broker's idempotent maintenance pass every `interval` seconds until `stop`,
    and remove the `outputs` of expired jobs.
    (Stopped by an event, not by cancelling: a Redis command is never cut in half.)"""
    from emp_hub.outputs import remove_expired  # it imports the routes, which import Hub

    while not stop.is_set():
        try:
            # This replica is alive (its workers' ids are held by live connections) for
            # three passes more: a replica killed outright frees its workers' ids then.
            await broker.replica_alive(3 * interval + 1)
            await broker.maintain()
            if outputs is not None:
                await remove_expired(broker, outputs)
        except REDIS_DOWN as exc:
            log.warning("maintenance pass skipped: %s", exc)
        except Exception:  # nothing must end the loop
            log.exception("maintenance pass failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)


@asynccontextmanager
async def open_hub(settings: HubSettings) -> AsyncIterator[Hub]:
    """Connect to Redis (or start the embedded Valkey), and run maintenance meanwhile."""
    with contextlib.ExitStack() as stack:
        url = settings.redis_url
        if not url:
            # Starting the embedded server blocks for a moment, once, at start-up. This
            # process owns it (DataDirLocked if another does) and restarts it if it dies.
            server = EmbeddedValkey(settings.data_dir / "valkey", supervise=True)
            url = stack.enter_context(server).url
            log.info(
                "no EMP_REDIS_URL: an embedded Valkey at %s keeps the data in %s",
                redact(url),
                server.data_dir,
            )
        async with _hub(settings, url) as hub:
            yield hub


@asynccontextmanager
async def _hub(settings: HubSettings, url: str) -> AsyncIterator[Hub]:
    client = connect(url)
    namespace = settings.broker.namespace
    shared = settings.auth_token.get_secret_value() if settings.auth_token else None
    hub = Hub(
        settings=settings,
        redis=client,
        broker=Broker(client, settings.broker),
        tokens=TokenStore(client, namespace, shared, settings.token_refresh_s),
        limiter=RateLimiter(client, namespace, settings.submit_rate, settings.submit_burst),
        metrics=Metrics(settings.metrics_max_queue_series, settings.metrics_max_services),
    )
    if await hub.tokens.is_open():
        log.warning("no auth token configured and none created: the hub is open to anyone")
    await hub.broker.replica_alive(3 * settings.maintenance_interval_s + 1)  # before sockets
    stop = asyncio.Event()
    maintenance = asyncio.create_task(
        maintain_until(stop, hub.broker, settings.maintenance_interval_s, settings.outputs)
    )
    token_checks = asyncio.create_task(hub.sockets.check_tokens_until(stop, hub.tokens))
    try:
        yield hub
    finally:
        stop.set()
        await maintenance
        await token_checks
        with contextlib.suppress(*REDIS_DOWN):  # its workers reconnect to another replica
            await hub.broker.replica_gone()
        await client.aclose()


def create_app(settings: HubSettings | None = None) -> FastAPI:
    """The hub's ASGI app."""
    from emp_hub import docs_ui, outputs, ws, ws_client, ws_monitor  # the routes need Hub
    from emp_hub.api import broker_error, router

    settings = settings or HubSettings()
    redact_secrets_in_logs()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_hub(settings) as hub:
            app.state.hub = hub
            app.state.dispatcher = dispatcher = ws.Dispatcher(hub)
            stop = asyncio.Event()
            listener = asyncio.create_task(dispatcher.listen(stop))
            try:
                yield
            finally:
                stop.set()
                await listener

    app = FastAPI(
        title="emp hub",
        version=emp_hub.__version__,
        description="A pull-based job broker for GPU AI workloads.",
        lifespan=lifespan,
        docs_url=None,  # docs_ui serves them, with their assets
        redoc_url=None,
    )
    docs_ui.add_docs(app)
    app.include_router(router)
    app.include_router(outputs.router)
    app.include_router(ws.router)
    app.include_router(ws_client.router)
    app.include_router(ws_monitor.router)
    app.add_exception_handler(BrokerError, broker_error)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RedisUnavailable)
    return app


#: Output uploads stream to disk under caps of their own (emp_hub/outputs.py).
OUTPUT_UPLOAD = re.compile(r"/api/jobs/[^/]+/outputs/[^/]+")


class RedisUnavailable:
    """A request that finds Redis unreachable (after the client's retries) gets 503 with
    `Retry-After` and a reason; a WebSocket is closed with 1013 (try again later), accepted
    first if it was not yet, rather than refused with an HTTP 500."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in {"http", "websocket"}:
            await self.app(scope, receive, send)
            return
        started = closed = False

        async def watched(message: Message) -> None:
            nonlocal started, closed
            started = started or message["type"] in {"http.response.start", "websocket.accept"}
            closed = closed or message["type"] == "websocket.close"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except REDIS_DOWN as exc:
            log.warning("%s %s: Redis unavailable (%s)", scope["type"], scope["path"], exc)
            if scope["type"] == "http":
                if started:  # a stream already under way: nothing to answer but a cut
                    raise
                unavailable = JSONResponse(
                    {"detail": UNAVAILABLE},
                    status_code=503,
                    headers={"Retry-After": str(RETRY_AFTER_S)},
                )
                await unavailable(scope, receive, send)
            elif not closed:
                if not started:
                    await send({"type": "websocket.accept"})
                await send({"type": "websocket.close", "code": 1013, "reason": UNAVAILABLE})


class BodySizeLimit:
    """Answer 413 to request bodies over `max_bytes`, declared (Content-Length) or streamed
    (chunked), on every route that reads a body; output uploads have caps of their own."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (
            scope["method"] == "PUT" and OUTPUT_UPLOAD.fullmatch(scope["path"])
        ):
            await self.app(scope, receive, send)
            return
        reason = f"request body over {self.max_bytes} bytes"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and int(declared) > self.max_bytes:
            await JSONResponse({"detail": reason}, status_code=413)(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # An HTTPException: the app's handlers answer it (FastAPI re-raises it
                    # from its body parsing, where any other error would become a 400).
                    raise HTTPException(413, reason)
            return message

        await self.app(scope, limited, send)
