"""The hub's ASGI app: FastAPI, its routes (emp_hub/routes/) and middleware: a request id
(`X-Request-ID`) in every request's log lines, a 503 with Retry-After when Redis is
unreachable, and a cap on request bodies. The replica's state is
`Hub` (emp_hub/hub.py), opened for the app's lifetime."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import emp_hub
from emp_hub.broker import REDIS_DOWN, BrokerError
from emp_hub.hub import open_hub
from emp_hub.logs import redact_secrets_in_logs
from emp_hub.routes import (
    api,
    dashboard,
    docs_ui,
    feed,
    legacy_client,
    legacy_monitor,
    outputs,
    worker,
)
from emp_hub.settings import HubSettings
from emp_protocol.logs import REQUEST_ID
from emp_protocol.runtime import freeze_startup_objects

log = logging.getLogger("emp_hub")

#: What a request that finds Redis unreachable is told (HTTP 503, WebSocket close 1013).
UNAVAILABLE = "the hub's Redis is unavailable; retry later"
#: The `Retry-After` of those 503 answers, in seconds.
RETRY_AFTER_S = 2


def create_app(settings: HubSettings | None = None) -> FastAPI:
    """The hub's ASGI app."""
    settings = settings or HubSettings()
    redact_secrets_in_logs()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_hub(settings) as hub:
            app.state.hub = hub
            stop_streams_on_signals(hub.stopping)
            freeze_startup_objects()
            yield

    app = HubApp(
        title="emp hub",
        version=emp_hub.__version__,
        description="A pull-based job broker for GPU AI workloads.",
        lifespan=lifespan,
        docs_url=None,  # docs_ui serves them, with their assets
        redoc_url=None,
    )
    docs_ui.add_docs(app)
    app.include_router(api.router)
    app.include_router(outputs.router)
    app.include_router(worker.router)
    app.include_router(legacy_client.router)
    app.include_router(legacy_monitor.router)
    app.include_router(feed.router)
    dashboard.add_dashboard(app)
    app.add_exception_handler(BrokerError, api.broker_error)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RedisUnavailable)
    return app


def stop_streams_on_signals(stopping: asyncio.Event) -> None:
    """Set `stopping` on SIGTERM and SIGINT, then let the server's own handler (uvicorn's,
    installed before the app starts) stop it as before. uvicorn's graceful shutdown waits
    for open responses before the app hears of it; the event streams watch `stopping`
    and end at once (Hub.until_stopping). Only in the main thread, where signals go."""
    if threading.current_thread() is not threading.main_thread():
        return
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if not callable(previous):
            continue  # no server handler to chain to: leave the default alone

        def handler(
            signum: int, frame: FrameType | None, previous: Callable[..., Any] = previous
        ) -> None:
            loop.call_soon_threadsafe(stopping.set)
            previous(signum, frame)

        signal.signal(sig, handler)


class HubApp(FastAPI):
    """FastAPI with `RequestId` outside all of its middleware (the lines logged for a
    request, its 500 and uvicorn's access line included, carry the request's id), and the
    routes' shortcuts (`api.FastPaths`) before its router."""

    def build_middleware_stack(self) -> ASGIApp:
        """Starlette's stack, `FastPaths` just inside its exception handlers, all inside
        `RequestId`."""
        stack = super().build_middleware_stack()
        layer: Any = stack  # each middleware holds the next as `app`
        while not isinstance(layer, ExceptionMiddleware):
            layer = layer.app
        layer.app = api.FastPaths(layer.app, [api.router])
        return RequestId(stack)


#: A request id taken from a request's X-Request-ID: at most 128 safe characters.
SANE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:@/+=-]{1,128}")


class RequestId:
    """Every HTTP request and WebSocket gets an id: its `X-Request-ID` when that is sane,
    else a new one; it is in the context (`REQUEST_ID`) for the request's log lines, and
    an HTTP answer carries it back in `X-Request-ID`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in {"http", "websocket"}:
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == b"x-request-id"), None)
        raw = given if given is not None and SANE_REQUEST_ID.fullmatch(given) else None
        raw = raw or os.urandom(8).hex().encode()
        header = (b"x-request-id", raw)

        async def with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        token = REQUEST_ID.set(raw.decode())
        # Not reset when the app raises: the server logs the error after this returns, in
        # this context (its own, one request's), and that line carries the id too.
        await self.app(scope, receive, with_id if scope["type"] == "http" else send)
        REQUEST_ID.reset(token)


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
