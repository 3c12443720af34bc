"""Runs ComfyUI workflows: WebSocket first, then POST /prompt with our own prompt id;
progress over the whole workflow; outputs fetched with /view and stored as job outputs."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import mimetypes
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

import httpx
import websockets
from pydantic import Field, model_validator

from emp_worker import hookimpl
from emp_worker.connector import (
    Connector,
    ConnectorCapabilities,
    ConnectorSettings,
    Health,
    InputFile,
    Job,
    JobContext,
    JobFailed,
    env_names,
    input_url,
)

__version__ = "0.1.0"

#: Model folders whose files are advertised as the worker's models.
MODEL_FOLDERS = (
    "checkpoints",
    "loras",
    "vae",
    "diffusion_models",
    "unet",
    "text_encoders",
    "clip",
    "controlnet",
    "upscale_models",
    "embeddings",
    "clip_vision",
)
#: Inputs of loader nodes naming the model a workflow loads (CheckpointLoaderSimple and the
#: other checkpoint loaders: ckpt_name; UNETLoader: unet_name): what loaded_models reports.
LOADER_INPUTS = frozenset({"ckpt_name", "unet_name"})
#: Words in an execution error that mark it transient (worth a retry elsewhere).
TRANSIENT = ("out of memory", "outofmemory", "cuda error", "connection", "timed out", "timeout")


_env = functools.partial(env_names, prefix="EMP_COMFYUI_")


class ComfyUISettings(ConnectorSettings):
    """Where ComfyUI is and how to talk to it (EMP_COMFYUI_*, or the original names)."""

    url: str = Field(default="http://127.0.0.1:8188", validation_alias=_env("url"))
    host: str | None = Field(default=None, validation_alias=_env("host", "COMFYUI_HOST"))
    port: int = Field(default=8188, validation_alias=_env("port", "COMFYUI_PORT"))
    use_ssl: bool = Field(default=False, validation_alias=_env("use_ssl", "COMFYUI_USE_SSL"))
    username: str | None = Field(
        default=None, validation_alias=_env("username", "COMFYUI_USERNAME")
    )
    password: str | None = Field(
        default=None, validation_alias=_env("password", "COMFYUI_PASSWORD")
    )
    timeout_s: float = Field(default=30, gt=0, validation_alias=_env("timeout_s"))
    reconnect_s: float = Field(default=30, ge=0, validation_alias=_env("reconnect_s"))
    poll_s: float = Field(default=0.5, gt=0, validation_alias=_env("poll_s"))
    models_refresh_s: float = Field(default=60, gt=0, validation_alias=_env("models_refresh_s"))
    service: str = Field(default="comfyui", validation_alias=_env("service"))

    @model_validator(mode="after")
    def _from_host(self) -> ComfyUISettings:
        if self.host:  # the original COMFYUI_HOST/PORT/USE_SSL win over the default url
            scheme = "https" if self.use_ssl else "http"
            self.url = f"{scheme}://{self.host}:{self.port}"
        self.url = self.url.rstrip("/")
        return self


class Unreachable(JobFailed):
    """ComfyUI did not answer an HTTP request, or answered it with an error (retryable)."""


class ComfyUIConnector(Connector):
    """A ComfyUI server: runs API-format workflows on it."""

    name = "comfyui"
    Settings = ComfyUISettings
    settings: ComfyUISettings

    def __init__(self, settings: ComfyUISettings | None = None) -> None:
        super().__init__(settings)
        self.models: frozenset[str] = frozenset()
        self.model_counts: dict[str, int] = {}  # model folder -> files in it
        self.prompts: dict[str, str] = {}  # job id -> its prompt id while it runs
        self._http: httpx.AsyncClient | None = None
        self._refresher: asyncio.Task[None] | None = None
        #: The model files the last workflow it ran loaded (None: none run yet).
        self.loaded: list[str] | None = None

    # -- plumbing -------------------------------------------------------------------------

    @property
    def http(self) -> httpx.AsyncClient:
        """The HTTP client (made on first use)."""
        if self._http is None:
            auth = None
            if self.settings.username:
                auth = httpx.BasicAuth(self.settings.username, self.settings.password or "")
            self._http = httpx.AsyncClient(
                base_url=self.settings.url, auth=auth, timeout=self.settings.timeout_s
            )
        return self._http

    def _ws_url(self, client_id: str) -> str:
        parts = urlsplit(self.settings.url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        return f"{scheme}://{parts.netloc}{parts.path}/ws?clientId={client_id}"

    def _ws_headers(self) -> dict[str, str]:
        if not self.settings.username:
            return {}
        token = f"{self.settings.username}:{self.settings.password or ''}".encode()
        return {"Authorization": "Basic " + base64.b64encode(token).decode()}

    async def _get(self, path: str, **params: Any) -> Any:
        """GET a JSON answer; Unreachable (a retryable JobFailed) when ComfyUI is
        unreachable or odd."""
        try:
            response = await self.http.get(path, params=params or None)
            response.raise_for_status()
            return response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise Unreachable(f"ComfyUI {path}: {exc!r}") from exc

    async def start(self) -> None:
        await self.refresh()
        self._refresher = asyncio.create_task(self._refresh_loop())

    async def stop(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.models_refresh_s)
            await self.refresh()

    async def refresh(self) -> None:
        """Read the models from ComfyUI's model folders (kept as they were while it does not
        answer)."""
        try:
            folders = await self._get("/models")
            models: set[str] = set()
            counts: dict[str, int] = {}
            for folder in folders:
                if folder in MODEL_FOLDERS:
                    with contextlib.suppress(JobFailed):
                        names = [str(m) for m in await self._get(f"/models/{folder}")]
                        models.update(names)
                        counts[folder] = len(names)
            self.models, self.model_counts = frozenset(models), counts
        except (JobFailed, TypeError):
            pass

    def capabilities(self) -> ConnectorCapabilities:
        """Service `comfyui` with the models found. (While ComfyUI is down, its health
        says so, and the worker withdraws the service.)"""
        service = self.settings.service
        models = {service: self.models} if self.models else {}
        return ConnectorCapabilities(services=frozenset({service}), models=models)

    async def health(self) -> Health:
        """ComfyUI answers /system_stats: its version, devices (VRAM), RAM, model count."""
        try:
            stats = await self._get("/system_stats")
            if not self.model_counts:  # not read yet (or ComfyUI was down at start)
                await self.refresh()
            system = stats.get("system", {})
            version = system.get("comfyui_version", "?")
            ram = _memory("RAM", system.get("ram_total"), system.get("ram_free"))
            devices = [
                # with --cpu the device is "cpu" and its vram_* figures are the RAM again
                f"device {d.get('name')}"
                if d.get("type") == "cpu"
                else f"device {d.get('name')}, "
                + _memory("VRAM", d.get("vram_total"), d.get("vram_free"))
                for d in stats.get("devices", [])
            ]
        except (JobFailed, AttributeError, TypeError, ValueError) as exc:
            return Health(ok=False, detail=f"ComfyUI at {self.settings.url} unreachable: {exc}")
        counts = ", ".join(f"{folder} {n}" for folder, n in sorted(self.model_counts.items()))
        parts = [f"ComfyUI {version} at {self.settings.url}", *devices, ram]
        return Health(ok=True, detail="; ".join([*parts, f"models: {counts or 'none'}"]))

    # -- a job ----------------------------------------------------------------------------

    @staticmethod
    def workflow(payload: dict[str, Any]) -> dict[str, Any]:
        """The API-format graph: ours (`workflow`), or the original shapes (`prompt`, or
        the graph itself)."""
        graph = payload.get("workflow", payload.get("prompt", payload))
        if isinstance(graph, str):
            try:
                graph = json.loads(graph)
            except ValueError as exc:
                raise JobFailed(f"workflow is not JSON: {exc}", retryable=False) from exc
        if (
            not isinstance(graph, dict)
            or not graph
            or not all(isinstance(n, dict) and "class_type" in n for n in graph.values())
        ):
            raise JobFailed("payload has no API-format workflow", retryable=False)
        return {str(k): v for k, v in graph.items()}

    @staticmethod
    def workflow_models(graph: dict[str, Any]) -> list[str]:
        """The model files a workflow's loader nodes load (ckpt_name, unet_name... inputs of
        nodes that another node links to: ComfyUI runs only those)."""
        linked = {
            str(value[0])
            for node in graph.values()
            for value in (node.get("inputs") or {}).values()
            if isinstance(value, list) and len(value) == 2
        }
        return sorted(
            {
                value
                for node_id, node in graph.items()
                if node_id in linked
                for name, value in (node.get("inputs") or {}).items()
                if name in LOADER_INPUTS and isinstance(value, str)
            }
        )

    def loaded_models(self) -> list[str] | None:
        """ComfyUI has no endpoint that says which models it holds: the models the last
        workflow it ran loaded (it keeps them loaded until others are needed). None until
        a workflow that loads one has run."""
        return self.loaded

    async def upload_inputs(self, graph: dict[str, Any], ctx: JobContext) -> None:
        """Input images given as references (an earlier job's output: its reference or its
        URL; or any http(s) URL): fetch each (`ctx.fetch`), upload it to ComfyUI, point
        the node at it."""
        for node in graph.values():
            inputs = node.get("inputs") or {}
            for name, value in inputs.items():
                if input_url(value) is not None:
                    inputs[name] = await self._upload(await ctx.fetch(value))

    async def _upload(self, image: InputFile) -> str:
        files = {"image": (image.name, image.data, image.content_type)}
        try:
            response = await self.http.post("/upload/image", files=files, data={"type": "input"})
            response.raise_for_status()
            answer = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise JobFailed(f"ComfyUI /upload/image: {exc!r}", retryable=True) from exc
        name = str(answer["name"])
        return f"{answer['subfolder']}/{name}" if answer.get("subfolder") else name

    async def run(self, job: Job, ctx: JobContext) -> dict[str, Any]:
        """Submit the workflow, follow it to its end, store its outputs."""
        graph = self.workflow(job.payload)
        await self.upload_inputs(graph, ctx)
        # A client id per job: ComfyUI sends a client's messages to its newest socket only.
        client_id, prompt_id = uuid.uuid4().hex, str(uuid.uuid4())
        tracker = Progress(graph, ctx)
        try:
            ws = await self._connect(client_id)
        except (OSError, websockets.InvalidHandshake, TimeoutError) as exc:
            raise JobFailed(f"ComfyUI at {self.settings.url} unreachable: {exc!r}") from exc
        self.prompts[job.id] = prompt_id
        try:
            await self._submit(graph, client_id, prompt_id)
            await ctx.progress(0, "queued in ComfyUI", "queued")
            await self._follow(ws, client_id, prompt_id, tracker)
            entry = await self._history(prompt_id)
            result = await self._results(entry, prompt_id, ctx)
            self.loaded = self.workflow_models(graph) or self.loaded
            return result
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):  # leave nothing running in ComfyUI
                await asyncio.shield(self._stop(prompt_id))
            raise
        finally:
            self.prompts.pop(job.id, None)
            with contextlib.suppress(Exception):
                await ws.close()

    async def _connect(self, client_id: str) -> websockets.ClientConnection:
        return await asyncio.wait_for(
            websockets.connect(
                self._ws_url(client_id), additional_headers=self._ws_headers(), max_size=None
            ),
            self.settings.timeout_s,
        )

    async def _submit(self, graph: dict[str, Any], client_id: str, prompt_id: str) -> None:
        body = {"prompt": graph, "client_id": client_id, "prompt_id": prompt_id}
        try:
            response = await self.http.post("/prompt", json=body)
        except httpx.HTTPError as exc:
            raise JobFailed(f"ComfyUI /prompt: {exc!r}", retryable=True) from exc
        if response.status_code == 400:
            raise JobFailed(refusal(response), retryable=False)
        if response.status_code != 200:
            raise JobFailed(
                f"ComfyUI /prompt answered {response.status_code}: {response.text[:500]}"
            )

    async def _follow(
        self, ws: websockets.ClientConnection, client_id: str, prompt_id: str, tracker: Progress
    ) -> None:
        """Read the WebSocket until our prompt ends; after a drop, reconnect and ask
        /history (then /queue) until it ends or ComfyUI stays away `reconnect_s`."""
        while True:
            try:
                async for raw in ws:
                    if isinstance(raw, bytes):
                        continue  # previews
                    message = json.loads(raw)
                    if await self._on_message(message, prompt_id, tracker):
                        return
            except (websockets.ConnectionClosed, ValueError, OSError):
                pass
            rejoined = await self._rejoin(client_id, prompt_id)
            if rejoined is None:
                return
            ws = rejoined

    async def _on_message(self, message: Any, prompt_id: str, tracker: Progress) -> bool:
        """Handle one message; True when our prompt is done (history written)."""
        if not isinstance(message, dict):
            return False
        kind, data = message.get("type"), message.get("data")
        if not isinstance(data, dict) or data.get("prompt_id", prompt_id) != prompt_id:
            return False
        if kind == "executing":
            if data.get("node") is None:
                return "prompt_id" in data
            await tracker.running(str(data["node"]))
        elif kind == "execution_cached":
            tracker.cached([str(n) for n in data.get("nodes") or []])
        elif kind == "progress":
            await tracker.step(str(data.get("node")), float(data["value"]), float(data["max"]))
        elif kind == "progress_state":
            await tracker.state(data.get("nodes") or {})
        elif kind == "execution_error":
            raise JobFailed(execution_error(data), retryable=transient(data))
        elif kind == "execution_interrupted":
            raise JobFailed(
                f"ComfyUI interrupted the workflow at node {data.get('node_id')}"
                f" ({data.get('node_type')})"
            )
        return False

    async def _rejoin(self, client_id: str, prompt_id: str) -> websockets.ClientConnection | None:
        """After a dropped WebSocket: a new one and our prompt's state, within
        `reconnect_s` (ComfyUI restarting may take the socket before it answers HTTP);
        None when the prompt has already ended. Past the deadline the job fails retryable."""
        deadline = time.monotonic() + self.settings.reconnect_s
        while True:
            ws: websockets.ClientConnection | None = None
            try:
                ws = await self._connect(client_id)
                if not await self._finished(prompt_id):
                    return ws
                await ws.close()
                return None
            except (OSError, websockets.InvalidHandshake, TimeoutError, Unreachable) as exc:
                if ws is not None:
                    with contextlib.suppress(Exception):
                        await ws.close()
                if time.monotonic() > deadline:
                    raise JobFailed(f"lost ComfyUI at {self.settings.url} mid-job: {exc}") from exc
            await asyncio.sleep(self.settings.poll_s)

    async def _finished(self, prompt_id: str) -> bool:
        """Whether our prompt has ended (its history is written); JobFailed when ComfyUI
        knows nothing of it (lost: retryable)."""
        if await self._get(f"/history/{prompt_id}"):
            return True
        queue = await self._get("/queue")
        queued = [*queue.get("queue_running", []), *queue.get("queue_pending", [])]
        if any(len(item) > 1 and item[1] == prompt_id for item in queued):
            return False
        if await self._get(f"/history/{prompt_id}"):  # it ended between the two reads
            return True
        raise JobFailed(f"ComfyUI lost prompt {prompt_id}")

    async def _history(self, prompt_id: str) -> dict[str, Any]:
        """Our prompt's history entry; a failed one raises JobFailed."""
        for _ in range(100):  # normally there at once (after `executing: null`)
            answer = await self._get(f"/history/{prompt_id}")
            if isinstance(answer, dict) and isinstance(answer.get(prompt_id), dict):
                entry: dict[str, Any] = answer[prompt_id]
                break
            await asyncio.sleep(self.settings.poll_s / 10)
        else:
            raise JobFailed(f"ComfyUI has no history for prompt {prompt_id}")
        status = entry.get("status") or {}
        if status.get("status_str") == "error":
            for kind, data in status.get("messages") or []:
                if kind == "execution_error":
                    raise JobFailed(execution_error(data), retryable=transient(data))
                if kind == "execution_interrupted":
                    raise JobFailed(
                        f"ComfyUI interrupted the workflow at node {data.get('node_id')}"
                    )
            raise JobFailed("ComfyUI ended the workflow with an error")
        return entry

    async def _results(
        self, entry: dict[str, Any], prompt_id: str, ctx: JobContext
    ) -> dict[str, Any]:
        """Every file output fetched with /view and stored; the references per node."""
        nodes: dict[str, dict[str, list[Any]]] = {}
        outputs = entry.get("outputs")
        if not isinstance(outputs, dict):
            raise JobFailed(f"ComfyUI history of {prompt_id} has no outputs map")
        for node_id, ui in outputs.items():
            if not isinstance(ui, dict):
                continue
            for key, items in ui.items():
                if not isinstance(items, list):
                    continue
                for item in items:
                    if isinstance(item, dict) and "filename" in item:
                        ref = await self._fetch(item, ctx)
                        nodes.setdefault(str(node_id), {}).setdefault(key, []).append(
                            ref.model_dump()
                        )
                    elif isinstance(item, str | int | float | bool):  # text outputs
                        nodes.setdefault(str(node_id), {}).setdefault(key, []).append(item)
        await ctx.progress(100, "done", "completed")
        return {"prompt_id": prompt_id, "nodes": nodes}

    async def _fetch(self, item: dict[str, Any], ctx: JobContext) -> Any:
        params = {
            "filename": str(item["filename"]),
            "subfolder": str(item.get("subfolder", "")),
            "type": str(item.get("type", "output")),
        }
        try:
            response = await self.http.get("/view", params=params)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise JobFailed(f"ComfyUI /view {params['filename']}: {exc!r}") from exc
        name = params["filename"]
        kind = response.headers.get("content-type") or mimetypes.guess_type(name)[0]
        return await ctx.output(name, response.content, kind)

    async def _stop(self, prompt_id: str) -> None:
        """Our prompt out of ComfyUI: deleted from the queue, or interrupted if running."""
        queue = await self._get("/queue")
        if any(len(i) > 1 and i[1] == prompt_id for i in queue.get("queue_pending", [])):
            await self.http.post("/queue", json={"delete": [prompt_id]})
        if any(len(i) > 1 and i[1] == prompt_id for i in queue.get("queue_running", [])):
            await self.http.post("/interrupt", json={"prompt_id": prompt_id})

    async def cancel(self, job: Job) -> None:
        """Interrupt the job's prompt (running) or delete it from ComfyUI's queue."""
        prompt_id = self.prompts.get(job.id)
        if prompt_id is not None:
            await self._stop(prompt_id)


