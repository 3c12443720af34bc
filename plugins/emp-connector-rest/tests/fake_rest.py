"""A small REST service for the tests: sync and async endpoints, failures on demand.

Sync: POST /echo answers {"echo": body, "auth": header, "query": {...}, "elapsed_s"};
GET /image a PNG; GET /text plain text; DELETE /empty 204; GET /big 1 MB; GET /broken
"JSON" that is not;
GET /slow waits.
Async: POST /tasks -> {"data": {"task_id": id}}; GET /tasks/{id} -> {"state", "pct",
"output"} advancing `step` percent a poll (done at 100); GET /tasks/{id}/result the output;
POST /tasks/{id}/cancel. `fail_next` holds statuses the next calls answer with (then normal).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


@dataclass
class Task:
    """A job of the fake's async API."""

    id: str
    body: Any
    step: float
    progress: float = 0
    state: str = "queued"
    polls: int = 0


@dataclass
class FakeRest:
    """The fake's state, which tests steer and inspect."""

    step: float = 25
    fail_next: list[int] = field(default_factory=list)
    fail_task: bool = False
    calls: list[str] = field(default_factory=list)
    tasks: dict[str, Task] = field(default_factory=dict)
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    in_flight: int = 0
    most_in_flight: int = 0
    url: str = ""
    server: uvicorn.Server | None = None

    def _failure(self) -> Response | None:
        if self.fail_next:
            status = self.fail_next.pop(0)
            return JSONResponse({"error": f"failing on demand ({status})"}, status)
        return None

    async def echo(self, request: Request) -> Response:
        began = time.perf_counter()
        self.calls.append(f"{request.method} /echo")
        if failure := self._failure():
            return failure
        raw = await request.body()
        return JSONResponse(
            {
                "echo": json.loads(raw) if raw else None,
                "auth": request.headers.get("authorization") or request.headers.get("x-api-key"),
                "query": dict(request.query_params),
                "extra": request.headers.get("x-extra"),
                "elapsed_s": time.perf_counter() - began,  # the service's own time
            }
        )

    async def image(self, request: Request) -> Response:
        self.calls.append("GET /image")
        return Response(PNG, media_type="image/png")

    async def text(self, request: Request) -> Response:
        return PlainTextResponse("hello")

    async def empty(self, request: Request) -> Response:
        return Response(status_code=204)

    async def big(self, request: Request) -> Response:
        return Response(b"x" * 1_000_000, media_type="application/octet-stream")

    async def broken(self, request: Request) -> Response:
        return Response(b'{"not": json', media_type="application/json")

    async def slow(self, request: Request) -> Response:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(float(request.query_params.get("s", "5")))
        finally:
            self.in_flight -= 1
        return JSONResponse({"slow": True})

    async def submit(self, request: Request) -> Response:
        self.calls.append("POST /tasks")
        if failure := self._failure():
            return failure
        task = Task(id=f"t{next(self.ids)}", body=await request.json(), step=self.step)
        self.tasks[task.id] = task
        return JSONResponse({"data": {"task_id": task.id}}, 202)

    async def status(self, request: Request) -> Response:
        task = self.tasks.get(request.path_params["id"])
        if task is None:
            return JSONResponse({"error": "no such task"}, 404)
        if failure := self._failure():
            return failure
        task.polls += 1
        if task.state in {"queued", "running"}:
            task.progress = min(100, task.progress + task.step)
            task.state = "running" if task.progress < 100 else "done"
            if self.fail_task and task.progress >= 50:
                task.state = "failed"
        return JSONResponse(
            {
                "state": task.state,
                "pct": task.progress,
                "output": {"answer": task.body} if task.state == "done" else None,
                "problem": "the model exploded" if task.state == "failed" else None,
            }
        )

    async def result(self, request: Request) -> Response:
        task = self.tasks[request.path_params["id"]]
        if task.state != "done":
            return JSONResponse({"error": "not done"}, 409)
        return JSONResponse({"answer": task.body, "id": task.id})

    async def cancel(self, request: Request) -> Response:
        task = self.tasks[request.path_params["id"]]
        self.calls.append(f"POST /tasks/{task.id}/cancel")
        task.state = "cancelled"
        return JSONResponse({"ok": True})

    async def root(self, request: Request) -> Response:
        return JSONResponse({"service": "fake-rest"})

    def app(self) -> Starlette:
        """The ASGI app."""
        return Starlette(
            routes=[
                Route("/", self.root),
                Route("/echo", self.echo, methods=["GET", "POST", "PUT"]),
                Route("/image", self.image),
                Route("/text", self.text),
                Route("/big", self.big),
                Route("/empty", self.empty, methods=["DELETE"]),
                Route("/broken", self.broken),
                Route("/slow", self.slow, methods=["GET", "POST"]),
                Route("/tasks", self.submit, methods=["POST"]),
                Route("/tasks/{id}", self.status),
                Route("/tasks/{id}/result", self.result),
                Route("/tasks/{id}/cancel", self.cancel, methods=["POST"]),
            ]
        )

    async def stop(self) -> None:
        """Stop serving (the service dies)."""
        if self.server is not None:
            self.server.should_exit = True
            self.server.force_exit = True


@contextlib.asynccontextmanager
async def fake_rest(port: int = 0, **state: Any) -> AsyncIterator[FakeRest]:
    """Serve a FakeRest on `port` (0: a free one) until the block ends."""
    fake = FakeRest(**state)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    fake.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    config = uvicorn.Config(fake.app(), log_level="warning", lifespan="off")
    fake.server = server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield fake
    finally:
        server.should_exit = True
        await task
        sock.close()


def free_url() -> str:
    """A URL where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"
