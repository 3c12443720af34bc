"""The dashboard under load. Prints JSON.

A real `emp-hub serve` process on one Redis, open (no token: the dashboard signs in as
admin). N workers are registered straight through the broker API with varied capabilities
(not N sockets), and M jobs are submitted over HTTP in batches of 1,000 (they stay pending:
no registered worker claims; some are of services no worker offers, so unschedulable), and
a few hundred are failed through the broker (the dead-letter page). We measure

* time to first render of each page in headless chromium (Debian's; EMP_TEST_CHROMIUM for
  another): from navigation to `main[data-ready]` (the page has rendered its data), a fresh
  tab each time, the median of --renders runs;
* the hub process's CPU seconds per wall second during a submit load (a target of
  --rate jobs/s, in batches every 100 ms, of a service that 20 protocol workers in this
  process complete at once, so each job has events), first with no dashboard open, then
  with one open on the overview (its live feed, GET /api/dashboard/feed), then on the
  workers page, then with a plain monitor WebSocket client (the original protocol) in this
  process instead; with the rate the load reached. Per second of load, and per job from
  the load's start until every job is done and the live channel has gone quiet: how many
  `changes` events (or monitor messages) came during the load, how many after it, and how
  long after the load's end the last one came.

Usage: python -m benchmarks.dashboard [--quick] [--workers N] [--jobs N] [--rate N]
       [--window S] [--url REDIS_URL]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import websockets
from playwright.async_api import Browser, Page, async_playwright

import emp_hub
from benchmarks.hub import Workers, hubs, start_workers
from emp_hub.broker import Broker, BrokerSettings, JobSpec, connect
from emp_hub.embedded import redis_url_or_embedded
from emp_protocol.capabilities import GPU, WorkerCapabilities

SERVICES = ("sdxl", "flux", "comfyui", "whisper", "llm")
PAGES = {
    "overview": "#/overview",
    "queues": "#/queues",
    "workers": "#/workers",
    "jobs": "#/jobs",
    "job": None,  # a job's page: filled in with a job id
    "dead": "#/dead",
    "alerts": "#/alerts",
}
CHROMIUM = os.environ.get("EMP_TEST_CHROMIUM", "/usr/bin/chromium")


def capabilities(i: int) -> WorkerCapabilities:
    """Varied capabilities: a few distinct sets, as a real fleet has."""
    service = SERVICES[i % 4]  # no worker offers "llm": its jobs are unschedulable
    return WorkerCapabilities(
        services={service, "noop"} if i % 10 == 0 else {service},
        models={service: frozenset({f"{service}-v{i % 3}"})},
        gpus=(GPU(name="H100", memory_gb=80),) * (1 + i % 4),
        cpu_cores=16,
        ram_gb=128,
    )


async def register(broker: Broker, count: int) -> list[str]:
    ids = [f"bench-dash-{i}" for i in range(count)]
    for start in range(0, count, 200):
        chunk = range(start, min(count, start + 200))
        await asyncio.gather(*(broker.register_worker(ids[i], capabilities(i)) for i in chunk))
    return ids


async def keep_alive(broker: Broker, ids: list[str], stop: asyncio.Event) -> None:
    """Heartbeats for the registered workers, every 20 s (their TTL is 60 s)."""
    while not stop.is_set():
        async with broker.redis.pipeline(transaction=False) as pipe:
            now = time.time()
            pipe.zadd(broker.key("workers"), dict.fromkeys(ids, now), xx=True)
            for worker_id in ids:
                pipe.expire(broker.key("worker", worker_id), 61)
            await pipe.execute()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 20)


async def submit_backlog(url: str, jobs: int) -> float:
    """Submit `jobs` pending jobs in batches of 1,000; returns the seconds it took."""
    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=120) as http:
        for i in range(0, jobs, 1000):
            batch = [
                {"job_type": SERVICES[(i + k) % 5], "priority": k % 3, "customer": f"c{k % 7}"}
                for k in range(min(1000, jobs - i))
            ]
            r = await http.post(f"{url}/api/jobs/batch", json={"jobs": batch})
            r.raise_for_status()
    return time.perf_counter() - start


async def dead_letters(broker: Broker, count: int) -> list[str]:
    """`count` jobs failed for good, through the broker."""
    caps = WorkerCapabilities(services={"doomed"})
    await broker.register_worker("bench-dash-doomed", caps)
    ids = []
    for _ in range(count):
        ids.append((await broker.submit(JobSpec(service="doomed"))).id)
        claim = await broker.claim("bench-dash-doomed", caps)
        assert claim is not None
        await broker.fail(claim.job.id, claim.token, "boom", retryable=False)
    await broker.unregister_worker("bench-dash-doomed")
    return ids


async def first_render(browser: Browser, url: str, route: str, name: str, runs: int) -> float:
    """Median milliseconds from navigation to data-ready, a fresh tab each run."""
    times = []
    for _ in range(runs):
        page = await browser.new_page()
        page.set_default_timeout(120_000)
        start = time.perf_counter()
        await page.goto(f"{url}/dashboard/{route}")
        await page.wait_for_selector(f"main[data-ready='{name}']")
        times.append((time.perf_counter() - start) * 1000)
        await page.close()
    return round(statistics.median(times), 1)


def cpu_seconds(pid: int) -> float:
    """The process's user and system CPU seconds (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(url: str, rate: int, window: float) -> tuple[int, float]:
    """Submit `rate` jobs/s of "noop" for `window` seconds: the jobs and the seconds."""
    per_tick = max(1, rate // 10)
    batch = {"jobs": [{"job_type": "noop"} for _ in range(per_tick)]}
    submitted = 0
    async with httpx.AsyncClient(timeout=60) as http:
        start = time.perf_counter()
        tick = start
        while time.perf_counter() - start < window:
            (await http.post(f"{url}/api/jobs/batch", json=batch)).raise_for_status()
            submitted += per_tick
            tick += 0.1
            await asyncio.sleep(max(0.0, tick - time.perf_counter()))
    return submitted, time.perf_counter() - start


class MonitorClient:
    """A plain monitor WebSocket client (the original protocol): counts the job and worker
    messages it gets (not the stats every 2 s)."""

    def __init__(self, url: str) -> None:
        self.url = url.replace("http", "ws", 1) + "/ws/monitor/bench-monitor"
        self.messages = 0
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> MonitorClient:
        self.conn = await websockets.connect(self.url, max_size=None)
        json.loads(await self.conn.recv())  # connection_established
        self.task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        async for raw in self.conn:
            if json.loads(raw).get("type") != "stats_broadcast":
                self.messages += 1

    async def __aexit__(self, *exc: object) -> None:
        await self.conn.close()
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


async def live_count(live: Page | MonitorClient) -> dict[str, int]:
    """The live channel's counts now: `live` (changes events, or monitor messages), and
    for a dashboard the job `events` they counted and its `repaints`."""
    if isinstance(live, MonitorClient):
        return {"live": live.messages}
    counts = await live.evaluate("() => window.empDashboard.counts()")
    return {"live": counts["changes"], "events": counts["events"], "repaints": counts["flushes"]}


async def settled(
    pool: Workers, done: int, live: Page | MonitorClient | None, before: dict[str, int]
) -> dict[str, Any]:
    """Wait until the workers have completed `done` jobs (their `expected`) and the live
    channel has gone quiet (2 s with nothing new), up to 120 s. What it said during the
    load (since `before`) and after it, when the last of it came, and when the workers
    had done the last job (the jobs, not only their news, can run behind the load)."""
    ended = time.perf_counter()
    if live is None:
        if pool.done < done:
            pool.all_done.clear()  # set again by the job that makes `expected`
            await asyncio.wait_for(pool.all_done.wait(), 120)
        return {}
    during = await live_count(live)
    last, seen = ended, during["live"]
    jobs_done = ended if pool.done >= done else None
    while (jobs_done is None or time.perf_counter() - last < 2) and (
        time.perf_counter() - ended < 120
    ):
        await asyncio.sleep(0.1)
        if jobs_done is None and pool.done >= done:
            jobs_done = time.perf_counter()
        now = (await live_count(live))["live"]
        if now > seen:
            seen, last = now, time.perf_counter()
    after = await live_count(live)
    figures = {
        "live_during_load": during["live"] - before["live"],
        "live_after_load": seen - during["live"],
        "last_live_after_load_s": round(last - ended, 1),
        # The workers' last job done: the live channel has news until then.
        "jobs_done_after_load_s": round((jobs_done or last) - ended, 1),
    }
    if "events" in during:
        figures["job_events_during_load"] = during["events"] - before["events"]
        figures["job_events_after_load"] = after["events"] - during["events"]
        figures["repaints"] = after["repaints"] - before["repaints"]
    return figures


async def phase(
    url: str,
    pid: int,
    args: argparse.Namespace,
    pool: Workers,
    live: Page | MonitorClient | None,
) -> dict[str, Any]:
    """One load phase: the hub's CPU per second of load, and per job until all is done."""
    before = await live_count(live) if live is not None else {}
    cpu0 = cpu_seconds(pid)
    submitted, seconds = await load(url, args.rate, args.window)
    cpu_load = cpu_seconds(pid) - cpu0
    pool.expected += submitted
    figures = await settled(pool, pool.expected, live, before)
    cpu_all = cpu_seconds(pid) - cpu0
    return {
        "seconds": round(seconds, 2),
        "jobs_per_s": round(submitted / seconds),
        "hub_cpu_s_per_s": round(cpu_load / seconds, 3),
        "hub_cpu_ms_per_job_until_settled": round(1000 * cpu_all / submitted, 3),
        **figures,
    }


async def run(redis_url: str, args: argparse.Namespace) -> dict[str, Any]:
    namespace = f"bench-dashboard-{os.getpid()}"
    stop = asyncio.Event()
    async with hubs(redis_url, 1, namespace) as [hub]:
        client = connect(redis_url)
        broker = Broker(client, BrokerSettings(namespace=namespace))
        ids = await register(broker, args.workers)
        beats = asyncio.create_task(keep_alive(broker, ids, stop))
        backlog_s = await submit_backlog(hub.url, args.jobs)
        dead = await dead_letters(broker, args.dead)
        print("set up", file=sys.stderr)
        try:
            async with async_playwright() as pw:
                browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True)
                renders = {}
                for name, route in PAGES.items():
                    route = route or f"#/jobs/{dead[0]}"
                    renders[name] = await first_render(browser, hub.url, route, name, args.renders)
                print("renders done", file=sys.stderr)
                pool, tasks = await start_workers([hub.url], 20)
                pool.expected = 0
                cpu = {"no_dashboard": await phase(hub.url, hub.pid, args, pool, None)}
                for name in ("overview", "workers"):
                    page = await browser.new_page()
                    await page.goto(f"{hub.url}/dashboard/{PAGES[name]}")
                    await page.wait_for_selector(f"main[data-ready='{name}']", timeout=120_000)
                    await page.wait_for_selector("#live-state[data-state='live']")
                    cpu[f"dashboard_on_{name}"] = await phase(hub.url, hub.pid, args, pool, page)
                    await page.close()
                async with MonitorClient(hub.url) as monitor:
                    cpu["monitor_client"] = await phase(hub.url, hub.pid, args, pool, monitor)
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await browser.close()
        finally:
            stop.set()
            await beats
            await client.aclose()
    return {
        "conditions": {
            "version": emp_hub.__version__,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "registered_workers": args.workers,
            "pending_jobs": args.jobs,
            "dead_jobs": args.dead,
            "backlog_submit_s": round(backlog_s, 1),
            "target_rate_jobs_per_s": args.rate,
            "window_s": args.window,
            "renders_per_page": args.renders,
            "load": "HTTP batches every 100 ms of a service that 20 protocol workers in "
            "this process complete at once; the hub, the load and chromium share the CPUs",
        },
        "first_render_ms": renders,
        "hub_cpu": cpu,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small numbers, under a minute")
    parser.add_argument("--workers", type=int, default=5_000)
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--dead", type=int, default=300)
    parser.add_argument("--rate", type=int, default=1_000, help="target jobs/s of the load")
    parser.add_argument("--window", type=float, default=15, help="seconds of each load phase")
    parser.add_argument("--renders", type=int, default=3, help="runs per page (median)")
    parser.add_argument("--url", help="Redis URL (default: an embedded Valkey in a temp dir)")
    args = parser.parse_args(argv)
    if args.quick:
        args.workers, args.jobs, args.dead = 200, 2_000, 20
        args.rate, args.window, args.renders = 200, 3.0, 1
    with tempfile.TemporaryDirectory() as tmp, redis_url_or_embedded(args.url, Path(tmp)) as url:
        report = asyncio.run(run(url, args))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
