"""A fake ComfyUI that behaves like the real one (recorded from ComfyUI 0.3.64, see
transcripts/): HTTP routes plain and under /api, the WebSocket with the same message
sequence, a priority queue, history written before the final `executing {node: null}`,
400 with `node_errors` for what the real server refuses, /interrupt, /view, /upload/image.

Test knobs: `node_s` (seconds per node), `hold` (cleared: prompts stay queued), `fail`
(class or node id -> (exception type, message): `execution_error`), `drop_ws_at` (node id:
close every WebSocket when it starts), `history_lag_s` (between `execution_success` and the
history write), `down_s` (with `drop_ws_at`: for that many seconds after the drop every
HTTP request is answered 503, as a proxy in front of a restarting ComfyUI answers), `cpu`
(/system_stats as a ComfyUI started with --cpu answers).

Images are solid colours: EmptyImage's, inverted by ImageInvert, resized by ImageScale,
read back by LoadImage; SaveImage writes a PNG of that size and colour per image of the
batch, as the real nodes do with such an image."""

from __future__ import annotations

import asyncio
import contextlib
import email.parser
import heapq
import json
import struct
import time
import uuid
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from emp_hub.embedded import free_port

METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
INT = {"default": 512, "min": 0, "max": 16384, "step": 1}
SIDE = {"default": 512, "min": 1, "max": 16384, "step": 1}  # EmptyImage's width and height
#: node class -> (required inputs, output node?). EmpSteps is the fake's own: a node that
#: reports `steps` progress steps, as a sampler does.
NODES: dict[str, tuple[dict[str, Any], bool]] = {
    "EmptyImage": (
        {
            "width": ["INT", SIDE],
            "height": ["INT", SIDE],
            "batch_size": ["INT", {"default": 1, "min": 1, "max": 4096}],
            "color": [
                "INT",
                {"default": 0, "min": 0, "max": 0xFFFFFF, "step": 1, "display": "color"},
            ],
        },
        False,
    ),
    "ImageInvert": ({"image": ["IMAGE"]}, False),
    "ImageScale": (
        {
            "image": ["IMAGE"],
            "upscale_method": [METHODS],
            "width": ["INT", INT],
            "height": ["INT", INT],
            "crop": [["disabled", "center"]],
        },
        False,
    ),
    "EmpSteps": (
        {"image": ["IMAGE"], "steps": ["INT", {"default": 4, "min": 1, "max": 1000}]},
        False,
    ),
    "LoadImage": ({"image": [[]]}, False),
    "SaveImage": (
        {"images": ["IMAGE"], "filename_prefix": ["STRING", {"default": "ComfyUI"}]},
        True,
    ),
    "PreviewImage": ({"images": ["IMAGE"]}, True),
    # ckpt_name: a combo of the files in models/checkpoints (MODELS), as the real node's.
    # Linked into a graph (as an extra input of a node: ComfyUI runs every linked node),
    # it runs; its output here is no image, as the real one's MODEL/CLIP/VAE are none.
    "CheckpointLoaderSimple": ({"ckpt_name": [["sd_xl_base_1.0.safetensors"]]}, False),
}
PNG = b"\x89PNG\r\n\x1a\n"
MODELS = {"checkpoints": ["sd_xl_base_1.0.safetensors"], "loras": ["detail.safetensors"], "vae": []}


def png(seed: int = 0) -> bytes:
    """A small PNG (8x8, a gradient from `seed`)."""
    rows = b"".join(b"\x00" + bytes((seed + x + y) & 0xFF for x in range(24)) for y in range(8))
    return _png(struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0), zlib.compress(rows))


