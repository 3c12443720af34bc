"""The hub: a FastAPI app over the broker. Stateless: every replica on one Redis is alike."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import redis.asyncio
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import emp_hub
from emp_hub.auth import TokenStore
from emp_hub.broker import Broker, BrokerError, CancelResult, Job, connect
from emp_hub.embedded import redis_url_or_embedded
from emp_hub.metrics import Metrics
from emp_hub.ratelimit import RateLimiter
from emp_hub.settings import HubSettings

log = logging.getLogger("emp_hub")


@dataclass
class Hub:
    """What the routes of one hub process share."""

    settings: HubSettings
    redis: redis.asyncio.Redis
    broker: Broker
    tokens: TokenStore
    limiter: RateLimiter
    metrics: Metrics

    async def cancel(self, job: Job, reason: str) -> CancelResult:
        """Cancel a job and, when it was running, tell its worker on whichever replica
        holds its connection (channel `{namespace}:cancel`)."""
        result = await self.broker.cancel(job.id, reason)
        if result.worker is not None:
            self.metrics.finished.labels(job.service, "cancelled").inc()
            notice = {"job_id": job.id, "worker": result.worker, "reason": reason}
            await self.redis.publish(self.broker.key("cancel"), json.dumps(notice))
        return result


async def maintain_until(stop: asyncio.Event, broker: Broker, interval: float) -> None:
    """Run the broker's idempotent maintenance pass every `interval` seconds until `stop`.
    (Stopped by an event, not by cancelling: a Redis command is never cut in half.)"""
    while not stop.is_set():
        try:
            await broker.maintain()
        except Exception:  # a Redis hiccup must not end the loop
            log.exception("maintenance pass failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)


@asynccontextmanager
async def open_hub(settings: HubSettings) -> AsyncIterator[Hub]:
    """Connect to Redis (or start the embedded Valkey), and run maintenance meanwhile."""
    with contextlib.ExitStack() as stack:
        # Starting the embedded server blocks for a moment, once, at start-up.
        url = stack.enter_context(
            redis_url_or_embedded(settings.redis_url, settings.data_dir / "valkey")
        )
        if not settings.redis_url:
            log.info("no EMP_REDIS_URL: using the embedded Valkey at %s", url)
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
        tokens=TokenStore(client, namespace, shared),
        limiter=RateLimiter(client, namespace, settings.submit_rate, settings.submit_burst),
        metrics=Metrics(),
    )
    if await hub.tokens.is_open():
        log.warning("no auth token configured and none created: the hub is open to anyone")
    stop = asyncio.Event()
    maintenance = asyncio.create_task(
        maintain_until(stop, hub.broker, settings.maintenance_interval_s)
    )
    try:
        yield hub
    finally:
        stop.set()
        await maintenance
        await client.aclose()


def create_app(settings: HubSettings | None = None) -> FastAPI:
    """The hub's ASGI app."""
    from emp_hub import docs_ui, outputs, ws, ws_client, ws_monitor  # the routes need Hub
    from emp_hub.api import broker_error, router

    settings = settings or HubSettings()

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
    return app


class BodySizeLimit:
    """Answer 413 to request bodies over `max_bytes` (declared or streamed)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = JSONResponse(
            {"detail": f"request body over {self.max_bytes} bytes"}, status_code=413
        )
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and int(declared) > self.max_bytes:
            await too_large(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _BodyTooLarge:
            await too_large(scope, receive, send)


class _BodyTooLarge(Exception):
    pass