class Progress:
    """One 0-100 over the whole workflow: nodes finished out of nodes to run, plus the
    running node's step fraction; never goes back."""

    def __init__(self, graph: dict[str, Any], ctx: JobContext) -> None:
        self.graph, self.ctx = graph, ctx
        self.todo = set(graph)
        self.done: set[str] = set()
        self.node: str | None = None
        self.fraction = 0.0
        self.sent = 0.0
        self.last: tuple[float, str] | None = None

    def cached(self, nodes: list[str]) -> None:
        self.todo -= set(nodes)

    async def running(self, node: str) -> None:
        if self.node is not None and self.node != node:
            self.done.add(self.node)
        self.node, self.fraction = node, 0.0
        await self.report()

    async def step(self, node: str, value: float, most: float) -> None:
        if node == self.node and most > 0:
            self.fraction = min(1.0, value / most)
            await self.report()

    async def state(self, nodes: dict[str, Any]) -> None:
        """`progress_state`: finished nodes count as done; a node announced running
        (ComfyUI sends this before `executing` it) becomes the running one."""
        for node_id, info in nodes.items():
            if not isinstance(info, dict):
                continue
            if info.get("state") == "finished":
                self.done.add(str(node_id))
            elif info.get("state") == "running" and str(node_id) not in self.done:
                if self.node is not None and self.node != str(node_id):
                    self.done.add(self.node)
                if self.node != str(node_id):
                    self.node, self.fraction = str(node_id), 0.0
        await self.report()

    async def report(self) -> None:
        """Send the percent and the running node, unless it would go back or repeat the
        last report."""
        total = max(1, len(self.todo))
        done = len(self.done & self.todo)
        running = self.fraction if self.node not in self.done else 0.0
        percent = min(99.0, 100 * (done + running) / total)
        label = self.node or ""
        if self.node in self.graph:
            label = f"node {self.node} ({self.graph[self.node].get('class_type')})"
        if percent < self.sent or (percent, label) == self.last:
            return
        self.sent, self.last = percent, (percent, label)
        await self.ctx.progress(percent, label, "processing")


