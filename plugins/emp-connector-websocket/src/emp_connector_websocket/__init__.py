"""A generic connector for services that speak WebSocket.

Each job opens its own connection to the service, sends the job as one JSON frame built
from a template, and reads frames until one of them is the job's result or error. Which
frames are progress, result or error, and where their values sit, is configured (dotted
paths and `path=value` matches); frames of other jobs (by the job-id field) are ignored.
A dropped connection is reopened and the job frame sent again, a few times, then the job
fails retryable. A cancelled job gets the cancel frame, if one is configured.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import logging
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import NoDecode
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidURI, WebSocketException

from emp_worker import hookimpl
from emp_worker.connector import (
    Connector,
    ConnectorCapabilities,
    ConnectorSettings,
    Health,
    Job,
    JobContext,
    JobFailed,
    env_names,
)

__version__ = "0.1.0"

log = logging.getLogger("emp_connector_websocket")

#: Errors that mean the connection could not be opened or was lost.
CONNECTION_ERRORS = (OSError, TimeoutError, WebSocketException)


_env = functools.partial(env_names, prefix="EMP_WEBSOCKET_")


class WebSocketSettings(ConnectorSettings):
    """Where the service is and how its frames look (EMP_WEBSOCKET_*)."""

    url: str = Field(default="ws://localhost:8765", validation_alias=_env("url"))
    services: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["websocket"], validation_alias=_env("services")
    )
    username: str = Field(default="", validation_alias=_env("username"))
    password: str = Field(default="", validation_alias=_env("password"))
    auth_token: str = Field(default="", validation_alias=_env("auth_token"))
    connect_timeout: float = Field(
        default=30, gt=0, validation_alias=_env("connect_timeout", "WORKER_CONNECTION_TIMEOUT")
    )
    idle_timeout: float = Field(default=300, ge=0, validation_alias=_env("idle_timeout"))
    ping_interval: float = Field(default=20, ge=0, validation_alias=_env("ping_interval"))
    ping_timeout: float = Field(default=20, gt=0, validation_alias=_env("ping_timeout"))
    reconnect_attempts: int = Field(default=3, ge=0, validation_alias=_env("reconnect_attempts"))
    reconnect_delay: float = Field(default=1.0, ge=0, validation_alias=_env("reconnect_delay"))
    job_template: dict[str, Any] = Field(
        default_factory=lambda: {"type": "job", "job_id": "{job_id}", "payload": "{payload}"},
        validation_alias=_env("job_template"),
    )
    cancel_template: dict[str, Any] | None = Field(
        default=None, validation_alias=_env("cancel_template")
    )
    job_id_path: str = Field(default="job_id", validation_alias=_env("job_id_path"))
    progress_match: str = Field(default="type=progress", validation_alias=_env("progress_match"))
    progress_path: str = Field(default="progress", validation_alias=_env("progress_path"))
    progress_scale: float = Field(default=100, gt=0, validation_alias=_env("progress_scale"))
    message_path: str = Field(default="message", validation_alias=_env("message_path"))
    result_match: str = Field(default="type=result", validation_alias=_env("result_match"))
    result_path: str = Field(default="result", validation_alias=_env("result_path"))
    error_match: str = Field(default="type=error", validation_alias=_env("error_match"))
    error_path: str = Field(default="error", validation_alias=_env("error_path"))
    error_retryable_path: str = Field(default="", validation_alias=_env("error_retryable_path"))
    error_retryable: bool = Field(default=False, validation_alias=_env("error_retryable"))

    @field_validator("services", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("progress_match", "result_match", "error_match")
    @classmethod
    def _is_a_match(cls, value: str) -> str:
        if value and "=" not in value:
            raise ValueError(f"{value!r} is not path=value")
        return value


_MISSING = object()


def at_path(frame: Any, path: str) -> Any:
    """The value at a dotted path (`data.percent`, `items.0.url`) of a frame; `_MISSING`
    where there is none. The empty path is the whole frame."""
    value = frame
    for key in path.split(".") if path else ():
        if isinstance(value, dict) and key in value:
            value = value[key]
        elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        else:
            return _MISSING
    return value


def matches(frame: Any, match: str) -> bool:
    """Whether `path=value` holds of a frame (values compared as text)."""
    if not match:
        return False
    path, _, expected = match.partition("=")
    value = at_path(frame, path.strip())
    return value is not _MISSING and _text(value) == expected.strip()


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def render(template: Any, job: Job) -> Any:
    """The template with the job substituted: a string that is exactly `{payload}` becomes
    the payload (an object), and `{job_id}`, `{service}`, `{attempt}` inside strings are
    replaced by the job's values."""
    if isinstance(template, dict):
        return {key: render(value, job) for key, value in template.items()}
    if isinstance(template, list):
        return [render(value, job) for value in template]
    if isinstance(template, str):
        if template == "{payload}":
            return job.payload
        return (
            template.replace("{job_id}", job.id)
            .replace("{service}", job.service)
            .replace("{attempt}", str(job.attempt))
        )
    return template


class Dropped(Exception):
    """The connection to the service was lost (or never opened)."""


