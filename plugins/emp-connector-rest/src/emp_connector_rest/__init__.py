"""Calls any HTTP service: one request whose response is the result (sync), or submit, poll
a status URL until done and fetch the result (async). Several services on one worker are
several named instances (`EMP_REST_INSTANCES=a,b`, then `EMP_REST_A_*`, `EMP_REST_B_*`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import mimetypes
import os
import time
from typing import Annotated, Any, Literal

import httpx
from pydantic import BaseModel, Field, ValidationError, field_validator
from pydantic_core import InitErrorDetails, PydanticCustomError
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from emp_worker import hookimpl
from emp_worker.connector import (
    Connector,
    ConnectorCapabilities,
    ConnectorSettings,
    Health,
    Job,
    JobContext,
    JobFailed,
)

__version__ = "0.1.0"

#: Payload keys that steer the request when the payload has a `body` (see README).
PATH_KEYS = ("id", "status", "progress", "result", "error")


def _comma_list(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


#: The original emp-redis settings (rest_sync / rest_async connectors) and our fields they
#: set in the default instance, where the EMP_REST_* setting is not given.
ORIGINAL = {
    "REST_BASE_URL": "base_url",
    "REST_ENDPOINT": "endpoint",
    "REST_TIMEOUT": "timeout",
    "REST_API_KEY": "api_key",
    "REST_ASYNC_SUBMIT_ENDPOINT": "submit_endpoint",
    "REST_ASYNC_STATUS_ENDPOINT": "status_endpoint",
    "REST_ASYNC_RESULT_ENDPOINT": "result_endpoint",
    "REST_ASYNC_TIMEOUT": "async_timeout",
    "REST_ASYNC_POLL_INTERVAL": "poll_interval",
}


class RestInstance(BaseSettings):
    """One REST service: where it is, how to call it, where things sit in its answers."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    services: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Job types it serves (default: its name)."
    )
    mode: Literal["sync", "async"] | None = Field(
        default=None, description="sync or async (default: async when a submit endpoint is set)."
    )
    base_url: str = Field(default="")
    endpoint: str = Field(default="")
    method: str = "POST"
    headers: dict[str, str] = Field(default_factory=dict)
    api_key: str = Field(default="")
    auth_header: str = "Authorization"
    auth_scheme: str = "Bearer"
    timeout: float = Field(default=60, gt=0)
    connect_timeout: float = Field(default=10, gt=0)
    retries: int = Field(default=3, ge=0, le=20)
    retry_backoff_s: float = Field(default=0.5, ge=0)
    max_response_bytes: int = Field(default=50 * 1024 * 1024, ge=1)
    health_endpoint: str = ""
    submit_endpoint: str = Field(default="")
    status_endpoint: str = Field(default="")
    result_endpoint: str = Field(default="")
    cancel_endpoint: str = ""
    cancel_method: str = "POST"
    async_timeout: float = Field(default=300, gt=0)
    poll_interval: float = Field(default=2.0, gt=0)
    id_path: str = "id"
    status_path: str = "status"
    progress_path: str = "progress"
    progress_max: float = Field(default=100, gt=0)
    result_path: str = ""
    error_path: str = "error"
    done_values: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["completed", "succeeded", "success", "done", "finished"]
    )
    failed_values: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["failed", "error", "cancelled", "canceled"]
    )

    @field_validator("services", "done_values", "failed_values", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return _comma_list(value)

    @property
    def is_async(self) -> bool:
        """Whether jobs are submitted and polled."""
        return self.mode == "async" or (self.mode is None and bool(self.submit_endpoint))

    def auth(self) -> dict[str, str]:
        """The auth header, if an API key is set."""
        if not self.api_key:
            return {}
        value = f"{self.auth_scheme} {self.api_key}" if self.auth_scheme else self.api_key
        return {self.auth_header: value}


class RestSettings(ConnectorSettings):
    """The connector's own settings (EMP_REST_*); each instance's are RestInstance's."""

    instances: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Names of the REST services; none: one, configured by EMP_REST_*.",
    )

    @field_validator("instances", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return _comma_list(value)


class Instance(BaseModel):
    """A configured instance: its name and settings."""

    name: str
    settings: RestInstance

    @property
    def services(self) -> list[str]:
        """The job types it serves."""
        if self.settings.services:
            return self.settings.services
        if self.name != "rest":
            return [self.name]
        return ["rest", "rest_async" if self.settings.is_async else "rest_sync"]


def load_instances(settings: RestSettings) -> list[Instance]:
    """The instances the environment configures (EMP_REST_INSTANCES, EMP_REST_<NAME>_*)."""
    if not settings.instances:
        env = {k.upper(): v for k, v in os.environ.items()}
        originals: dict[str, Any] = {
            field: env[name]
            for name, field in ORIGINAL.items()
            if name in env and f"EMP_REST_{field.upper()}" not in env
        }
        only = instance_settings("EMP_REST_", originals)
        if not (only.base_url or only.endpoint or only.submit_endpoint):
            return []  # not configured: installed next to others, it offers nothing
        return [Instance(name="rest", settings=only)]
    return [
        Instance(
            name=name,
            settings=instance_settings(f"EMP_REST_{name.upper().replace('-', '_')}_", {}),
        )
        for name in settings.instances
    ]


def instance_settings(prefix: str, originals: dict[str, Any]) -> RestInstance:
    """An instance's settings from the environment; an invalid one is named by its
    environment variable (`EMP_REST_<NAME>_TIMEOUT`, or the original name it came from)."""
    try:
        return RestInstance(_env_prefix=prefix, **originals)
    except ValidationError as exc:
        named = {field: name for name, field in ORIGINAL.items() if field in originals}
        errors: list[InitErrorDetails] = [
            {
                "type": PydanticCustomError("invalid_setting", e["msg"]),
                "loc": (named.get(str(e["loc"][0]), f"{prefix}{str(e['loc'][0]).upper()}"),)
                if e["loc"]
                else (),
                "input": e["input"],
            }
            for e in exc.errors()
        ]
        raise ValidationError.from_exception_data("RestInstance", errors) from exc


def lookup(data: Any, path: str) -> Any:
    """The value at a dotted path (`data.items.0.url`); the whole value for ""; None if absent."""
    if not path:
        return data
    for key in path.split("."):
        if isinstance(data, dict):
            data = data.get(key)
        elif (
            isinstance(data, list)
            and key.lstrip("-").isdigit()
            and -len(data) <= int(key) < len(data)
        ):
            data = data[int(key)]
        else:
            return None
    return data


class Response(BaseModel):
    """A service's answer, read whole (within the size cap)."""

    status: int
    content_type: str
    content: bytes

    def json_body(self, what: str) -> Any:
        """The body as JSON; a non-retryable failure if it is not JSON."""
        try:
            return json.loads(self.content)
        except ValueError as exc:
            raise JobFailed(
                f"{what}: the service's answer is not JSON ({self.content[:200]!r})",
                retryable=False,
            ) from exc

    @property
    def is_json(self) -> bool:
        """Whether the body says it is JSON."""
        kind = self.content_type.split(";")[0].strip().lower()
        return kind == "application/json" or kind.endswith("+json")

    @property
    def is_text(self) -> bool:
        """Whether the body is text."""
        return self.content_type.startswith("text/")


class RestConnector(Connector):
    """Calls HTTP services, sync or async, one configured instance per service."""

    name = "rest"
    Settings = RestSettings
    settings: RestSettings

    def __init__(
        self, settings: RestSettings | None = None, instances: list[Instance] | None = None
    ) -> None:
        super().__init__(settings)
        self.instances = instances if instances is not None else load_instances(self.settings)
        self.by_service: dict[str, Instance] = {}
        for instance in self.instances:
            for service in instance.services:
                self.by_service.setdefault(service, instance)
        self.http: httpx.AsyncClient | None = None
        #: Our job id -> (instance, the service's job id), while an async job runs.
        self.remote: dict[str, tuple[Instance, str]] = {}

    @property
    def concurrency(self) -> int:
        """Jobs at once (none when no service is configured)."""
        return self.settings.concurrency if self.instances else 0

    def capabilities(self) -> ConnectorCapabilities:
        """Every instance's services."""
        return ConnectorCapabilities(services=frozenset(self.by_service))

    def client(self) -> httpx.AsyncClient:
        """The shared HTTP client (made on first use)."""
        if self.http is None:
            self.http = httpx.AsyncClient(follow_redirects=True)
        return self.http

    async def stop(self) -> None:
        if self.http is not None:
            await self.http.aclose()
            self.http = None

    async def health(self) -> Health:
        """Every instance's service answers (any HTTP status under 500)."""
        if not self.instances:
            return Health(ok=True, detail="no service configured (EMP_REST_BASE_URL)")
        details, ok = [], True
        async with httpx.AsyncClient(follow_redirects=True) as http:  # doctor calls it alone
            for instance in self.instances:
                s = instance.settings
                url = join(s.base_url, s.health_endpoint)
                try:
                    response = await http.get(
                        url, headers={**s.headers, **s.auth()}, timeout=s.connect_timeout
                    )
                    up = response.status_code < 500
                    details.append(f"{instance.name}: HTTP {response.status_code}")
                except httpx.HTTPError as exc:
                    up = False
                    details.append(f"{instance.name}: unreachable ({type(exc).__name__})")
                ok &= up
        return Health(ok=ok, detail="; ".join(details))

    # -- HTTP ------------------------------------------------------------------------------

    async def request(
        self, s: RestInstance, method: str, url: str, what: str, **kwargs: Any
    ) -> Response:
        """One call, retried with backoff on 5xx, 408, 429, timeouts and connection errors; then a
        retryable JobFailed. A 4xx is a non-retryable JobFailed with the service's text."""
        headers = {**s.headers, **s.auth(), **kwargs.pop("headers", {})}
        timeout = httpx.Timeout(s.timeout, connect=s.connect_timeout)
        problem = ""
        for attempt in range(s.retries + 1):
            if attempt:
                await asyncio.sleep(s.retry_backoff_s * 2 ** (attempt - 1))
            try:
                response = await self._send(s, method, url, headers, timeout, **kwargs)
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                continue
            if response.status >= 500 or response.status in {408, 429}:
                problem = f"HTTP {response.status}: {error_text(response)}"
                continue
            if response.status >= 400:
                raise JobFailed(
                    f"{what}: HTTP {response.status}: {error_text(response)}", retryable=False
                )
            return response
        raise JobFailed(f"{what}: {problem} (after {s.retries + 1} tries)", retryable=True)

    async def _send(
        self,
        s: RestInstance,
        method: str,
        url: str,
        headers: dict[str, str],
        limits: httpx.Timeout,
        **kwargs: Any,
    ) -> Response:
        async with self.client().stream(
            method, url, headers=headers, timeout=limits, **kwargs
        ) as response:
            declared = response.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > s.max_response_bytes:
                raise_too_big(s)
            chunks, size = [], 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > s.max_response_bytes:
                    raise_too_big(s)
                chunks.append(chunk)
            return Response(
                status=response.status_code,
                content_type=response.headers.get("content-type", ""),
                content=b"".join(chunks),
            )

    # -- jobs ------------------------------------------------------------------------------

    async def run(self, job: Job, ctx: JobContext) -> Any:
        """Call the instance that serves the job's service."""
        instance = self.by_service.get(job.service)
        if instance is None:
            raise JobFailed(f"no REST instance serves {job.service!r}", retryable=False)
        call = Call(instance, job.payload)
        if instance.settings.is_async:
            return await self._run_async(job, ctx, call)
        await ctx.progress(0, f"calling {instance.name}", "started")
        response = await self.request(
            call.s, call.method, call.url(call.s.endpoint), "request", **call.body()
        )
        result = await self.result(ctx, response, call, "response")
        await ctx.progress(100, "done", "completed")
        return result

    async def _run_async(self, job: Job, ctx: JobContext, call: Call) -> Any:
        s = call.s
        await ctx.progress(0, f"submitting to {call.instance.name}", "started")
        submitted = await self.request(
            s, call.method, call.url(s.submit_endpoint), "submit", **call.body()
        )
        body = submitted.json_body("submit")
        remote = lookup(body, call.paths["id"])
        if not isinstance(remote, (str, int)) or isinstance(remote, bool):
            raise JobFailed(
                f"submit: no job id at {call.paths['id']!r} in {str(body)[:200]}", retryable=False
            )
        remote_id = str(remote)
        self.remote[job.id] = (call.instance, remote_id)
        stopped = False
        try:
            status = await self._poll(ctx, call, remote_id)
            if s.result_endpoint:
                fetched = await self.request(
                    s, "GET", call.url(s.result_endpoint, remote_id), "result"
                )
                result = await self.result(ctx, fetched, call, "result")
            else:
                result = lookup(status, call.paths["result"])
        except asyncio.CancelledError:
            stopped = True
            raise
        finally:
            if stopped:  # `cancel` may be called just after: keep the service's id for it
                asyncio.get_running_loop().call_later(60, self.remote.pop, job.id, None)
            else:
                self.remote.pop(job.id, None)
        await ctx.progress(100, "done", "completed")
        return result

    async def _poll(self, ctx: JobContext, call: Call, remote_id: str) -> Any:
        """Poll the status URL until the service's job is done; its last status answer."""
        s, paths = call.s, call.paths
        deadline = time.monotonic() + s.async_timeout
        best = 0.0
        done = {v.lower() for v in s.done_values}
        failed = {v.lower() for v in s.failed_values}
        url = call.url(s.status_endpoint, remote_id)
        while True:
            status = (await self.request(s, "GET", url, "status")).json_body("status")
            state = lookup(status, paths["status"])
            state_text = str(state).lower() if state is not None else ""
            if state_text in done:
                return status
            if state_text in failed:
                error = lookup(status, paths["error"]) or state
                raise JobFailed(
                    f"the service's job {remote_id} {state_text}: {error}", retryable=False
                )
            value = lookup(status, paths["progress"])
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                best = max(best, min(99.0, 100 * float(value) / s.progress_max))
            await ctx.progress(best, state_text or "running", "processing")
            if time.monotonic() + s.poll_interval > deadline:
                raise JobFailed(
                    f"the service's job {remote_id} not done after {s.async_timeout:g} s "
                    f"(last status {state_text or 'unknown'!r})",
                    retryable=True,
                )
            await asyncio.sleep(s.poll_interval)

    async def result(self, ctx: JobContext, response: Response, call: Call, what: str) -> Any:
        """A JSON answer (at the result path), text, or a binary stored as an output."""
        if response.is_json:
            data = response.json_body(what)
            return lookup(data, call.paths["result"]) if what == "response" else data
        if response.is_text:
            return {"text": response.content.decode(errors="replace")}
        if not response.content:
            return {"status_code": response.status}
        kind = response.content_type.split(";")[0].strip() or "application/octet-stream"
        ref = await ctx.output(output_name(kind), response.content, kind)
        return {"outputs": [ref.model_dump()]}

    async def cancel(self, job: Job) -> None:
        """Tell the service to cancel its job (async instances with a cancel endpoint)."""
        entry = self.remote.pop(job.id, None)
        if entry is None or not entry[0].settings.cancel_endpoint:
            return
        instance, remote_id = entry
        s = instance.settings
        url = join(s.base_url, s.cancel_endpoint.replace("{id}", remote_id))
        with contextlib.suppress(httpx.HTTPError):  # best effort: cancelled here anyway
            await self.client().request(
                s.cancel_method,
                url,
                headers={**s.headers, **s.auth()},
                timeout=httpx.Timeout(s.timeout, connect=s.connect_timeout),
            )


class Call:
    """One job's request: the instance's settings with the payload's overrides."""

    def __init__(self, instance: Instance, payload: dict[str, Any]) -> None:
        self.instance = instance
        self.s = s = instance.settings
        steered = "body" in payload
        self.payload = payload
        self.method = str(payload.get("method", s.method)).upper() if steered else s.method.upper()
        self.path = str(payload["path"]) if steered and "path" in payload else None
        overrides = payload.get("paths", {}) if steered else {}
        self.paths = {
            key: str(overrides.get(key, getattr(s, f"{key}_path")))
            if isinstance(overrides, dict)
            else getattr(s, f"{key}_path")
            for key in PATH_KEYS
        }

    def url(self, endpoint: str, remote_id: str | None = None) -> str:
        """The endpoint's URL (the payload's `path` replaces the sync or submit endpoint)."""
        if remote_id is None and self.path is not None:
            endpoint = self.path
        if remote_id is not None:
            endpoint = endpoint.replace("{id}", remote_id)
        return join(self.s.base_url, endpoint)

    def body(self) -> dict[str, Any]:
        """httpx arguments: the JSON body, query and extra headers."""
        if "body" not in self.payload:
            return {"json": self.payload}
        args: dict[str, Any] = {}
        if self.method not in {"GET", "HEAD", "DELETE"} or self.payload["body"] is not None:
            args["json"] = self.payload["body"]
        if isinstance(self.payload.get("query"), dict):
            args["params"] = self.payload["query"]
        if isinstance(self.payload.get("headers"), dict):
            args["headers"] = {str(k): str(v) for k, v in self.payload["headers"].items()}
        return args


def join(base: str, endpoint: str) -> str:
    """base_url + endpoint (an absolute endpoint URL stands alone)."""
    if endpoint.startswith(("http://", "https://")) or not base:
        return endpoint
    if not endpoint:
        return base
    return base.rstrip("/") + "/" + endpoint.lstrip("/")


def error_text(response: Response) -> str:
    """The service's error message: a JSON body's error/detail/message, or the text."""
    try:
        body = json.loads(response.content)
    except ValueError:
        return response.content[:500].decode(errors="replace").strip() or "(empty body)"
    if isinstance(body, dict):
        for key in ("error", "detail", "message"):
            if body.get(key):
                value = body[key]
                return value if isinstance(value, str) else json.dumps(value)[:500]
    return json.dumps(body)[:500]


def raise_too_big(s: RestInstance) -> None:
    """The answer is over the size cap: a non-retryable failure."""
    raise JobFailed(
        f"the service's answer is over {s.max_response_bytes} bytes "
        "(raise EMP_REST_MAX_RESPONSE_BYTES)",
        retryable=False,
    )


def output_name(content_type: str) -> str:
    """A file name for a binary answer."""
    return f"response{mimetypes.guess_extension(content_type) or '.bin'}"


@hookimpl
def register_connectors(register: Any) -> None:
    """The REST connector."""
    register(RestConnector)
