"""Real worker processes through one hub. Prints JSON.

One `emp-hub serve` process on an embedded Valkey (or --url), N `emp-worker run` processes
with the simulation connector at zero duration (one slot each), then J jobs submitted in
HTTP batches of 500. We measure

* jobs/s from the first submit to the last completion;
* the worker-side overhead per job: from the hub handing the job out (`claimed_at`) to
  the hub recording its completion (`finished_at`), minus the time the connector itself
  took (`elapsed_s`, measured inside the connector), p50 and p99: the protocol, the
  worker's runtime and the hub's handling of the result;
* submit-to-complete p50 and p99 (including the time waiting in the backlog);
* the CPU time per job of the worker processes (all of them) and of the hub.

`--loops asyncio uvloop` runs it once per event loop of the workers (EMP_WORKER_LOOP), in
that order, each on a new hub: `results` is then the first's, `runs` has them all.

Usage: python -m benchmarks.worker [--workers 20] [--jobs 10000] [--loops L ...] [--url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

import emp_hub
from benchmarks.hub import cpu_seconds, hubs, percentiles
from emp_hub.embedded import redis_url_or_embedded


def start_worker(url: str, worker_id: str, tmp: Path, **settings: str) -> subprocess.Popen[bytes]:
    """An `emp-worker run` process with the simulation connector, its output appended to
    `tmp/<worker_id>.log`; `settings` are more EMP_* variables."""
    env = {
        **os.environ,
        "EMP_HUB_URL": url.replace("http", "ws", 1),
        "EMP_WORKER_ID": worker_id,
        "EMP_CONNECTORS": "simulation",
        "EMP_PLUGIN_DIR": str(tmp / "plugins"),
        "EMP_LOG_LEVEL": "warning",
        **settings,
    }
    with (tmp / f"{worker_id}.log").open("ab") as log:  # the child keeps its own copy
        return subprocess.Popen(
            [sys.executable, "-m", "emp_worker.cli", "run"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def start_workers(
    url: str, count: int, tmp: Path, loop: str = "auto"
) -> list[subprocess.Popen[bytes]]:
    """`count` emp-worker processes with the simulation connector at zero duration."""
    zero = {
        "EMP_SIMULATION_DURATION": "0",
        "EMP_SIMULATION_STEPS": "1",
        "EMP_WORKER_LOOP": loop,
    }
    return [start_worker(url, f"bench-w{i}", tmp, **zero) for i in range(count)]


async def completed_jobs(http: httpx.AsyncClient, url: str) -> list[dict[str, Any]]:
    """Every completed job, with its result (the API's pages of 500)."""
    jobs: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"status": "completed", "limit": 500, "include": "result"}
        if cursor is not None:
            params["cursor"] = cursor
        page = (await http.get(f"{url}/api/jobs", params=params)).json()
        jobs += page["jobs"]
        cursor = page["next_cursor"]
        if cursor is None:
            return jobs


async def measure(
    url: str, workers: int, jobs: int, tmp: Path, hub_pid: int, loop: str = "auto"
) -> dict[str, Any]:
    """Start the workers, run the jobs, read back their timings."""
    procs = start_workers(url, workers, tmp, loop)
    try:
        async with httpx.AsyncClient(timeout=60) as http:
            deadline = time.monotonic() + 120
            while len((await http.get(f"{url}/api/workers")).json()) < workers:
                if time.monotonic() > deadline:
                    raise RuntimeError("the workers did not all register")
                await asyncio.sleep(0.2)
            batch = [{"job_type": "simulation", "payload": {}} for _ in range(500)]
            pids = [proc.pid for proc in procs]
            workers_cpu0, hub_cpu0 = cpu_seconds(pids), cpu_seconds([hub_pid])
            started = time.perf_counter()
            for i in range(0, jobs, 500):
                response = await http.post(
                    f"{url}/api/jobs/batch", json={"jobs": batch[: jobs - i]}
                )
                response.raise_for_status()
            while True:
                stats = (await http.get(f"{url}/api/queues")).json()
                if stats["pending"] + stats["active"] + stats["delayed"] == 0:
                    break
                await asyncio.sleep(0.05)
            elapsed = time.perf_counter() - started
            workers_cpu = cpu_seconds(pids) - workers_cpu0
            hub_cpu = cpu_seconds([hub_pid]) - hub_cpu0
            done = await completed_jobs(http, url)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)
    overhead = [
        j["finished_at"] - j["claimed_at"] - j["result"]["output"]["elapsed_s"] for j in done
    ]
    return {
        "completed": len(done),
        "seconds": round(elapsed, 2),
        "jobs_per_s": round(len(done) / elapsed),
        "worker_side_overhead": percentiles(overhead),
        "connector_time": percentiles([j["result"]["output"]["elapsed_s"] for j in done]),
        "submit_to_complete": percentiles([j["finished_at"] - j["created_at"] for j in done]),
        "workers_cpu_ms_per_job": round(1000 * workers_cpu / len(done), 3),
        "hub_cpu_ms_per_job": round(1000 * hub_cpu / len(done), 3),
    }


async def run(
    redis_url: str, workers: int, jobs: int, loops: list[str] | None = None
) -> dict[str, Any]:
    """The whole benchmark, in its own namespace (one per loop)."""
    runs = []
    for loop in loops or ["auto"]:
        with tempfile.TemporaryDirectory() as tmp:
            namespace = f"bench-worker-{loop}-{os.getpid()}"
            async with hubs(redis_url, 1, namespace) as running:
                hub = running[0]
                measured = await measure(hub.url, workers, jobs, Path(tmp), hub.pid, loop)
                runs.append({"worker_loop": loop, **measured})
    report: dict[str, Any] = {
        "conditions": {
            "version": emp_hub.__version__,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "workers": workers,
            "jobs": jobs,
            "worker": "emp-worker run processes, simulation connector, duration 0, 1 slot",
            "hub": "one emp-hub serve process",
            "submit": "HTTP batches of 500",
            "worker_loops": loops or ["auto"],
        },
        "results": runs[0],
    }
    if loops:
        report["runs"] = runs
    return report


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--url", help="Redis URL (default: an embedded Valkey in a temp dir)")
    parser.add_argument(
        "--loops",
        nargs="+",
        choices=["auto", "uvloop", "asyncio"],
        help="one run per worker event loop (EMP_WORKER_LOOP; default: one run, auto)",
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, redis_url_or_embedded(args.url, Path(tmp)) as url:
        report = asyncio.run(run(url, args.workers, args.jobs, args.loops))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
