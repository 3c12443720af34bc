"""A small fake AUTOMATIC1111 (stable-diffusion-webui v1.10 API) that behaves like the real
one per the reference (comfyui-a1111.md section 4): generation requests are serialized by
one lock and block until done; /sdapi/v1/progress reports the global state with an ETA;
/sdapi/v1/interrupt makes the running request return 200 with partial images; options
switch the checkpoint (500 `model 'x' not found` for an unknown one); `--api-auth` basic
auth and A1111's error bodies. Run it alone: `python fake_a1111.py --port 7861`."""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import secrets
import struct
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

SAMPLERS = ["Euler a", "Euler", "DPM++ 2M", "DDIM"]


def png(width: int, height: int, shade: int = 0) -> bytes:
    """A small RGB PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    rows = b"".join(
        b"\x00" + b"".join(bytes((shade & 0xFF, x & 0xFF, y & 0xFF)) for x in range(width))
        for y in range(height)
    )
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


@dataclass
class Checkpoint:
    name: str
    hash: str

    @property
    def title(self) -> str:
        return f"{self.name} [{self.hash}]"

    def item(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "model_name": self.name.rsplit(".", 1)[0],
            "hash": self.hash,
            "sha256": self.hash + "0" * 54,
            "filename": f"/models/Stable-diffusion/{self.name}",
            "config": None,
        }

    def aliases(self) -> set[str]:
        return {self.title, self.name, self.name.rsplit(".", 1)[0], self.hash}


@dataclass
class FakeA1111:
    """The fake's state and knobs (change them from a test while it runs)."""

    step_s: float = 0.01  #: time per sampling step
    load_s: float = 0.05  #: time a checkpoint switch takes
    auth: tuple[str, str] | None = None  #: --api-auth user:pass
    nowebui: bool = False  #: no /internal/ping
    checkpoints: list[Checkpoint] = field(
        default_factory=lambda: [
            Checkpoint("v1-5-pruned-emaonly.safetensors", "6ce0161689"),
            Checkpoint("sd_xl_base_1.0.safetensors", "31e35c80fc"),
        ]
    )
    loaded: str | None = None  #: title of the loaded checkpoint (None: the first one)
    malformed: str | None = None  #: "json" | "images" | "base64": break the next answers
    # the global state (modules/shared_state.py)
    job: str = ""
    job_count: int = 0
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    interrupted: bool = False
    started: float = 0.0
    switches: list[str] = field(default_factory=list)  #: titles switched to, in order
    requests: list[dict[str, Any]] = field(default_factory=list)  #: generation bodies
    progress_polls: int = 0
    spent: list[float] = field(default_factory=list)  #: seconds each generation request took
    interrupts: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def __post_init__(self) -> None:
        if self.loaded is None and self.checkpoints:
            self.loaded = self.checkpoints[0].title

    def find(self, alias: str) -> Checkpoint | None:
        return next((c for c in self.checkpoints if alias in c.aliases()), None)

    def begin(self, job: str) -> None:
        self.job, self.job_count, self.job_no = job, -1, 0
        self.interrupted = False
        self.sampling_step = self.sampling_steps = 0
        self.started = time.monotonic()

    def end(self) -> None:
        self.job, self.job_count = "", 0  # `interrupted` stays as it was

    def progress(self) -> dict[str, Any]:
        state = {
            "skipped": False,
            "interrupted": self.interrupted,
            "stopping_generation": False,
            "job": self.job,
            "job_count": self.job_count,
            "job_timestamp": "20260101000000",
            "job_no": self.job_no,
            "sampling_step": self.sampling_step,
            "sampling_steps": self.sampling_steps,
        }
        if self.job_count == 0:
            return {
                "progress": 0,
                "eta_relative": 0,
                "state": state,
                "current_image": None,
                "textinfo": None,
            }
        done = self.sampling_step / self.sampling_steps if self.sampling_steps else 0.0
        elapsed = time.monotonic() - self.started
        eta = elapsed / done - elapsed if done > 0 else 0.0
        return {
            "progress": round(done, 4),
            "eta_relative": round(eta, 3),
            "state": state,
            "current_image": None,
            "textinfo": None,
        }


