"""AUTOMATIC1111 (stable-diffusion-webui) connector: txt2img and img2img through its API.

A job's payload is A1111's own request body (the original emp-redis payload), plus
`endpoint` ("txt2img" or "img2img"; img2img when `init_images` is given) and optionally
`model` (a checkpoint title, name or hash) to switch to first. Progress comes from polling
/sdapi/v1/progress; images come back base64 and are stored as outputs, never in the result.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import json
import re
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import httpx
from pydantic import Field, field_validator
from pydantic_settings import NoDecode

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
    input_url,
)

__version__ = "0.1.0"

#: Payload keys that steer the connector and are not sent to A1111.
CONTROL_KEYS = ("endpoint", "model")
ENDPOINTS = ("txt2img", "img2img")
#: What the hub accepts as a model name (emp_protocol's Name); others are not advertised.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,199}")
#: Fields of an `alwayson_scripts` unit (ControlNet's and alike) that hold an image.
SCRIPT_IMAGE_FIELDS = ("image", "input_image", "mask", "mask_image")
#: Generation maps onto 0..GENERATION_END % of the job; storing the images ends it.
GENERATION_END = 95.0


_env = functools.partial(env_names, prefix="EMP_A1111_")


class A1111Settings(ConnectorSettings):
    """Where A1111 is and how to talk to it (EMP_A1111_*, or the original names)."""

    url: str = Field(
        default="http://localhost:7860", validation_alias=_env("url", "WORKER_A1111_URL")
    )
    username: str = Field(default="", validation_alias=_env("username", "A1111_USERNAME"))
    password: str = Field(default="", validation_alias=_env("password", "A1111_PASSWORD"))
    timeout_s: float = Field(default=600, gt=0, validation_alias=_env("timeout_s"))
    connect_timeout_s: float = Field(default=5, gt=0, validation_alias=_env("connect_timeout_s"))
    poll_interval_s: float = Field(default=0.5, gt=0, validation_alias=_env("poll_interval_s"))
    models_refresh_s: float = Field(default=60, ge=0, validation_alias=_env("models_refresh_s"))
    services: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["a1111"], validation_alias=_env("services")
    )

    @field_validator("services", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value


def describe_error(response: httpx.Response) -> str:
    """A1111's error body as one line: `{error, detail, errors}` or FastAPI's 422 list."""
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip().replace("\n", " ")[:300]
        return f"HTTP {response.status_code}: {text or response.reason_phrase}"
    if isinstance(body, dict) and isinstance(body.get("detail"), list):  # validation
        problems = "; ".join(
            f"{'.'.join(str(p) for p in item.get('loc', []) if p != 'body') or 'body'}: "
            f"{item.get('msg', '')}"
            for item in body["detail"]
            if isinstance(item, dict)
        )
        return f"HTTP {response.status_code} invalid request: {problems}"
    if isinstance(body, dict):
        kind = str(body.get("error") or "")
        text = str(body.get("detail") or body.get("errors") or "")
        return f"HTTP {response.status_code} {kind}: {text}".replace(" : ", ": ").strip()
    return f"HTTP {response.status_code}: {str(body)[:300]}"


def _retryable(response: httpx.Response, message: str) -> bool:
    """Whether another try (maybe elsewhere) could succeed."""
    if response.status_code in (401, 403):  # this worker's credentials
        return True
    if response.status_code < 500:  # the request itself is wrong
        return False
    if response.status_code == 500:
        lowered = message.lower()
        transient = ("out of memory", "outofmemory", "no checkpoints found", "filenotfounderror")
        return any(word in lowered for word in transient)
    return True  # 502/503/504: a proxy or a restarting server


def _file_name(model: dict[str, Any]) -> str:
    """A checkpoint's file name without its folder ("sd_xl_base_1.0.safetensors")."""
    return str(model.get("filename") or "").replace("\\", "/").rsplit("/", 1)[-1]


def _image_type(data: bytes) -> tuple[str, str]:
    """(extension, content type) of an image by its first bytes."""
    if data.startswith(b"\x89PNG"):
        return "png", "image/png"
    if data.startswith(b"\xff\xd8"):
        return "jpg", "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp", "image/webp"
    return "bin", "application/octet-stream"


