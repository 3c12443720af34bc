"""End to end through the hub: simulated workers speaking the protocol. Prints JSON.

The hub runs as real `emp-hub serve` processes (one, then two replicas on one Redis).
In this process, 50 asyncio workers connect over WebSocket, ask for one job at a time and
complete each at once. We measure

* throughput: 20,000 jobs submitted in HTTP batches while the workers run, jobs/s from the
  first submit to the last completion;
* submit-to-assigned latency with idle workers waiting, one job at a time: from the job's
  submission (its `created_at`, stamped by the hub) to the `job_assigned` frame arriving at
  a worker, and from just before the client's HTTP request (p50, p99);
* the client's floor: the same client, requests and pauses against a bare ASGI app on
  uvicorn that answers at once (what any HTTP service costs this client on this machine);
* the topology's floor: the latency phase against BARE_HUB, which makes a submit's hops
  (one script call to Redis, one frame to a worker) and does nothing else.

The latency phase's client is `LeanHTTP`, a bare HTTP/1.1 client on one kept-alive
connection: httpx alone took 1.5 to 2.4 ms a request here, more than the hub's part.

With `--hub-processes N [N ...]`, each run is one `emp-hub serve --workers N` (N uvicorn
processes behind one port) instead of separate replicas on their own ports. Every run also
reports the hub's CPU time (all its processes) per job of the throughput phase.

Usage: python benchmarks/hub.py [--jobs N] [--workers N] [--hub-processes N ...] [--url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import websockets

import emp_hub
from emp_hub.broker import connect
from emp_hub.embedded import free_port, redis_url_or_embedded


@dataclass
class RunningHub:
    """A hub process of a benchmark."""

    url: str
    proc: asyncio.subprocess.Process
    env: dict[str, str]

    @property
    def pid(self) -> int:
        """The process id of the hub running now."""
        return self.proc.pid

    async def kill_and_restart(self, down_s: float = 0.0) -> None:
        """SIGKILL the hub, wait `down_s`, start it again (same port and settings) and
        wait until it is ready."""
        self.proc.kill()
        await self.proc.wait()
        await asyncio.sleep(down_s)
        self.proc = await _start_hub(self.url, self.env)
        await _until_ready(self.url)


async def _start_hub(
    url: str, env: dict[str, str], processes: int = 1
) -> asyncio.subprocess.Process:
    port = url.rsplit(":", 1)[1]
    more = ["--workers", str(processes)] if processes > 1 else []
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "emp_hub.cli", "serve", "--port", port, *more, env=env
    )


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants (Linux /proc)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            todo.extend(int(c) for c in task.read_text().split())
    return out


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of the processes `pids` (Linux /proc)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


async def _until_ready(url: str) -> None:
    async with httpx.AsyncClient() as http:
        for _ in range(400):
            try:
                if (await http.get(f"{url}/health/ready")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)


@asynccontextmanager
async def hubs(
    redis_url: str,
    count: int,
    namespace: str,
    *,
    processes: int = 1,
    settings: Mapping[str, str] | None = None,
) -> AsyncIterator[list[RunningHub]]:
    """`count` hubs on one Redis, each `emp-hub serve --workers processes`, in a namespace
    removed afterwards; `settings` are more EMP_* variables."""
    env = {
        **os.environ,
        "EMP_REDIS_URL": redis_url,
        "EMP_BROKER__NAMESPACE": namespace,
        "EMP_LOG_LEVEL": "warning",
        "EMP_SUBMIT_RATE": "1000000",
        "EMP_SUBMIT_BURST": "1000000",
        **(settings or {}),
    }
    running = []
    for _ in range(count):
        url = f"http://127.0.0.1:{free_port()}"
        running.append(RunningHub(url, await _start_hub(url, env, processes), env))
    try:
        for hub in running:
            await _until_ready(hub.url)
        yield running
    finally:
        for hub in running:
            if hub.proc.returncode is None:
                hub.proc.terminate()
        for hub in running:
            try:  # a hub closing thousands of sockets may take a while
                await asyncio.wait_for(hub.proc.wait(), 60)
            except TimeoutError:
                hub.proc.kill()
                await hub.proc.wait()
        client = connect(redis_url)
        keys = [k async for k in client.scan_iter(match="{" + namespace + "}:*", count=1000)]
        for i in range(0, len(keys), 1000):
            await client.unlink(*keys[i : i + 1000])
        await client.aclose()


class Workers:
    """Simulated workers: one slot each, complete every job at once."""

    def __init__(self) -> None:
        self.done = 0
        self.assigned_at: dict[str, float] = {}
        self.from_created: list[float] = []
        self.assignment = asyncio.Event()  # set at every assignment
        self.all_done = asyncio.Event()
        self.expected = 0

    async def run(self, url: str, worker_id: str, ready: asyncio.Event) -> None:
        ws_url = url.replace("http", "ws") + f"/ws/worker/{worker_id}"
        async with websockets.connect(ws_url, max_size=None) as conn:
            await conn.send(
                json.dumps(
                    {
                        "type": "register_worker",
                        "worker_id": worker_id,
                        "capabilities": {"services": ["noop"]},
                    }
                )
            )
            await conn.send(json.dumps({"type": "request_job", "slots": 1}))
            ready.set()
            async for raw in conn:
                message = json.loads(raw)
                if message["type"] != "job_assigned":
                    continue
                self.assigned_at[message["job_id"]] = time.perf_counter()
                self.from_created.append(time.time() - message["created_at"])
                self.assignment.set()
                await conn.send(
                    json.dumps(
                        {"type": "complete_job", "job_id": message["job_id"], "result": None}
                    )
                )
                await conn.send(json.dumps({"type": "request_job", "slots": 1}))
                self.done += 1
                if self.done >= self.expected:
                    self.all_done.set()


async def start_workers(urls: list[str], count: int) -> tuple[Workers, list[asyncio.Task[None]]]:
    workers = Workers()
    tasks = []
    for i in range(count):
        ready = asyncio.Event()
        tasks.append(asyncio.create_task(workers.run(urls[i % len(urls)], f"bench-{i}", ready)))
        await ready.wait()
    await asyncio.sleep(0.5)  # every request parked
    return workers, tasks


async def throughput(
    urls: list[str], workers: int, jobs: int, hub_pids: list[int] | None = None
) -> dict[str, Any]:
    pool, tasks = await start_workers(urls, workers)
    pool.expected = jobs
    pids = [p for pid in hub_pids or [] for p in _tree(pid)]
    cpu0 = cpu_seconds(pids)
    batch = [{"job_type": "noop", "payload": {}} for _ in range(500)]
    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=60) as http:
        for i in range(0, jobs, 500):
            url = urls[(i // 500) % len(urls)]
            r = await http.post(f"{url}/api/jobs/batch", json={"jobs": batch[: jobs - i]})
            r.raise_for_status()
    await asyncio.wait_for(pool.all_done.wait(), 600)
    elapsed = time.perf_counter() - start
    cpu = cpu_seconds(pids) - cpu0
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "jobs": jobs,
        "workers": workers,
        "seconds": round(elapsed, 2),
        "jobs_per_s": round(jobs / elapsed),
        "hub_processes": len(pids),
        "hub_cpu_ms_per_job": round(1000 * cpu / jobs, 3),
    }


class LeanHTTP:
    """A bare HTTP/1.1 client: one kept-alive connection per origin, JSON POSTs, answers
    with a Content-Length (as uvicorn gives them). The latency phase's client, so that its
    figures are the hub's and not mostly the client's."""

    def __init__(self) -> None:
        self._connections: dict[str, tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}

    async def post(self, url: str, body: Any) -> Any:
        """POST `body` as JSON to `url` (http://host:port/path); the answer's JSON.
        Raises RuntimeError on an answer other than 2xx."""
        origin, _, path = url.removeprefix("http://").partition("/")
        if origin not in self._connections:
            host, _, port = origin.partition(":")
            self._connections[origin] = await asyncio.open_connection(host, int(port))
        reader, writer = self._connections[origin]
        data = json.dumps(body).encode()
        writer.write(
            f"POST /{path} HTTP/1.1\r\nHost: {origin}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data
        )
        status_line, *headers = (await reader.readuntil(b"\r\n\r\n")).split(b"\r\n")
        lengths = [
            int(value)
            for name, _, value in (h.partition(b":") for h in headers)
            if name.lower() == b"content-length"
        ]
        if not lengths:
            raise RuntimeError(f"{url}: an answer without a Content-Length")
        length = lengths[0]
        answer = await reader.readexactly(length)
        if not status_line.split()[1].startswith(b"2"):
            raise RuntimeError(f"{url}: {status_line.decode()} {answer.decode()}")
        return json.loads(answer)

    async def aclose(self) -> None:
        """Close every connection."""
        for _, writer in self._connections.values():
            writer.close()
        self._connections.clear()


async def latency(urls: list[str], workers: int, samples: int) -> dict[str, Any]:
    pool, tasks = await start_workers(urls, workers)
    pool.expected = samples
    out = []
    http = LeanHTTP()
    try:
        for i in range(samples):
            url = urls[i % len(urls)]
            before = time.perf_counter()
            job_id = (await http.post(f"{url}/api/jobs", {"job_type": "noop"}))["job_id"]
            while job_id not in pool.assigned_at:
                pool.assignment.clear()
                if job_id not in pool.assigned_at:
                    await pool.assignment.wait()
            out.append(pool.assigned_at[job_id] - before)
            await asyncio.sleep(0.005)  # the worker is idle and waiting again
    finally:
        await http.aclose()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "samples": samples,
        "from_http_request": percentiles(out),
        "from_submission": percentiles(pool.from_created),
    }


#: A bare ASGI app (reads the body, answers a small JSON): the floor's server.
BARE_APP = """
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    headers = [(b"content-type", b"application/json"), (b"content-length", b"15")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b'{"job_id": "x"}'})
"""


#: The least a hub can do per submit, as an ASGI app (the topology's floor): read the
#: body, one script call to Redis on one raw connection, a `job_assigned` frame to the
#: next of its WebSocket workers, a small JSON answer. No validation, no matching, no
#: state: what the latency phase would measure of a hub with no work of its own.
BARE_HUB = """
import asyncio, itertools, json, os, time
from urllib.parse import urlsplit

