"""Many idle workers on one hub: its memory and CPU share. Prints JSON.

One `emp-hub serve` process; this process opens N worker WebSockets (our protocol), each
registers, asks for one job and sends a heartbeat every 20 s (jittered), as idle workers
do. Once all are connected we measure the hub's RSS and its CPU share over a window, then
submit 20 jobs one at a time and time how long each takes to reach one of the workers.
Linux only (/proc).

Usage: python benchmarks/connections.py [--workers 5000] [--window 30] [--url REDIS_URL]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import websockets

import emp_hub
from benchmarks.hub import hubs
from emp_hub.embedded import redis_url_or_embedded

HEARTBEAT_S = 20.0
#: Jobs submitted one at a time once all workers are connected (reach time p50 and max).
REACH_SAMPLES = 20


def rss_mb(pid: int) -> float:
    """Resident memory of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def idle_worker(
    url: str, worker_id: str, connected: asyncio.Event, assigned: asyncio.Event, stop: asyncio.Event
) -> None:
    async with websockets.connect(url, open_timeout=60, ping_interval=None) as conn:
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
        connected.set()
        next_beat = time.monotonic() + random.uniform(0, HEARTBEAT_S)
        while not stop.is_set():
            try:
                raw = await asyncio.wait_for(conn.recv(), max(0.0, next_beat - time.monotonic()))
                if json.loads(raw)["type"] == "job_assigned":
                    assigned.set()
            except TimeoutError:
                await conn.send(
                    json.dumps(
                        {
                            "type": "worker_heartbeat",
                            "worker_id": worker_id,
                            "status": "idle",
                            "load": 0,
                        }
                    )
                )
                next_beat = time.monotonic() + HEARTBEAT_S


async def run(redis_url: str, workers: int, window: float) -> dict[str, Any]:
    async with hubs(redis_url, 1, f"bench-conn-{os.getpid()}") as running:
        url, pid = running[0].url, running[0].pid
        idle_rss = rss_mb(pid)
        stop, assigned = asyncio.Event(), asyncio.Event()
        tasks = []
        started = time.perf_counter()
        for start in range(0, workers, 250):
            events = [asyncio.Event() for _ in range(start, min(workers, start + 250))]
            for i, connected in zip(range(start, start + len(events)), events, strict=True):
                ws_url = url.replace("http", "ws") + f"/ws/worker/idle-{i}"
                tasks.append(
                    asyncio.create_task(idle_worker(ws_url, f"idle-{i}", connected, assigned, stop))
                )
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 120)
        connect_s = time.perf_counter() - started
        await asyncio.sleep(5)
        cpu_before, t_before = cpu_seconds(pid), time.monotonic()
        await asyncio.sleep(window)
        cpu_share = (cpu_seconds(pid) - cpu_before) / (time.monotonic() - t_before)
        rss = rss_mb(pid)
        reach_ms = []
        async with httpx.AsyncClient() as http:
            for _ in range(REACH_SAMPLES):
                assigned.clear()
                submitted = time.perf_counter()
                await http.post(f"{url}/api/jobs", json={"job_type": "noop"})
                await asyncio.wait_for(assigned.wait(), 30)
                reach_ms.append((time.perf_counter() - submitted) * 1000)
                await asyncio.sleep(0.2)
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "conditions": {
            "version": emp_hub.__version__,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "workers": workers,
            "heartbeat_s": HEARTBEAT_S,
            "window_s": window,
            "hub": "one emp-hub serve process (uvicorn)",
            "clients": "websockets clients in the benchmark process",
        },
        "hub_rss_mb_before": round(idle_rss, 1),
        "hub_rss_mb": round(rss, 1),
        "hub_cpu_share": round(cpu_share, 3),
        "connect_all_s": round(connect_s, 1),
        "job_reaches_a_worker_ms": {
            "samples": REACH_SAMPLES,
            "p50": round(statistics.median(reach_ms), 1),
            "max": round(max(reach_ms), 1),
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=5000)
    parser.add_argument("--window", type=float, default=30.0, help="seconds of CPU sampling")
    parser.add_argument("--url", help="Redis URL (default: an embedded Valkey in a temp dir)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, redis_url_or_embedded(args.url, Path(tmp)) as url:
        report = asyncio.run(run(url, args.workers, args.window))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
