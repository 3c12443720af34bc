"""The connector contract: what a plugin implements to run jobs on a service.

A connector has a `name` (its settings are read from `EMP_<NAME>_*`), serves one or more
services (the jobs' `job_type`), and runs one job at a time per slot (`concurrency`
setting). `run(job, ctx)` returns the job's result (JSON-able), raises `JobFailed` for a
failure it understands, and watches `ctx.cancelled`; the worker also cancels its task on
a cancel from the hub or a timeout. docs/plugins.md has a complete example.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import mimetypes
import re
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from emp_protocol.capabilities import Name
from emp_protocol.jobs import OutputRef as OutputRef  # plugin authors import it from here
from emp_worker.settings import env_names as env_names  # for a connector's settings


class ConnectorSettings(BaseSettings):
    """Settings every connector has; subclass to add yours (read from EMP_<NAME>_*)."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    concurrency: int = Field(default=1, ge=1, le=256, description="Jobs run at once.")


class Health(BaseModel):
    """A connector's view of its service."""

    ok: bool
    detail: str = ""


class ConnectorCapabilities(BaseModel):
    """What a connector adds to the worker's capabilities."""

    model_config = ConfigDict(extra="forbid")

    services: frozenset[str]
    models: dict[str, frozenset[str]] = Field(default_factory=dict)


class CapabilityExtras(BaseModel):
    """What a plugin's `worker_capabilities` hook adds to the worker's capabilities."""

    model_config = ConfigDict(extra="forbid")

    tags: list[Name] = Field(default_factory=list, description="Added to the worker's tags.")
    region: Name | None = Field(default=None, description="Replaces the worker's region.")
    models: dict[Name, list[Name]] = Field(
        default_factory=dict, description="More models per service: {service: [model]}."
    )