class WebSocketConnector(Connector):
    """Runs each job over its own WebSocket connection to the configured service."""

    name = "websocket"
    Settings = WebSocketSettings
    settings: WebSocketSettings

    def __init__(self, settings: WebSocketSettings | None = None) -> None:
        super().__init__(settings)
        self._closing: set[asyncio.Task[None]] = set()

    def capabilities(self) -> ConnectorCapabilities:
        """The configured services."""
        return ConnectorCapabilities(services=frozenset(self.settings.services))

    def _headers(self) -> dict[str, str]:
        settings = self.settings
        if settings.username or settings.password:
            pair = f"{settings.username}:{settings.password}".encode()
            return {"Authorization": "Basic " + base64.b64encode(pair).decode()}
        if settings.auth_token:
            return {"Authorization": f"Bearer {settings.auth_token}"}
        return {}

    def _connect(self) -> connect:
        settings = self.settings
        return connect(
            settings.url,
            additional_headers=self._headers(),
            open_timeout=settings.connect_timeout,
            ping_interval=settings.ping_interval or None,
            ping_timeout=settings.ping_timeout,
            max_size=None,
        )

    async def health(self) -> Health:
        """Whether a connection to the service opens."""
        try:
            async with self._connect():
                return Health(ok=True, detail=f"connected to {self.settings.url}")
        except (*CONNECTION_ERRORS, InvalidURI) as exc:
            return Health(ok=False, detail=f"cannot connect to {self.settings.url}: {exc}")

    async def run(self, job: Job, ctx: JobContext) -> Any:
        """Send the job frame and follow the job's frames to its result or error,
        reconnecting (and sending the job frame again) when the connection drops."""
        state = {"best": 0.0}
        drops = 0
        while True:
            try:
                return await self._session(job, ctx, state)
            except Dropped as exc:
                drops += 1
                if drops > self.settings.reconnect_attempts:
                    raise JobFailed(
                        f"websocket service {self.settings.url}: {exc} "
                        f"(after {drops - 1} reconnects)",
                        retryable=True,
                    ) from None
                log.warning("job %s: %s; reconnecting (%d)", job.id, exc, drops)
                await asyncio.sleep(self.settings.reconnect_delay)

    async def _session(self, job: Job, ctx: JobContext, state: dict[str, float]) -> Any:
        settings = self.settings
        try:
            conn = await self._connect()
        except InvalidURI as exc:
            raise JobFailed(f"bad websocket url: {exc}", retryable=False) from None
        except CONNECTION_ERRORS as exc:
            raise Dropped(f"cannot connect: {exc or type(exc).__name__}") from None
        try:
            await conn.send(json.dumps(render(settings.job_template, job)))
            while True:
                async with asyncio.timeout(settings.idle_timeout or None):
                    raw = await conn.recv()
                outcome = await self._frame(job, ctx, raw, state)
                if outcome is not None:
                    return outcome[0]
        except TimeoutError:
            raise Dropped(f"no frame for {settings.idle_timeout:g} s") from None
        except (OSError, WebSocketException) as exc:
            raise Dropped(f"connection lost: {exc or type(exc).__name__}") from None
        except asyncio.CancelledError:
            await self._send_cancel(conn, job)
            raise
        finally:
            # Closed in the background: the close handshake need not delay the job's end.
            closing = asyncio.get_running_loop().create_task(self._close(conn))
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)

    @staticmethod
    async def _close(conn: ClientConnection) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(conn.close(), 2)

    async def stop(self) -> None:
        """Wait for the connections still closing."""
        if self._closing:
            await asyncio.wait(set(self._closing), timeout=3)

    async def _send_cancel(self, conn: ClientConnection, job: Job) -> None:
        if self.settings.cancel_template is None:
            return
        frame = json.dumps(render(self.settings.cancel_template, job))
        with contextlib.suppress(*CONNECTION_ERRORS):
            await asyncio.wait_for(conn.send(frame), 2)

    async def _frame(
        self, job: Job, ctx: JobContext, raw: str | bytes, state: dict[str, float]
    ) -> tuple[Any] | None:
        """Handle one frame: None to keep reading, (result,) when the job is done."""
        settings = self.settings
        try:
            frame = json.loads(raw)
        except ValueError:
            log.warning("job %s: ignored a frame that is not JSON: %.200r", job.id, raw)
            return None
        if settings.job_id_path:
            owner = at_path(frame, settings.job_id_path)
            if owner is not _MISSING and _text(owner) != job.id:
                return None  # another job's frame
        if matches(frame, settings.error_match):
            raise self._error(frame)
        if matches(frame, settings.result_match):
            result = at_path(frame, settings.result_path)
            if result is _MISSING:
                raise JobFailed(
                    f"malformed result frame: nothing at {settings.result_path!r}: "
                    f"{json.dumps(frame)[:500]}",
                    retryable=False,
                )
            await ctx.progress(100, "completed", "finalizing")
            return (result,)
        if matches(frame, settings.progress_match):
            value = at_path(frame, settings.progress_path)
            if isinstance(value, bool) or not isinstance(value, int | float):
                log.warning("job %s: ignored a progress frame without a number", job.id)
                return None
            percent = min(100.0, max(0.0, 100 * float(value) / settings.progress_scale))
            if percent >= state["best"]:  # never backwards; 100 only with the result
                state["best"] = percent
                message = at_path(frame, settings.message_path)
                text = "" if message is _MISSING or message is None else _text(message)
                await ctx.progress(min(percent, 99.0), text)
        return None

    def _error(self, frame: Any) -> JobFailed:
        settings = self.settings
        error = at_path(frame, settings.error_path)
        if error is _MISSING or error is None:
            error = frame
        text = error if isinstance(error, str) else json.dumps(error)
        retryable = settings.error_retryable
        if settings.error_retryable_path:
            flag = at_path(frame, settings.error_retryable_path)
            if isinstance(flag, bool):
                retryable = flag
        return JobFailed(f"service error: {text}", retryable=retryable)


@hookimpl
def register_connectors(register: Any) -> None:
    """The websocket connector."""
    register(WebSocketConnector)
