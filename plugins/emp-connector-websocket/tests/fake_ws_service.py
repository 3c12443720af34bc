"""A small WebSocket service for the connector's tests and benchmark.

It takes `{"type": "job", "job_id", "payload"}` frames and answers with
`{"type": "progress", "job_id", "progress", "message"}` frames, then
`{"type": "result", "job_id", "result"}` or `{"type": "error", "job_id", "error", "retryable"}`.
It honours `{"type": "cancel", "job_id"}` (the job stops, no more frames). Every job also
gets the result frame of another job first, and a frame that is not JSON when asked.

Payload knobs: `steps` (3), `step_s` (0.01 s per step), `fail` (an error message),
`retryable` (of the error), `drop` (close the connection mid-job on the first n
submissions of this job id; "always" on every one), `hang` (send nothing after the first
progress), `junk` (send a non-JSON frame and a progress frame without a number),
`no_result` (a result frame without `result`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed


class FakeService:
    """The fake's state: what it received and did."""

    def __init__(self) -> None:
        self.submissions: Counter[str] = Counter()
        self.cancelled: list[str] = []
        self.completed: list[str] = []
        self.running: set[str] = set()
        self.headers: list[str | None] = []
        #: Seconds from each job's frame to its result frame (the service's own time).
        self.durations: dict[str, float] = {}
        self.server: Server | None = None
        #: Set when a job starts, and when a cancel frame stops one.
        self.started = asyncio.Event()
        self.cancel_seen = asyncio.Event()

    @property
    def url(self) -> str:
        """ws://127.0.0.1:<port>."""
        assert self.server is not None
        host, port = next(iter(self.server.sockets)).getsockname()[:2]
        return f"ws://{host}:{port}"

    async def handle(self, conn: ServerConnection) -> None:
        """One client connection: jobs and cancels."""
        self.headers.append(conn.request.headers.get("Authorization") if conn.request else None)
        tasks: dict[str, asyncio.Task[None]] = {}
        try:
            async for raw in conn:
                frame = json.loads(raw)
                job_id = str(frame.get("job_id"))
                if frame.get("type") == "job":
                    self.submissions[job_id] += 1
                    tasks[job_id] = asyncio.create_task(
                        self.job(conn, job_id, frame.get("payload") or {})
                    )
                elif frame.get("type") == "cancel" and job_id in tasks:
                    tasks.pop(job_id).cancel()
                    self.running.discard(job_id)
                    self.cancelled.append(job_id)
                    self.cancel_seen.set()
        except ConnectionClosed:
            pass
        finally:
            for task in tasks.values():
                task.cancel()

    async def job(self, conn: ServerConnection, job_id: str, payload: dict[str, Any]) -> None:
        """Run one job: progress frames, then its result or error."""
        self.running.add(job_id)
        self.started.set()
        began = time.perf_counter()
        try:
            steps, step_s = int(payload.get("steps", 3)), float(payload.get("step_s", 0.01))
            other = {"type": "result", "job_id": "other", "result": "not yours"}
            await conn.send(json.dumps(other))
            if payload.get("junk"):
                await conn.send("this is not json")
                await conn.send(json.dumps({"type": "progress", "job_id": job_id}))
            drop = payload.get("drop", 0)
            dropping = drop == "always" or self.submissions[job_id] <= int(drop)
            for step in range(1, steps + 1):
                await asyncio.sleep(step_s)
                percent = round(100 * step / (steps + 1))
                await conn.send(
                    json.dumps(
                        {
                            "type": "progress",
                            "job_id": job_id,
                            "progress": percent,
                            "message": f"step {step}/{steps}",
                        }
                    )
                )
                if dropping and step == 1:
                    await conn.close()  # the socket goes, the job with it
                    return
                if payload.get("hang"):
                    await asyncio.Event().wait()
            if payload.get("fail"):
                error = {
                    "type": "error",
                    "job_id": job_id,
                    "error": payload["fail"],
                    "retryable": bool(payload.get("retryable", False)),
                }
                await conn.send(json.dumps(error))
                return
            result: dict[str, Any] = {"type": "result", "job_id": job_id}
            if not payload.get("no_result"):
                result["result"] = {"echo": payload, "steps": steps}
            await conn.send(json.dumps(result))
            self.durations[job_id] = time.perf_counter() - began
            self.completed.append(job_id)
        except ConnectionClosed:
            pass
        finally:
            self.running.discard(job_id)


@asynccontextmanager
async def fake_ws_service(port: int = 0) -> AsyncIterator[FakeService]:
    """The fake service on `port` (0: a free one) until the block ends."""
    fake = FakeService()
    async with serve(fake.handle, "127.0.0.1", port) as server:
        fake.server = server
        yield fake
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2)