def _png(header: bytes, idat: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


Image = tuple[int, int, tuple[int, int, int], int]  # width, height, RGB, batch size


def solid_png(width: int, height: int, colour: tuple[int, int, int]) -> bytes:
    """A PNG of one colour, as SaveImage writes a solid image (8-bit RGB)."""
    row = b"\x00" + bytes(colour) * width
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return _png(header, zlib.compress(row * height))


def png_facts(data: bytes) -> tuple[int, int, tuple[int, int, int]]:
    """Width, height and first pixel's RGB of an 8-bit RGB(A) PNG; (8, 8, black) for
    anything else (the fake's LoadImage reads no other kind)."""
    if not data.startswith(PNG):
        return 8, 8, (0, 0, 0)
    pos, width, height, idat = 8, 8, 8, b""
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height = int.from_bytes(body[:4], "big"), int.from_bytes(body[4:8], "big")
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    try:
        raw = zlib.decompress(idat)
    except zlib.error:
        return width, height, (0, 0, 0)
    return width, height, (raw[1], raw[2], raw[3]) if len(raw) > 3 else (0, 0, 0)


def _ms() -> int:
    return int(time.time() * 1000)


def _state(prompt_id: str, node_id: str, value: float, most: float, kind: str) -> dict[str, Any]:
    return {
        "value": value,
        "max": most,
        "state": kind,
        "node_id": node_id,
        "prompt_id": prompt_id,
        "display_node_id": node_id,
        "parent_node_id": None,
        "real_node_id": node_id,
    }


def _error(
    kind: str, message: str, details: str = "", extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {"type": kind, "message": message, "details": details, "extra_info": extra or {}}


class FakeComfyUI:
    """The server's state and behaviour; `app` is its Starlette application."""

    def __init__(self, node_s: float = 0.005) -> None:
        self.node_s = node_s
        self.hold = asyncio.Event()
        self.hold.set()
        self.fail: dict[str, tuple[str, str]] = {}
        self.drop_ws_at: str | None = None
        self.history_lag_s = 0.0
        self.down_s = 0.0
        self.cpu = False
        self._down_until = 0.0
        self.pending: list[tuple[float, str, dict[str, Any], dict[str, Any], list[str]]] = []
        self.running: tuple[float, str, dict[str, Any], dict[str, Any], list[str]] | None = None
        self.current_node: str | None = None
        self.interrupted = False
        self.history: dict[str, dict[str, Any]] = {}
        self.cache: dict[str, dict[str, Any]] = {}  # a prompt's JSON -> its ui outputs
        self.files: dict[tuple[str, str, str], bytes] = {}
        self.counters: dict[str, int] = {}
        self.sockets: dict[str, WebSocket] = {}
        self.number = 0
        self.prompts_run: list[str] = []
        self.requests: list[str] = []
        #: prompt id -> (POST /prompt received, final `executing {node: null}` sent), in
        #: time.perf_counter() seconds: the server's own time for that prompt
        self.timings: dict[str, tuple[float, float]] = {}
        self._wake = asyncio.Event()
        routes: list[Any] = []
        for prefix in ("", "/api"):
            routes += [
                Route(prefix + "/prompt", self.post_prompt, methods=["POST"]),
                Route(prefix + "/prompt", self.get_prompt, methods=["GET"]),
                Route(prefix + "/queue", self.get_queue, methods=["GET"]),
                Route(prefix + "/queue", self.post_queue, methods=["POST"]),
                Route(prefix + "/history", self.get_history_all, methods=["GET"]),
                Route(prefix + "/history/{prompt_id}", self.get_history, methods=["GET"]),
                Route(prefix + "/interrupt", self.post_interrupt, methods=["POST"]),
                Route(prefix + "/view", self.view, methods=["GET"]),
                Route(prefix + "/upload/image", self.upload, methods=["POST"]),
                Route(prefix + "/system_stats", self.system_stats, methods=["GET"]),
                Route(prefix + "/object_info", self.object_info, methods=["GET"]),
                Route(prefix + "/object_info/{name}", self.object_info_one, methods=["GET"]),
                Route(prefix + "/models", self.models, methods=["GET"]),
                Route(prefix + "/models/{folder}", self.models_in, methods=["GET"]),
                Route(prefix + "/features", self.features, methods=["GET"]),
                WebSocketRoute(prefix + "/ws", self.ws),
            ]
        down = Middleware(BaseHTTPMiddleware, dispatch=self._maybe_down)
        self.app = Starlette(routes=routes, middleware=[down])

    async def _maybe_down(self, request: Request, call_next: Any) -> Response:
        if time.monotonic() < self._down_until:
            return Response(b"ComfyUI is restarting", status_code=503)
        response: Response = await call_next(request)
        return response

    # -- HTTP -----------------------------------------------------------------------------

    async def post_prompt(self, request: Request) -> Response:
        self.requests.append("POST /prompt")
        received = time.perf_counter()
        body = json.loads(await request.body())  # not JSON: a 500, as aiohttp's
        prompt = body.get("prompt")
        if not isinstance(prompt, dict):
            error = _error("no_prompt", "No prompt provided", "No prompt provided")
            return JSONResponse({"error": error, "node_errors": {}}, 400)
        refused = self.validate(prompt)
        if refused is not None:
            return JSONResponse(refused, 400)
        prompt_id = str(body.get("prompt_id") or uuid.uuid4())
        number: float = body.get("number", self.number)
        if "number" not in body:
            self.number += 1
        if body.get("front"):
            number = -number
        extra = dict(body.get("extra_data") or {})
        if body.get("client_id"):
            extra["client_id"] = body["client_id"]
        outputs = [n for n, node in prompt.items() if NODES[node["class_type"]][1]]
        heapq.heappush(self.pending, (number, prompt_id, prompt, extra, outputs))
        self.timings[prompt_id] = (received, received)
        await self.broadcast_status()
        self._wake.set()
        return JSONResponse({"prompt_id": prompt_id, "number": number, "node_errors": {}})

    def validate(self, prompt: dict[str, Any]) -> dict[str, Any] | None:
        """The 400 body the real server answers for this prompt, or None."""
        for node_id, node in prompt.items():
            if not isinstance(node, dict) or "class_type" not in node:
                message = (
                    "Cannot execute because a node is missing the class_type property.:"
                    f" Node ID '#{node_id}'"
                )
                return {"error": _error("invalid_prompt", message), "node_errors": {}}
            if node["class_type"] not in NODES:
                message = f"Cannot execute because node {node['class_type']} does not exist."
                error = _error("invalid_prompt", message, f"Node ID '#{node_id}'")
                return {"error": error, "node_errors": {}}
        outputs = [n for n, node in prompt.items() if NODES[node["class_type"]][1]]
        if not outputs:
            return {
                "error": _error("prompt_no_outputs", "Prompt has no outputs"),
                "node_errors": {},
            }
        node_errors: dict[str, Any] = {}
        for node_id, node in prompt.items():
            errors = self._input_errors(prompt, node)
            if errors:
                dependent = [o for o in outputs if node_id in self._needed(prompt, o)]
                node_errors[node_id] = {
                    "errors": errors,
                    "dependent_outputs": dependent,
                    "class_type": node["class_type"],
                }
        if node_errors:
            error = _error("prompt_outputs_failed_validation", "Prompt outputs failed validation")
            return {"error": error, "node_errors": node_errors}
        return None

    def _input_errors(self, prompt: dict[str, Any], node: dict[str, Any]) -> list[dict[str, Any]]:
        """The real server's per-input errors (execution.validate_inputs), as it words them."""
        inputs = node.get("inputs") or {}
        errors: list[dict[str, Any]] = []
        for name, spec in NODES[node["class_type"]][0].items():
            value = inputs.get(name)
            config: list[Any] = [spec[0], spec[1] if len(spec) > 1 else {}]
            seen = {"input_name": name, "input_config": config, "received_value": value}
            if value is None:
                extra = {"input_name": name}
                errors.append(
                    _error("required_input_missing", "Required input is missing", name, extra)
                )
            elif isinstance(value, list):
                if len(value) != 2 or str(value[0]) not in prompt:
                    errors.append(
                        _error(
                            "bad_linked_input",
                            "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                            f"{name}",
                            {"input_name": name},
                        )
                    )
            elif node["class_type"] == "LoadImage" and name == "image":
                # LoadImage.VALIDATE_INPUTS takes over from the list check: the file must exist
                if ("input", *self._split(str(value))) not in self.files:
                    errors.append(
                        _error(
                            "custom_validation_failed",
                            "Custom validation failed for node",
                            f"image - Invalid image file: {value}",
                            {"input_name": "image"},
                        )
                    )
            elif isinstance(spec[0], list):
                if value not in spec[0]:
                    details = f"{name}: '{value}' not in {spec[0]}"
                    errors.append(_error("value_not_in_list", "Value not in list", details, seen))
            elif spec[0] == "INT":
                try:
                    number = int(value)  # the real server converts: "8" and 8.7 are 8
                except (TypeError, ValueError) as exc:
                    errors.append(
                        _error(
                            "invalid_input_type",
                            "Failed to convert an input value to a INT value",
                            f"{name}, {value}, {exc}",
                            {**seen, "exception_message": str(exc)},
                        )
                    )
                    continue
                if number < spec[1].get("min", number):
                    errors.append(
                        _error(
                            "value_smaller_than_min",
                            f"Value {number} smaller than min of {spec[1]['min']}",
                            f"{name}",
                            seen,
                        )
                    )
                elif number > spec[1].get("max", number):
                    errors.append(
                        _error(
                            "value_bigger_than_max",
                            f"Value {number} bigger than max of {spec[1]['max']}",
                            f"{name}",
                            seen,
                        )
                    )
        return errors

    @staticmethod
    def _split(name: str) -> tuple[str, str]:
        """An input name as (subfolder, filename): `sub/x.png` is x.png in sub."""
        subfolder, _, filename = name.rpartition("/")
        return subfolder, filename

    def _needed(self, prompt: dict[str, Any], node_id: str) -> list[str]:
        """The nodes `node_id` needs, in execution order (it last)."""
        order: list[str] = []

        def visit(current: str) -> None:
            if current in order:
                return
            for value in (prompt[current].get("inputs") or {}).values():
                if isinstance(value, list) and len(value) == 2 and str(value[0]) in prompt:
                    visit(str(value[0]))
            order.append(current)

        visit(node_id)
        return order

    async def get_prompt(self, request: Request) -> Response:
        return JSONResponse({"exec_info": {"queue_remaining": self.remaining()}})

    def remaining(self) -> int:
        return len(self.pending) + (self.running is not None)

    async def get_queue(self, request: Request) -> Response:
        self.requests.append("GET /queue")
        running = [list(self.running)] if self.running else []
        return JSONResponse(
            {"queue_running": running, "queue_pending": [list(p) for p in self.pending]}
        )

    async def post_queue(self, request: Request) -> Response:
        body = json.loads(await request.body() or b"{}")
        self.requests.append(f"POST /queue {json.dumps(body, sort_keys=True)}")
        if body.get("clear"):
            self.pending.clear()
        if "delete" in body:
            self.pending = [p for p in self.pending if p[1] not in body["delete"]]
            heapq.heapify(self.pending)
        await self.broadcast_status()
        return Response(b"")

    async def get_history_all(self, request: Request) -> Response:
        return JSONResponse(self.history)

    async def get_history(self, request: Request) -> Response:
        prompt_id = request.path_params["prompt_id"]
        self.requests.append(f"GET /history/{prompt_id}")
        entry = self.history.get(prompt_id)
        return JSONResponse({prompt_id: entry} if entry else {})

    async def post_interrupt(self, request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError:
            body = {}
        self.requests.append(f"POST /interrupt {json.dumps(body, sort_keys=True)}")
        wanted = body.get("prompt_id") if isinstance(body, dict) else None
        if self.running is not None and wanted in (None, self.running[1]):
            self.interrupted = True
        return Response(b"")

    async def view(self, request: Request) -> Response:
        query = request.query_params
        filename = query.get("filename")
        if not filename:
            return Response(status_code=404)
        if filename.startswith("/") or ".." in filename:
            return Response(status_code=400)
        subfolder = query.get("subfolder", "")
        if ".." in subfolder or subfolder.startswith("/"):
            return Response(status_code=403)
        data = self.files.get((query.get("type", "output"), subfolder, filename))
        if data is None:
            return Response(status_code=404)
        self.requests.append(f"GET /view {filename}")
        headers = {"Content-Disposition": f'filename="{filename}"'}
        kind = "image/png" if filename.endswith(".png") else "application/octet-stream"
        return Response(data, media_type=kind, headers=headers)

    async def upload(self, request: Request) -> Response:
        header = f"Content-Type: {request.headers.get('content-type', '')}\r\n\r\n".encode()
        message = email.parser.BytesParser().parsebytes(header + await request.body())
        fields: dict[str, str] = {}
        image: tuple[str, bytes] | None = None
        parts: list[Any] = message.get_payload() if message.is_multipart() else []  # type: ignore[assignment]
        for part in parts:
            name = part.get_param("name", header="content-disposition")
            payload: bytes = part.get_payload(decode=True) or b""
            if name == "image" and part.get_filename():
                image = (str(part.get_filename()), payload)
            elif isinstance(name, str):
                fields[name] = payload.decode()
        if image is None or "/" in image[0] or ".." in image[0]:
            return Response(status_code=400)
        kind, subfolder = fields.get("type", "input"), fields.get("subfolder", "")
        filename, data = image
        if fields.get("overwrite") not in {"true", "1"}:
            stem, dot, ext = filename.rpartition(".")
            n = 1
            while (kind, subfolder, filename) in self.files and self.files[
                (kind, subfolder, filename)
            ] != data:
                filename = f"{stem} ({n}){dot}{ext}"
                n += 1
        self.files[(kind, subfolder, filename)] = data
        self.requests.append(f"POST /upload/image {filename}")
        return JSONResponse({"name": filename, "subfolder": subfolder, "type": kind})

    async def system_stats(self, request: Request) -> Response:
        ram = 25276502016
        system = {
            "os": "posix",
            "ram_total": ram,
            "ram_free": ram // 2,
            "comfyui_version": "0.3.64",
            "required_frontend_version": "1.27.10",
            "installed_templates_version": "0.1.95",
            "required_templates_version": "0.1.95",
            "python_version": "3.11.7",
            "pytorch_version": "2.14.1+cu130",
            "embedded_python": False,
            "argv": ["main.py"],
        }
        device = {
            "name": "cuda:0 NVIDIA H200 : cudaMallocAsync",
            "type": "cuda",
            "index": 0,
            "vram_total": 150_000_000_000,
            "vram_free": 140_000_000_000,
            "torch_vram_total": 0,
            "torch_vram_free": 0,
        }
        if self.cpu:  # --cpu: the device is "cpu" and its "VRAM" is the system's RAM
            system["argv"] = ["main.py", "--cpu"]
            device = {
                "name": "cpu",
                "type": "cpu",
                "index": None,
                "vram_total": ram,
                "vram_free": ram // 2,
                "torch_vram_total": ram,
                "torch_vram_free": ram // 2,
            }
        return JSONResponse({"system": system, "devices": [device]})

    def _info(self, name: str) -> dict[str, Any]:
        required, output = NODES[name]
        return {
            "input": {"required": required},
            "input_order": {"required": list(required)},
            "output": [] if output else ["IMAGE"],
            "output_is_list": [],
            "output_name": [],
            "name": name,
            "display_name": name,
            "description": "",
            "python_module": "nodes",
            "category": "image",
            "output_node": output,
        }

    async def object_info(self, request: Request) -> Response:
        return JSONResponse({name: self._info(name) for name in NODES})

    async def object_info_one(self, request: Request) -> Response:
        name = request.path_params["name"]
        return JSONResponse({name: self._info(name)} if name in NODES else {})

    async def models(self, request: Request) -> Response:
        return JSONResponse(list(MODELS))

    async def models_in(self, request: Request) -> Response:
        folder = request.path_params["folder"]
        if folder not in MODELS:
            return Response(status_code=404)
        return JSONResponse(MODELS[folder])

    async def features(self, request: Request) -> Response:
        return JSONResponse({"supports_preview_metadata": True, "max_upload_size": 104857600.0})

    # -- WebSocket ------------------------------------------------------------------------

    async def ws(self, socket: WebSocket) -> None:
        sid = socket.query_params.get("clientId") or uuid.uuid4().hex
        await socket.accept()
        self.sockets[sid] = socket  # a reused clientId replaces the old socket
        status = {"status": {"exec_info": {"queue_remaining": self.remaining()}}, "sid": sid}
        await socket.send_json({"type": "status", "data": status})
        if self.running and self.running[3].get("client_id") == sid and self.current_node:
            await socket.send_json({"type": "executing", "data": {"node": self.current_node}})
        try:
            while True:
                message = json.loads(await socket.receive_text())
                if message.get("type") == "feature_flags":
                    await socket.send_json(
                        {"type": "feature_flags", "data": {"supports_preview_metadata": True}}
                    )
        except (WebSocketDisconnect, ValueError):
            pass
        finally:
            if self.sockets.get(sid) is socket:
                del self.sockets[sid]

    async def send(self, kind: str, data: dict[str, Any], sid: str | None) -> None:
        """To `sid`, or to every socket when None; a send that fails is swallowed."""
        targets = (
            list(self.sockets.values())
            if sid is None
            else [self.sockets[sid]]
            if sid in self.sockets
            else []
        )
        for socket in targets:
            with contextlib.suppress(Exception):
                await socket.send_json({"type": kind, "data": data})

    async def broadcast_status(self) -> None:
        await self.send(
            "status", {"status": {"exec_info": {"queue_remaining": self.remaining()}}}, None
        )

    async def drop_sockets(self) -> None:
        """Close every WebSocket (a network drop, as the client sees it)."""
        for socket in list(self.sockets.values()):
            with contextlib.suppress(Exception):
                await socket.close(1011)
        self.sockets.clear()

    # -- execution ------------------------------------------------------------------------

    def _image(self, node: dict[str, Any], images: dict[str, Image]) -> Image:
        """What the node makes of its input image, as the real nodes do to a solid image:
        EmptyImage's size, colour and batch; ImageInvert's inverse; ImageScale's size (0:
        keep the aspect); LoadImage's file; the rest pass their input on."""
        inputs = node.get("inputs") or {}
        source = next(
            (images[str(v[0])] for v in inputs.values() if isinstance(v, list) and len(v) == 2),
            (8, 8, (0, 0, 0), 1),
        )
        width, height, colour, batch = source
        kind = node["class_type"]
        if kind == "EmptyImage":
            c = int(inputs["color"])
            colour = ((c >> 16) & 0xFF, (c >> 8) & 0xFF, c & 0xFF)
            return int(inputs["width"]), int(inputs["height"]), colour, int(inputs["batch_size"])
        if kind == "ImageInvert":
            return width, height, (255 - colour[0], 255 - colour[1], 255 - colour[2]), batch
        if kind == "ImageScale":
            new_w, new_h = int(inputs["width"]), int(inputs["height"])
            if new_w == 0 and new_h == 0:
                return source
            if new_w == 0:
                new_w = max(1, round(width * new_h / height))
            elif new_h == 0:
                new_h = max(1, round(height * new_w / width))
            return new_w, new_h, colour, batch
        if kind == "LoadImage":
            data = self.files.get(("input", *self._split(str(inputs["image"]))), b"")
            return (*png_facts(data), 1)
        return source

    async def executor(self) -> None:
        """Runs the queued prompts one at a time, lowest number first."""
        while True:
            await self.hold.wait()
            if not self.pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            self.running = heapq.heappop(self.pending)
            await self.broadcast_status()
            try:
                await self.execute(*self.running)
            finally:
                self.running, self.current_node = None, None

    async def execute(
        self,
        number: float,
        prompt_id: str,
        prompt: dict[str, Any],
        extra: dict[str, Any],
        outputs: list[str],
    ) -> None:
        sid = extra.get("client_id")
        self.prompts_run.append(prompt_id)
        self.interrupted = False
        messages: list[list[Any]] = []

        async def event(kind: str, data: dict[str, Any], broadcast: bool = False) -> None:
            data = {"prompt_id": prompt_id, **data}
            if kind.startswith("execution_"):
                messages.append([kind, data])
            if sid is not None or broadcast:
                await self.send(kind, data, sid)

        order: list[str] = []
        for output in outputs:
            order += [n for n in self._needed(prompt, output) if n not in order]
        states: dict[str, dict[str, Any]] = {}
        images: dict[str, Image] = {}  # node id -> the image (batch) it made
        executed: list[str] = []
        ui_outputs: dict[str, Any] = {}
        status = "success"
        key = json.dumps(prompt, sort_keys=True)
        cached = self.cache.get(key)  # the identical prompt ran before: every node cached
        await event("execution_start", {"timestamp": _ms()})
        await event("execution_cached", {"nodes": order if cached else [], "timestamp": _ms()})
        if cached is not None:
            for node_id, ui in cached.items():
                ui_outputs[node_id] = ui
                await event("executed", {"node": node_id, "display_node": node_id, "output": ui})
                states = {node_id: {**_state(prompt_id, node_id, 1, 1, "finished")}}
                await event("progress_state", {"nodes": states})
            order = []

        def state(node_id: str, value: float, most: float, kind: str) -> None:
            states[node_id] = _state(prompt_id, node_id, value, most, kind)

        for node_id in order:
            node = prompt[node_id]

            async def interrupted(node_id: str = node_id, kind: str = node["class_type"]) -> None:
                data = {
                    "node_id": node_id,
                    "node_type": kind,
                    "executed": executed,
                    "timestamp": _ms(),
                }
                await event("execution_interrupted", data, broadcast=sid is None)

            self.current_node = node_id
            state(node_id, 0.0, 1.0, "running")
            await event("progress_state", {"nodes": dict(states)})
            await event("executing", {"node": node_id, "display_node": node_id})
            if self.drop_ws_at == node_id:
                self._down_until = time.monotonic() + self.down_s
                await self.drop_sockets()
            if self.interrupted:  # checked before each node runs, and at each step
                await interrupted()
                status = "error"
                break
            failure = self.fail.get(node_id) or self.fail.get(node["class_type"])
            if node["class_type"] == "LoadImage" and failure is None:
                name = str(node["inputs"]["image"])
                if not self.files[("input", *self._split(name))].startswith(PNG):
                    failure = (  # as PIL answers LoadImage for a file that is no image
                        "PIL.UnidentifiedImageError",
                        f"cannot identify image file 'COMFY_DATA/in/{name}'",
                    )
            steps = int(node["inputs"].get("steps", 0)) if node["class_type"] == "EmpSteps" else 0
            for step in range(1, steps + 1):
                await asyncio.sleep(self.node_s / steps)
                if self.interrupted:
                    break
                await event("progress", {"value": step, "max": steps, "node": node_id})
                state(node_id, float(step), float(steps), "running")
                await event("progress_state", {"nodes": dict(states)})
            await asyncio.sleep(0 if steps else self.node_s)
            if steps and self.interrupted:  # a node without steps runs to its end
                await interrupted()
                status = "error"
                break
            if failure is not None:
                kind, text = failure
                await event(
                    "execution_error",
                    {
                        "node_id": node_id,
                        "node_type": node["class_type"],
                        "executed": executed,
                        "exception_message": text + "\n",  # format_exception_only's
                        "exception_type": kind,
                        "traceback": ["Traceback (most recent call last):\n", f"{kind}: {text}\n"],
                        "current_inputs": {},
                        "current_outputs": [],
                        "timestamp": _ms(),
                    },
                )
                status = "error"
                break
            images[node_id] = self._image(node, images)
            if node["class_type"] in {"SaveImage", "PreviewImage"}:
                kind = "output" if node["class_type"] == "SaveImage" else "temp"
                prefix = (
                    node["inputs"].get("filename_prefix", "ComfyUI")
                    if kind == "output"
                    else "ComfyUI_temp_fake"
                )
                width, height, colour, batch = images[node_id]
                items = []
                for _ in range(batch):  # one file per image of the batch, as the real one
                    self.counters[prefix] = self.counters.get(prefix, 0) + 1
                    filename = f"{prefix}_{self.counters[prefix]:05}_.png"
                    self.files[(kind, "", filename)] = solid_png(width, height, colour)
                    items.append({"filename": filename, "subfolder": "", "type": kind})
                ui = {"images": items}
                ui_outputs[node_id] = ui
                await event("executed", {"node": node_id, "display_node": node_id, "output": ui})
            executed.append(node_id)
            state(node_id, 1.0, 1.0, "finished")
            await event("progress_state", {"nodes": dict(states)})
        if status == "success":
            self.cache[key] = ui_outputs
            await event("execution_success", {"timestamp": _ms()})
        await asyncio.sleep(self.history_lag_s)
        self.history[prompt_id] = {
            "prompt": [number, prompt_id, prompt, extra, outputs],
            "outputs": ui_outputs,
            "status": {
                "status_str": status,
                "completed": status == "success",
                "messages": messages,
            },
            "meta": {
                n: {"node_id": n, "display_node": n, "parent_node": None, "real_node_id": n}
                for n in ui_outputs
            },
        }
        self.running = None
        await self.broadcast_status()
        if sid is not None:
            await self.send("executing", {"node": None, "prompt_id": prompt_id}, sid)
        self.timings[prompt_id] = (self.timings[prompt_id][0], time.perf_counter())


@asynccontextmanager
async def fake_comfyui(
    node_s: float = 0.005, port: int | None = None
) -> AsyncIterator[tuple[FakeComfyUI, str, uvicorn.Server]]:
    """A FakeComfyUI served on a free port: (fake, base URL, server); it stops at the end
    (or earlier: `server.should_exit = True`)."""
    fake = FakeComfyUI(node_s)
    port = port or free_port()
    config = uvicorn.Config(
        fake.app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="off",
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    executor = asyncio.create_task(fake.executor())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield fake, f"http://127.0.0.1:{port}", server
    finally:
        executor.cancel()
        server.should_exit = True
        await fake.drop_sockets()
        await task
        with contextlib.suppress(asyncio.CancelledError):
            await executor