workers = []
turn = itertools.count()
redis = []

def command(*args):
    out = [b"*%d\\r\\n" % len(args)]
    for a in args:
        out.append(b"$%d\\r\\n%s\\r\\n" % (len(a), a))
    return b"".join(out)

KEY = os.environ["BARE_HUB_KEY"].encode()
INCR = command(b"EVAL", b"return redis.call('INCR', KEYS[1])", b"1", KEY)

async def connect():
    url = urlsplit(os.environ["BARE_HUB_REDIS"])
    reader, writer = await asyncio.open_connection(url.hostname, url.port or 6379)
    if url.password:
        writer.write(command(b"AUTH", url.password.encode()))
        await reader.readline()
    writer.write(command(b"SELECT", (url.path.strip("/") or "0").encode()))
    await reader.readline()
    redis[:] = [reader, writer]

async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await connect()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        workers.append(send)
        while (await receive())["type"] != "websocket.disconnect":
            pass  # what a worker says is not read
        workers.remove(send)
        return
    while (await receive()).get("more_body"):
        pass
    body = b"{}"  # a GET: ready
    if scope["method"] == "POST":
        reader, writer = redis
        writer.write(INCR)
        job_id = f"bare-{int((await reader.readline())[1:])}"
        assigned = {"type": "job_assigned", "job_id": job_id, "created_at": time.time()}
        worker = workers[next(turn) % len(workers)]
        await worker({"type": "websocket.send", "text": json.dumps(assigned)})
        body = json.dumps({"job_id": job_id}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
"""


async def topology_floor(redis_url: str, workers: int, samples: int) -> dict[str, Any]:
    """The latency phase against BARE_HUB on uvicorn (its defaults, as the hub's), with
    the same client and workers: what the hops alone cost on this machine (client, hub,
    Redis, hub, worker), the floor of "from HTTP request" for any hub built this way."""
    key = f"bench-bare-hub:{os.getpid()}"
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "bare_hub.py").write_text(BARE_HUB)
        port = free_port()
        server = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "uvicorn", "--app-dir", tmp, "bare_hub:app"),
            *("--port", str(port), "--log-level", "warning", "--no-access-log"),
            *("--ws-per-message-deflate", "false"),
            env={**os.environ, "BARE_HUB_REDIS": redis_url, "BARE_HUB_KEY": key},
        )
        url = f"http://127.0.0.1:{port}"
        try:
            await _until_ready(url)
            report = await latency([url], workers, samples)
        finally:
            server.terminate()
            await server.wait()
            client = connect(redis_url)
            await client.delete(key)
            await client.aclose()
    return report


async def client_floor(samples: int) -> dict[str, Any]:
    """The latency phase's client, requests and pauses against BARE_APP on uvicorn
    (its defaults, as the hub: uvloop, httptools): the part of "from HTTP request" that
    is the client, the HTTP server and the machine, not the hub."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "bare_app.py").write_text(BARE_APP)
        port = free_port()
        server = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "uvicorn", "--app-dir", tmp, "bare_app:app"),
            *("--port", str(port), "--log-level", "warning", "--no-access-log"),
        )
        url = f"http://127.0.0.1:{port}"
        out = []
        http = LeanHTTP()
        try:
            await _until_ready(url)  # it answers any path
            for _ in range(samples):
                before = time.perf_counter()
                await http.post(f"{url}/api/jobs", {"job_type": "noop"})
                out.append(time.perf_counter() - before)
                await asyncio.sleep(0.005)  # as the latency phase
        finally:
            await http.aclose()
            server.terminate()
            await server.wait()
    return {"samples": samples, "round_trip": percentiles(out)}


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50 and p99 in milliseconds."""
    ordered = sorted(samples)
    return {
        "p50_ms": round(statistics.median(ordered) * 1000, 2),
        "p99_ms": round(ordered[int(0.99 * (len(ordered) - 1))] * 1000, 2),
    }


async def run(
    redis_url: str, jobs: int, workers: int, samples: int, hub_processes: list[int] | None = None
) -> dict[str, Any]:
    # (replicas, processes per replica): replicas on their own ports, or one port.
    layouts = [(1, n) for n in hub_processes] if hub_processes else [(1, 1), (2, 1)]
    results = []
    for replicas, processes in layouts:
        namespace = f"bench-hub-{replicas}-{processes}-{os.getpid()}"
        async with hubs(redis_url, replicas, namespace, processes=processes) as running:
            urls = [h.url for h in running]
            pids = [h.pid for h in running]
            results.append(
                {
                    "replicas": replicas,
                    "processes_per_replica": processes,
                    "throughput": await throughput(urls, workers, jobs, pids),
                    "submit_to_assigned": await latency(urls, workers, samples),
                }
            )
            print(f"{replicas} replica(s) x {processes} process(es): done", file=sys.stderr)
    floor = await client_floor(samples)
    hops = await topology_floor(redis_url, workers, samples)
    return {
        "conditions": {
            "version": emp_hub.__version__,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "workers": workers,
            "jobs": jobs,
            "worker_side": "asyncio WebSocket clients in the benchmark process, 1 slot each",
            "submit": "HTTP batches of 500 (throughput, httpx); single HTTP submits (latency,"
            " LeanHTTP: HTTP/1.1 on one kept-alive connection)",
        },
        "results": results,
        "client_floor": floor,
        "topology_floor": hops,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=50)
    parser.add_argument("--samples", type=int, default=500, help="latency samples")
    parser.add_argument("--url", help="Redis URL (default: an embedded Valkey in a temp dir)")
    parser.add_argument(
        "--hub-processes",
        type=int,
        nargs="+",
        metavar="N",
        help="one run per N: one `emp-hub serve --workers N` (default: 1 and 2 replicas)",
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, redis_url_or_embedded(args.url, Path(tmp)) as url:
        report = asyncio.run(run(url, args.jobs, args.workers, args.samples, args.hub_processes))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