def error(status: int, kind: str, detail: str = "", errors: str = "") -> JSONResponse:
    """A1111's handled-exception body (modules/api/api.py handle_exception), no headers."""
    body = {"error": kind, "detail": detail, "body": "", "errors": errors or detail}
    return JSONResponse(body, status_code=status)


def validation(loc: list[str], msg: str, kind: str) -> JSONResponse:
    """FastAPI 0.94's (pydantic v1) 422."""
    return JSONResponse({"detail": [{"loc": loc, "msg": msg, "type": kind}]}, status_code=422)


INT_FIELDS = ("steps", "width", "height", "batch_size", "n_iter", "seed")


def create_app(fake: FakeA1111) -> FastAPI:
    """The fake's FastAPI app."""
    app = FastAPI()

    @app.middleware("http")
    async def api_auth(request: Request, call_next: Any) -> Response:
        if fake.auth is None or not request.url.path.startswith("/sdapi/"):
            response: Response = await call_next(request)
            return response
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("basic "):
            return error(401, "HTTPException", "Not authenticated")
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return error(401, "HTTPException", "Invalid authentication credentials")
        if not (
            secrets.compare_digest(user, fake.auth[0])
            and secrets.compare_digest(password, fake.auth[1])
        ):
            return error(401, "HTTPException", "Incorrect username or password")
        response = await call_next(request)
        return response

    @app.get("/internal/ping")
    async def ping() -> Response:
        if fake.nowebui:
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        return JSONResponse({})

    @app.get("/sdapi/v1/progress")
    async def progress() -> Response:
        fake.progress_polls += 1
        if fake.malformed == "json":
            return PlainTextResponse("<html>Bad gateway</html>", status_code=200)
        return JSONResponse(fake.progress())

    @app.post("/sdapi/v1/interrupt")
    async def interrupt() -> Response:
        fake.interrupts += 1
        if fake.job_count != 0:
            fake.interrupted = True
        return JSONResponse({})

    @app.post("/sdapi/v1/skip")
    async def skip() -> Response:
        return JSONResponse(None)

    @app.get("/sdapi/v1/options")
    async def get_options() -> Response:
        return JSONResponse(
            {"sd_model_checkpoint": fake.loaded, "samples_format": "png", "return_grid": True}
        )

    @app.post("/sdapi/v1/options")
    async def set_options(request: Request) -> Response:
        body = await request.json()
        wanted = body.get("sd_model_checkpoint")
        if wanted is not None:
            checkpoint = fake.find(str(wanted))
            if checkpoint is None:
                return error(500, "RuntimeError", "", f"model {wanted!r} not found")
            async with fake.lock:  # reloads synchronously under the queue lock
                if checkpoint.title != fake.loaded:
                    await asyncio.sleep(fake.load_s)
                    fake.loaded = checkpoint.title
                    fake.switches.append(checkpoint.title)
        return JSONResponse(None)

    @app.get("/sdapi/v1/sd-models")
    async def sd_models() -> Response:
        return JSONResponse([c.item() for c in fake.checkpoints])

    @app.post("/sdapi/v1/refresh-checkpoints")
    async def refresh() -> Response:
        return JSONResponse(None)

    @app.get("/sdapi/v1/samplers")
    async def samplers() -> Response:
        return JSONResponse([{"name": s, "aliases": [], "options": {}} for s in SAMPLERS])

    @app.get("/sdapi/v1/memory")
    async def memory() -> Response:
        ram = {"free": 8e9, "used": 8e9, "total": 16e9}
        return JSONResponse({"ram": ram, "cuda": {"error": "unavailable"}})

    async def generate(request: Request, mode: str) -> Response:
        began = time.perf_counter()
        try:
            return await _generate(request, mode)
        finally:
            fake.spent.append(time.perf_counter() - began)

    async def _generate(request: Request, mode: str) -> Response:
        try:
            body = await request.json()
        except ValueError:
            return validation(["body"], "value is not a valid dict", "type_error.dict")
        if not isinstance(body, dict):
            return validation(["body"], "value is not a valid dict", "type_error.dict")
        for name in INT_FIELDS:
            if name in body and not isinstance(body[name], int):
                try:
                    body[name] = int(body[name])
                except (TypeError, ValueError):
                    return validation(
                        ["body", name], "value is not a valid integer", "type_error.integer"
                    )
        sampler = body.get("sampler_name") or body.get("sampler_index") or "Euler"
        if sampler not in SAMPLERS:
            return error(400, "HTTPException", "Sampler not found")
        if mode == "img2img":
            images = body.get("init_images")
            if not images:
                return error(404, "HTTPException", "Init image not found")
        fake.requests.append(body)
        steps = int(body.get("steps", 20))
        batch = int(body.get("batch_size", 1)) * int(body.get("n_iter", 1))
        width, height = int(body.get("width", 512)), int(body.get("height", 512))
        async with fake.lock:  # queue_lock: one generation at a time
            if fake.loaded is None:
                return error(
                    500,
                    "FileNotFoundError",
                    "",
                    "No checkpoints found. When searching for checkpoints, looked at: ...",
                )
            fake.begin(f"{mode}")
            fake.job_count = int(body.get("n_iter", 1))
            fake.sampling_steps = steps
            try:
                for step in range(1, steps + 1):
                    if fake.interrupted:
                        break
                    await asyncio.sleep(fake.step_s)
                    fake.sampling_step = step
                done = fake.sampling_step
            finally:
                fake.end()
        params = {
            "prompt": "",
            "negative_prompt": "",
            "seed": -1,
            "steps": 20,
            "width": 512,
            "height": 512,
            "cfg_scale": 7.0,
            "sampler_name": None,
            "batch_size": 1,
            "n_iter": 1,
            "send_images": True,
            "save_images": False,
            **body,
        }
        seed = int(body.get("seed", -1))
        seed = 1234 if seed == -1 else seed
        checkpoint = fake.find(fake.loaded or "")
        info = {
            "prompt": body.get("prompt", ""),
            "all_prompts": [body.get("prompt", "")] * batch,
            "negative_prompt": body.get("negative_prompt", ""),
            "seed": seed,
            "all_seeds": [seed + i for i in range(batch)],
            "width": width,
            "height": height,
            "sampler_name": sampler,
            "cfg_scale": body.get("cfg_scale", 7.0),
            "steps": done,
            "batch_size": body.get("batch_size", 1),
            "sd_model_name": checkpoint.name.rsplit(".", 1)[0] if checkpoint else None,
            "sd_model_hash": checkpoint.hash if checkpoint else None,
            "denoising_strength": body.get("denoising_strength", 0.75 if mode == "img2img" else 0),
            "extra_generation_params": {},
            "index_of_first_image": 0,
            "infotexts": [f"{body.get('prompt', '')}\nSteps: {done}"] * batch,
            "job_timestamp": "20260101000000",
            "version": "v1.10.1",
        }
        size = (min(width, 64), min(height, 64))
        images = (
            [base64.b64encode(png(*size, shade=i)).decode() for i in range(batch)]
            if params["send_images"]
            else []
        )
        if fake.malformed == "images":
            return JSONResponse({"parameters": params, "info": json.dumps(info)})
        if fake.malformed == "base64":
            images = ["not base64 at all!"]
        if fake.malformed == "json":
            return PlainTextResponse("<html>502 Bad Gateway</html>", status_code=200)
        return JSONResponse({"images": images, "parameters": params, "info": json.dumps(info)})

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: Request) -> Response:
        return await generate(request, "txt2img")

    @app.post("/sdapi/v1/img2img")
    async def img2img(request: Request) -> Response:
        return await generate(request, "img2img")

    return app


def main() -> None:
    """Serve the fake on a port (for tests that kill it mid-job)."""
    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=7861)
    parser.add_argument("--step-s", type=float, default=0.05)
    args = parser.parse_args()
    uvicorn.run(
        create_app(FakeA1111(step_s=args.step_s)),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