def _memory(kind: str, total: Any, free: Any) -> str:
    """`RAM 23.5 GiB (11.8 GiB free)` from byte counts."""
    return f"{kind} {int(total or 0) / 2**30:.1f} GiB ({int(free or 0) / 2**30:.1f} GiB free)"


def refusal(response: httpx.Response) -> str:
    """ComfyUI's 400 as one message: the error and every node's errors."""
    try:
        body = response.json()
    except ValueError:
        return f"ComfyUI refused the workflow: {response.text[:500]}"
    error = body.get("error") if isinstance(body, dict) else None
    parts = []
    if isinstance(error, dict):
        parts.append(f"{error.get('type')}: {error.get('message')}".rstrip(": "))
        if error.get("details"):
            parts.append(str(error["details"]))
    for node_id, info in (body.get("node_errors") or {}).items():
        for item in info.get("errors", []):
            parts.append(
                f"node {node_id} ({info.get('class_type')}): {item.get('message')}"
                f" ({item.get('details')})"
            )
    return "ComfyUI refused the workflow: " + "; ".join(parts)


def execution_error(data: dict[str, Any]) -> str:
    """An `execution_error` as one message: node id, type and the exception (ComfyUI's
    `exception_message` ends with a newline: dropped)."""
    message = str(data.get("exception_message") or "").strip()
    return (
        f"ComfyUI failed at node {data.get('node_id')} ({data.get('node_type')}):"
        f" {data.get('exception_type')}: {message}"
    )


def transient(data: dict[str, Any]) -> bool:
    """Whether an execution error is worth a retry (out of memory, connection lost)."""
    text = f"{data.get('exception_type')} {data.get('exception_message')}".lower()
    return any(word in text for word in TRANSIENT)


@hookimpl
def register_connectors(register: Any) -> None:
    """The ComfyUI connector."""
    register(ComfyUIConnector)