class JobFailed(Exception):
    """Raised by a connector: the job failed. `retryable=False` sends it straight to the
    dead-letter set (a bad prompt); True lets the hub retry it (maybe on another worker)."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class Job(BaseModel):
    """A job as a connector sees it."""

    id: str
    service: str
    payload: dict[str, Any] = Field(default_factory=dict)
    priority: int = 0
    attempt: int = 1
    timeout: float = Field(default=0, description="Seconds this attempt may take; 0: none.")
    lease_token: str = ""
    created_at: float = 0


class InputFile(BaseModel):
    """A file a job takes as input, fetched with `JobContext.fetch`."""

    name: str = Field(description="The last part of its URL's path ('input' when it has none).")
    content_type: str = "application/octet-stream"
    data: bytes


#: An output of a job on the hub, as its reference's `url` gives it.
HUB_OUTPUT = re.compile(r"^/api/jobs/[^/\s]+/outputs/[^/\s]+$")
_REF_KEYS = frozenset(OutputRef.model_fields)

#: What `JobContext.fetch` takes: an output's reference (what `ctx.output` returns and a
#: job's result lists, or the same as a dict), or a URL (a hub output's path, http(s)://).
InputRef = OutputRef | Mapping[str, Any] | str


def input_url(value: Any) -> str | None:
    """The URL of `value` when it names a file to fetch as an input (`JobContext.fetch`):
    an `OutputRef`, a dict with a `url` and no keys but an OutputRef's (`name`, `size`,
    `content_type`, `url`), a hub output's path (`/api/jobs/<id>/outputs/<name>`) or an
    http(s) URL; None for anything else (a prompt, a number, base64 data)."""
    if isinstance(value, OutputRef):
        return value.url
    if isinstance(value, Mapping):
        url = value.get("url")
        if isinstance(url, str) and set(value) <= _REF_KEYS and input_url(url) is not None:
            return url
        return None
    if isinstance(value, str) and (
        HUB_OUTPUT.match(value) or value.startswith(("http://", "https://"))
    ):
        return value
    return None


#: Sends a progress report to the hub: (percent, message, stage).
ProgressSink = Callable[[float, str, str], Awaitable[None]]
#: Stores an output: (context, name, data, content type) -> its reference.
OutputSink = Callable[["JobContext", str, bytes, str], Awaitable[OutputRef]]
#: Fetches an input: (context, URL) -> the file.
InputSource = Callable[["JobContext", str], Awaitable[InputFile]]


#: Held progress reports being sent (kept referenced until done).
_SENDING: set[asyncio.Future[None]] = set()


@dataclass
class JobContext:
    """What `Connector.run` gets besides the job: progress, outputs, inputs, cancellation."""

    job: Job
    _progress: ProgressSink
    _store: OutputSink
    progress_interval_s: float = 0.5
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    outputs: list[OutputRef] = field(default_factory=list)
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("emp_worker.job"))
    _last_progress: float | None = None  # when the last report was sent
    _fetch: InputSource | None = None
    _held: tuple[float, str, str] | None = None  # a report waiting for the interval
    _timer: asyncio.TimerHandle | None = None  # sends it when the interval is up
    _ended: bool = False

    async def progress(self, percent: float, message: str = "", stage: str = "processing") -> None:
        """Report progress (0-100). The first report is sent at once; after it, at most
        one per `progress_interval_s`: one that comes sooner is sent when the interval is
        up, unless a newer one replaced it or the job ended (its result says 100%)."""
        if self._ended:
            return
        percent = max(0.0, min(100.0, percent))
        now = time.monotonic()
        last = self._last_progress
        if last is None or now - last >= self.progress_interval_s:
            self._drop_held()
            self._last_progress = now
            await self._progress(percent, message, stage)
            return
        if self._held is None:
            wait = last + self.progress_interval_s - now
            self._timer = asyncio.get_running_loop().call_later(wait, self._send_held)
        self._held = (percent, message, stage)

    def _send_held(self) -> None:
        self._timer = None
        held, self._held = self._held, None
        if held is not None and not self._ended:
            self._last_progress = time.monotonic()
            task = asyncio.ensure_future(self._progress(*held))
            _SENDING.add(task)
            task.add_done_callback(_SENDING.discard)

    def _drop_held(self) -> None:
        self._held = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def end(self) -> None:
        """The job has ended (the worker calls this): a report still waiting is dropped,
        and later ones are ignored."""
        self._ended = True
        self._drop_held()

    async def output(
        self, name: str, data: bytes | Path, content_type: str | None = None
    ) -> OutputRef:
        """Store an output file (bytes, or a file's path) through the output hook; its
        reference is added to the job's result."""
        if isinstance(data, Path):
            name = name or data.name
            data = await asyncio.to_thread(data.read_bytes)
        kind = content_type or mimetypes.guess_type(name)[0] or "application/octet-stream"
        ref = await self._store(self, name, data, kind)
        self.outputs.append(ref)
        return ref

    async def fetch(self, ref: InputRef) -> InputFile:
        """Fetch a file the job takes as input, through the `fetch_output` hook: an
        output's reference (an `OutputRef` or the same as a dict, e.g. from an earlier
        job's result) or its URL (`/api/jobs/<id>/outputs/<name>` on the hub), or any
        http(s) URL. An output on the hub is read as this job: another customer's job's
        outputs are not found. Raises JobFailed: not retryable when the file is not there
        (or may not be read), retryable when it could not be reached."""
        url = input_url(ref)
        if url is None:
            raise JobFailed(f"input {str(ref)[:200]!r} is not an output or a URL", retryable=False)
        if self._fetch is None:
            raise JobFailed(f"input {url}: this context cannot fetch inputs", retryable=False)
        return await self._fetch(self, url)


class Connector:
    """Base class of connectors. Subclasses set `name`, `Settings` and implement `run`."""

    #: The connector's name: `EMP_<NAME>_*` settings, `EMP_CONNECTORS` lists it.
    name: ClassVar[str] = ""
    #: Its settings model (subclass of ConnectorSettings).
    Settings: ClassVar[type[ConnectorSettings]] = ConnectorSettings

    def __init__(self, settings: ConnectorSettings | None = None) -> None:
        self.settings = settings if settings is not None else self.load_settings()

    @classmethod
    def env_prefix(cls) -> str:
        """`EMP_<NAME>_`: the start of its settings' environment variables."""
        return f"EMP_{cls.name.upper().replace('-', '_')}_"

    @classmethod
    def load_settings(cls) -> ConnectorSettings:
        """The connector's settings from the environment (`EMP_<NAME>_*`)."""
        return cls.Settings(_env_prefix=cls.env_prefix())

    @property
    def concurrency(self) -> int:
        """How many jobs it runs at once."""
        return self.settings.concurrency

    async def start(self) -> None:
        """Called once before the first job (connect to the service, warm up)."""

    async def stop(self) -> None:
        """Called once when the worker stops."""

    async def health(self) -> Health:
        """Whether the service is reachable (`emp-worker doctor`)."""
        return Health(ok=True)

    def capabilities(self) -> ConnectorCapabilities:
        """The services (and models per service) it offers. Default: its name."""
        return ConnectorCapabilities(services=frozenset({self.name}))

    async def run(self, job: Job, ctx: JobContext) -> Any:
        """Run one job; return its result (JSON-able)."""
        raise NotImplementedError

    async def cancel(self, job: Job) -> None:
        """Interrupt the service's work on this job (the worker also cancels `run`)."""

    def loaded_models(self) -> Collection[str] | None:
        """The models its service has loaded now, for model-warm affinity (docs/scheduling.md);
        None (the default): it cannot tell. Asked at every request for work and heartbeat:
        answer from what the connector already knows, without I/O."""
        return None


async def maybe_await(value: Any) -> Any:
    """A hook's answer, awaited if it is awaitable."""
    return await value if inspect.isawaitable(value) else value