class A1111Connector(Connector):
    """Runs txt2img/img2img on one AUTOMATIC1111 server."""

    name = "a1111"
    Settings = A1111Settings
    settings: A1111Settings

    def __init__(self, settings: A1111Settings | None = None) -> None:
        super().__init__(settings)
        self.models: list[dict[str, Any]] = []  #: the last /sdapi/v1/sd-models answer
        self._http: httpx.AsyncClient | None = None
        # One job at a time talks to A1111 (a model switch and the generation that needs
        # it): A1111 runs one generation at a time anyway, its progress is global, and a
        # switch must not happen under another job's generation.
        self._turn = asyncio.Lock()
        self._active: set[str] = set()  # jobs whose generation request is in flight
        self._refresher: asyncio.Task[None] | None = None
        #: The title of the checkpoint A1111 has loaded, as last read or set; None: unknown.
        self.loaded: str | None = None

    # -- the service ------------------------------------------------------------------

    @property
    def http(self) -> httpx.AsyncClient:
        """The HTTP client (made on first use)."""
        if self._http is None:
            s = self.settings
            auth = httpx.BasicAuth(s.username, s.password) if s.username else None
            self._http = httpx.AsyncClient(
                base_url=s.url.rstrip("/"),
                auth=auth,
                timeout=httpx.Timeout(s.timeout_s, connect=s.connect_timeout_s),
            )
        return self._http

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        """One API call; its JSON answer, or JobFailed with A1111's error made clear."""
        try:
            response = await self.http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise JobFailed(f"A1111 at {self.settings.url} timed out on {path}") from exc
        except httpx.HTTPError as exc:
            raise JobFailed(
                f"A1111 at {self.settings.url} unreachable on {path}: {exc or type(exc).__name__}"
            ) from exc
        if response.status_code >= 400:
            message = describe_error(response)
            raise JobFailed(f"A1111 {path}: {message}", retryable=_retryable(response, message))
        try:
            return response.json()
        except ValueError as exc:
            raise JobFailed(
                f"A1111 {path} answered something that is not JSON: {response.text[:200]!r}"
            ) from exc

    async def refresh_models(self) -> list[dict[str, Any]]:
        """Read /sdapi/v1/sd-models into `self.models`."""
        answer = await self._call("GET", "/sdapi/v1/sd-models")
        if not isinstance(answer, list):
            raise JobFailed(f"A1111 sd-models answered {str(answer)[:200]}")
        self.models = [m for m in answer if isinstance(m, dict) and "title" in m]
        return self.models

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.models_refresh_s)
            with contextlib.suppress(JobFailed):
                await self.refresh_models()
                await self.read_loaded()  # switched in the web UI meanwhile

    async def read_loaded(self) -> str | None:
        """Read the loaded checkpoint from /sdapi/v1/options (`sd_model_checkpoint`)."""
        options = await self._call("GET", "/sdapi/v1/options")
        title = options.get("sd_model_checkpoint") if isinstance(options, dict) else None
        self.loaded = title if isinstance(title, str) else None
        return self.loaded

    def loaded_models(self) -> list[str] | None:
        """The loaded checkpoint's names, as `capabilities` gives them (model name and file
        name); None before it was first read."""
        if self.loaded is None:
            return None
        return sorted(
            name
            for m in self.models
            if m.get("title") == self.loaded
            for name in {m.get("model_name"), _file_name(m)}
            if isinstance(name, str) and MODEL_NAME.fullmatch(name)
        )

    async def start(self) -> None:
        """Read the models and the loaded one (a server that is down now is not an error:
        health says so)."""
        with contextlib.suppress(JobFailed):
            await self.refresh_models()
            await self.read_loaded()
        if self.settings.models_refresh_s > 0:
            self._refresher = asyncio.create_task(self._refresh_forever())

    async def stop(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def health(self) -> Health:
        """A1111 answers /sdapi/v1/options (behind --api-auth, so credentials are checked)."""
        try:
            loaded = await self.read_loaded()
            models = await self.refresh_models()
        except JobFailed as exc:
            return Health(ok=False, detail=str(exc))
        return Health(ok=True, detail=f"{len(models)} checkpoints, loaded: {loaded}")

    def capabilities(self) -> ConnectorCapabilities:
        """The configured services, each with the checkpoints A1111 listed (by name)."""
        services = frozenset(self.settings.services)
        names = frozenset(
            name
            for m in self.models
            for name in (m.get("model_name"), _file_name(m))
            if isinstance(name, str) and MODEL_NAME.fullmatch(name)
        )
        return ConnectorCapabilities(
            services=services, models={s: names for s in services} if names else {}
        )

    # -- a job ------------------------------------------------------------------------

    def _checkpoint(self, wanted: str) -> str | None:
        """The title of the checkpoint `wanted` names (title, file name, model name, hash)."""
        for model in self.models:
            aliases = {model.get("title"), model.get("model_name"), model.get("hash")}
            if wanted in aliases or wanted == _file_name(model):
                return str(model["title"])
        return None

    async def _ensure_model(self, wanted: str, ctx: JobContext) -> str:
        """Switch A1111 to the checkpoint `wanted` unless it is loaded; its title."""
        title = self._checkpoint(wanted)
        if title is None:
            await self.refresh_models()
            title = self._checkpoint(wanted)
        if title is None:
            known = ", ".join(str(m.get("title")) for m in self.models) or "none"
            raise JobFailed(
                f"A1111 has no checkpoint {wanted!r} (it has: {known})", retryable=False
            )
        if await self.read_loaded() == title:
            return title
        await ctx.progress(0, f"loading model {title}", "loading_model")
        await self._call("POST", "/sdapi/v1/options", json={"sd_model_checkpoint": title})
        self.loaded = title
        await ctx.progress(0, f"loaded model {title}", "loading_model")
        return title

    async def _poll(self, ctx: JobContext) -> None:
        """Report /sdapi/v1/progress (monotonic, with the ETA) until cancelled."""
        best = 0.0
        while True:
            await asyncio.sleep(self.settings.poll_interval_s)
            try:
                answer = await self._call("GET", "/sdapi/v1/progress?skip_current_image=true")
                fraction = float(answer.get("progress") or 0)
                eta = float(answer.get("eta_relative") or 0)
                state = answer.get("state") or {}
                step, steps = state.get("sampling_step"), state.get("sampling_steps")
            except (JobFailed, AttributeError, TypeError, ValueError):
                continue  # the generation request's own answer decides the job
            percent = max(0.0, min(1.0, fraction)) * GENERATION_END
            if percent <= best:
                continue
            best = percent
            where = f"step {step}/{steps}" if steps else "generating"
            await ctx.progress(percent, f"{where}, ETA {eta:.1f} s")

    async def run(self, job: Job, ctx: JobContext) -> dict[str, Any]:
        """Switch the model if asked, generate while polling progress, store the images."""
        began = time.perf_counter()
        payload = dict(job.payload)
        endpoint = str(payload.get("endpoint") or "")
        if not endpoint:
            endpoint = "img2img" if payload.get("init_images") else "txt2img"
        if endpoint not in ENDPOINTS:
            raise JobFailed(
                f"unknown endpoint {endpoint!r} (use txt2img or img2img)", retryable=False
            )
        body = {k: v for k, v in payload.items() if k not in CONTROL_KEYS}
        await self.fetch_images(body, ctx)
        overrides = body.get("override_settings")
        wanted = payload.get("model")
        if wanted is None and isinstance(overrides, dict):
            wanted = overrides.get("sd_model_checkpoint")
        await ctx.progress(0, "started", "started")
        if self._turn.locked():
            await ctx.progress(0, "waiting for A1111 (busy with another job)", "queued")
        async with self._turn:
            model = await self._ensure_model(str(wanted), ctx) if wanted else None
            answer = await self._generate(job, ctx, endpoint, body)
            await self._check_not_interrupted(endpoint)
        images = answer.get("images") if isinstance(answer, dict) else None
        if not isinstance(images, list):
            raise JobFailed(f"A1111 {endpoint} answered without images: {str(answer)[:200]}")
        await ctx.progress(GENERATION_END, f"storing {len(images)} images", "storing")
        refs = []
        for index, encoded in enumerate(images):
            data = self._decode(encoded, index)
            extension, content_type = _image_type(data)
            ref = await ctx.output(f"image-{index}.{extension}", data, content_type)
            refs.append(ref.model_dump())
        info: Any = answer.get("info")
        if isinstance(info, str):
            with contextlib.suppress(ValueError):
                info = json.loads(info)
        parameters = answer.get("parameters")
        if isinstance(parameters, dict):  # the echo repeats the input images: count them
            parameters = {
                k: (f"<{len(v)} images>" if k in ("init_images",) and isinstance(v, list) else v)
                for k, v in parameters.items()
                if k != "mask" or not v
            }
        await ctx.progress(100, "done", "completed")
        return {
            "status": "success",
            "endpoint": endpoint,
            "model": model,
            "images": refs,
            "info": info,
            "parameters": parameters,
            "elapsed_s": round(time.perf_counter() - began, 6),
        }

    async def fetch_images(self, body: dict[str, Any], ctx: JobContext) -> None:
        """Images given as references (an earlier job's output: its reference or URL; or an
        http(s) URL) where A1111 takes base64: `init_images`, `mask`, and the image fields
        of `alwayson_scripts` units (ControlNet's `image`, `input_image`, `mask`...; also
        inside ControlNet's `{"image": ..., "mask": ...}`): fetched (`ctx.fetch`) and put
        in as base64. The body is changed in place (its lists and units are copies)."""

        async def resolved(value: Any) -> Any:
            if input_url(value) is None:
                return value
            return base64.b64encode((await ctx.fetch(value)).data).decode()

        if isinstance(body.get("init_images"), list):
            body["init_images"] = [await resolved(v) for v in body["init_images"]]
        if "mask" in body:
            body["mask"] = await resolved(body["mask"])
        scripts = body.get("alwayson_scripts")
        if not isinstance(scripts, dict):
            return
        body["alwayson_scripts"] = scripts = dict(scripts)
        for name, script in scripts.items():
            if isinstance(script, dict) and isinstance(script.get("args"), list):
                args = [await _script_unit(unit, resolved) for unit in script["args"]]
                scripts[name] = {**script, "args": args}

    async def _generate(
        self, job: Job, ctx: JobContext, endpoint: str, body: dict[str, Any]
    ) -> Any:
        """POST the generation, polling its progress meanwhile; interrupt it if cancelled."""
        poller = asyncio.create_task(self._poll(ctx))
        self._active.add(job.id)
        try:
            return await self._call("POST", f"/sdapi/v1/{endpoint}", json=body)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):  # leave nothing running in A1111
                await asyncio.shield(self.interrupt())
            raise
        finally:
            self._active.discard(job.id)
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller

    async def _check_not_interrupted(self, endpoint: str) -> None:
        """A1111 answers an interrupted generation with 200 and the partial images; its
        state keeps `interrupted` until the next one begins. Not ours (ours cancels run):
        someone else stopped it, so the images are not what the job asked for."""
        try:
            state = (await self._call("GET", "/sdapi/v1/progress?skip_current_image=true"))["state"]
            interrupted = bool(state.get("interrupted"))
        except (JobFailed, KeyError, TypeError, AttributeError):
            return  # the answer we have decides
        if interrupted:
            raise JobFailed(f"A1111's {endpoint} was interrupted outside emp (partial images)")

    @staticmethod
    def _decode(encoded: Any, index: int) -> bytes:
        if not isinstance(encoded, str):
            raise JobFailed(f"A1111 image {index} is not a base64 string")
        if encoded.startswith("data:"):
            encoded = encoded.partition(",")[2]
        try:
            return base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise JobFailed(f"A1111 image {index} is not valid base64: {exc}") from exc

    async def interrupt(self) -> None:
        """POST /sdapi/v1/interrupt (global: stops whatever A1111 generates)."""
        await self._call("POST", "/sdapi/v1/interrupt")

    async def cancel(self, job: Job) -> None:
        """Interrupt A1111 if this job's generation is in flight."""
        if job.id in self._active:
            await self.interrupt()


async def _script_unit(unit: Any, resolved: Callable[[Any], Awaitable[Any]]) -> Any:
    """An `alwayson_scripts` unit (a copy) with its image fields resolved (ControlNet's
    `{"image": ..., "mask": ...}` too)."""
    if not isinstance(unit, dict):
        return unit
    unit = dict(unit)
    for key in SCRIPT_IMAGE_FIELDS:
        value = unit.get(key)
        if isinstance(value, dict) and input_url(value) is None:
            unit[key] = {k: await resolved(v) for k, v in value.items()}
        elif value is not None:
            unit[key] = await resolved(value)
    return unit


@hookimpl
def register_connectors(register: Any) -> None:
    """The a1111 connector."""
    register(A1111Connector)
