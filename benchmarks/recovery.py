"""How fast a job comes back when the worker running it dies. Prints JSON.

One `emp-hub serve` process on an embedded Valkey (or --url), a worker running a long
simulation job, and a spare worker. Then the first worker is taken away, three ways:

* `kill9`: SIGKILL. The kernel closes its socket; the hub sees the connection end at once
  and requeues the job when the reconnect grace is over.
* `cut`: the network between it and the hub goes silent without a close (a TCP proxy in
  this script stops forwarding, both ways). The hub notices when its WebSocket pings go
  unanswered (uvicorn: every 20 s, 20 s to answer) or when the lease runs out.
* `sigstop`: SIGSTOP. Its socket stays open and silent; the same as `cut` for the hub.

For each we measure the seconds from the failure to the job running on the spare worker
(its `claimed_at`). The lease (`--lease`, default the hub's 30 s) guards a worker that is
silent but still connected; the grace (`--grace`, default 5 s) one whose connection ended.

Usage: python -m benchmarks.recovery [--runs 3] [--scenarios kill9,cut,sigstop]
       [--grace 5] [--lease 30] [--url REDIS_URL]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx

import emp_hub
from benchmarks.hub import hubs
from benchmarks.worker import start_worker
from emp_hub.embedded import free_port, redis_url_or_embedded

SCENARIOS = ("kill9", "cut", "sigstop")


class Proxy:
    """A TCP proxy to the hub that can go silent (forward nothing, close nothing)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.silent = False
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> Proxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [writer, up_writer]
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(src, dst))
            self._tasks.add(task)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await src.read(65536):
                if not self.silent:  # once cut, bytes vanish and nothing is closed
                    dst.write(data)
                    await dst.drain()


async def wait_for(check: Any, what: str, within: float) -> Any:
    """Poll `check()` until it returns something truthy (at most `within` seconds)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        found = await check()
        if found:
            return found
        await asyncio.sleep(0.02)
    raise RuntimeError(f"timed out waiting for {what}")


@asynccontextmanager
async def worker(hub_url: str, worker_id: str, tmp: Path) -> AsyncIterator[subprocess.Popen[bytes]]:
    """A worker process, stopped (and reaped) at the end whatever state it is in."""
    proc = start_worker(hub_url, worker_id, tmp, EMP_SIMULATION_DURATION="600")
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        proc.wait()


async def one_run(hub_url: str, scenario: str, tmp: Path, lease: float) -> float:
    """Take the worker running a job away; seconds until the job runs on the spare."""
    run_id = uuid.uuid4().hex[:6]
    doomed_id, spare_id = f"doomed-{run_id}", f"spare-{run_id}"
    port = int(hub_url.rsplit(":", 1)[1])
    async with Proxy(port) as proxy, httpx.AsyncClient(base_url=hub_url, timeout=10) as http:

        async def live(*ids: str) -> bool:
            workers = {w["worker_id"] for w in (await http.get("/api/workers")).json()}
            return set(ids) <= workers

        via = f"http://127.0.0.1:{proxy.port}" if scenario == "cut" else hub_url
        async with worker(via, doomed_id, tmp) as doomed:
            await wait_for(lambda: live(doomed_id), "the worker", 60)
            submitted = await http.post("/api/jobs", json={"job_type": "simulation"})
            job_id = submitted.json()["job_id"]

            async def job() -> dict[str, Any]:
                body: dict[str, Any] = (await http.get(f"/api/jobs/{job_id}")).json()
                return body

            async def running_on(worker_id: str) -> bool:
                j = await job()
                return bool(j["status"] == "active" and j["worker_id"] == worker_id)

            await wait_for(lambda: running_on(doomed_id), "the job to start", 30)
            async with worker(hub_url, spare_id, tmp):
                await wait_for(lambda: live(spare_id), "the spare worker", 60)
                failed_at = time.time()
                if scenario == "kill9":
                    doomed.kill()
                elif scenario == "sigstop":
                    doomed.send_signal(signal.SIGSTOP)
                else:
                    proxy.silent = True
                await wait_for(lambda: running_on(spare_id), "the rescue", lease + 60)
                recovered = float((await job())["claimed_at"]) - failed_at
                await http.post(f"/api/jobs/{job_id}/cancel")
                return recovered


async def run(args: argparse.Namespace, url: str, tmp: Path) -> dict[str, Any]:
    scenarios = [s for s in args.scenarios.split(",") if s]
    results: dict[str, Any] = {}
    settings = {
        "EMP_BROKER__RECONNECT_GRACE_S": str(args.grace),
        "EMP_BROKER__LEASE_S": str(args.lease),
    }
    async with hubs(url, 1, f"bench-recovery-{uuid.uuid4().hex[:8]}", settings=settings) as [hub]:
        for scenario in scenarios:
            times = [await one_run(hub.url, scenario, tmp, args.lease) for _ in range(args.runs)]
            results[scenario] = {
                "seconds": [round(t, 3) for t in times],
                "median_s": round(statistics.median(times), 3),
            }
    return {
        "benchmark": "recovery",
        "what": "seconds from a worker's failure to its job running on another worker",
        "conditions": {
            "reconnect_grace_s": args.grace,
            "lease_s": args.lease,
            "hub_ws_ping": "uvicorn defaults: every 20 s, 20 s to answer",
            "maintenance_interval_s": 1.0,
            "worker_heartbeat_s": 20,
            "runs": args.runs,
            "redis": "embedded Valkey" if not args.url else "given",
            "emp": emp_hub.__version__,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        },
        "results": results,
    }


def main(argv: list[str] | None = None) -> None:
    """Run the scenarios and print the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--grace", type=float, default=5.0, help="reconnect grace (s)")
    parser.add_argument("--lease", type=float, default=30.0, help="lease (s)")
    parser.add_argument("--url", help="Redis URL (default: an embedded Valkey)")
    args = parser.parse_args(argv)
    unknown = set(args.scenarios.split(",")) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        with redis_url_or_embedded(args.url, tmp / "valkey") as url:
            print(json.dumps(asyncio.run(run(args, url, tmp)), indent=2))


if __name__ == "__main__":
    main()
