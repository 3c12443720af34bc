"""What many one-off requirement classes cost, before and after they are collected.
Prints JSON.

N jobs are submitted, each with a tag no other job has (so each is its own requirement
class), then drained: claimed and completed. A hub runs in this process (uvicorn, its own
maintenance turned off: the benchmark runs `maintain()` itself); a few workers with four
distinct capability sets are registered, as live. At each stage (pending, drained,
collected) we measure:

* `GET /api/queues` and `GET /metrics` through the hub: the first request after the class
  list changed (`first_ms`: the hub re-reads the list and matches the live workers against
  it), then the median of the next ones (`warm_ms`); and the number of `emp_queue_depth`
  series in `/metrics`;
* the broker alone: `stats()` on a fresh Broker (a replica that has not read the class list
  yet), and what a version change of the class list costs every hub process at its next
  claim: `refresh_classes()` plus matching one new capability set against the list;
* the size of the class list.

Collection runs with `class_idle_s=0` (the default waits 600 s); its passes are timed too.
Usage: python benchmarks/classes.py [--quick] [--jobs N] [--url REDIS_URL]
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
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

import emp_hub
from emp_hub.broker import Broker, BrokerSettings, JobSpec, RequirementsSpec, connect
from emp_hub.embedded import redis_url_or_embedded
from emp_hub.settings import HubSettings
from emp_hub.testing import running_hub
from emp_protocol.capabilities import WorkerCapabilities

NAMESPACE = "bench-classes"
BATCH = 1000
WORKERS = {  # live workers: id -> capabilities (four distinct sets)
    f"w{i}": WorkerCapabilities(services={"sim"}, tags={f"pool-{i % 4}"}) for i in range(8)
}
WARM_SAMPLES = 5


async def ms(call: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = await call()
    return round((time.perf_counter() - start) * 1000, 2), result


async def through_hub(http: httpx.AsyncClient, path: str) -> dict[str, Any]:
    """The first request's time, then the median of the next ones."""
    first, response = await ms(lambda: http.get(path))
    response.raise_for_status()
    warm = [(await ms(lambda: http.get(path)))[0] for _ in range(WARM_SAMPLES)]
    figures: dict[str, Any] = {"first_ms": first, "warm_ms": statistics.median(warm)}
    if path == "/metrics":
        lines = response.text.splitlines()
        figures["queue_depth_series"] = sum(x.startswith("emp_queue_depth{") for x in lines)
        figures["bytes"] = len(response.content)
    return figures


async def measure(
    http: httpx.AsyncClient, broker: Broker, settings: BrokerSettings, step: int
) -> dict[str, Any]:
    fresh = Broker(broker.redis, settings)
    stats_ms, _ = await ms(fresh.stats)
    refresh_ms, _ = await ms(fresh.refresh_classes)
    caps = WorkerCapabilities(services={"sim"}, tags={f"new-{step}"})
    start = time.perf_counter()
    fresh.matching_classes(caps)
    matching_ms = round((time.perf_counter() - start) * 1000, 2)
    return {
        "classes": await broker.redis.hlen(broker.key("classes")),
        "api_queues": await through_hub(http, "/api/queues"),
        "metrics": await through_hub(http, "/metrics"),
        "broker_stats_fresh_ms": stats_ms,
        "class_list_change_ms": {"refresh_classes": refresh_ms, "match_one_caps": matching_ms},
    }


async def bump(broker: Broker, step: int) -> None:
    """Change the class list (a job of a new class, cancelled at once), so the hub's next
    request sees a new version, as it does after any new class."""
    job = await broker.submit(
        JobSpec(service="sim", requirements=RequirementsSpec(tags=[f"bump-{step}"]))
    )
    await broker.cancel(job.id)


async def run(url: str, n: int) -> dict[str, Any]:
    settings = BrokerSettings(namespace=NAMESPACE, class_idle_s=0, worker_ttl_s=3600)
    hub_settings = HubSettings(redis_url=url, broker=settings, maintenance_interval_s=3600)
    client = connect(url)
    broker = Broker(client, settings)
    info = await client.info("server")
    server = info.get("valkey_version") and f"valkey {info['valkey_version']}"
    report: dict[str, Any] = {}
    try:
        async with (
            running_hub(hub_settings) as base,
            httpx.AsyncClient(base_url=base, timeout=300) as http,
        ):
            for worker_id, caps in WORKERS.items():
                await broker.register_worker(worker_id, caps)
            tags = [f"once-{i}" for i in range(n)]
            start = time.perf_counter()
            for i in range(0, n, BATCH):
                await broker.submit_many(
                    [
                        JobSpec(service="sim", requirements=RequirementsSpec(tags=[t]))
                        for t in tags[i : i + BATCH]
                    ]
                )
            submit_s = time.perf_counter() - start
            await bump(broker, 0)
            report["pending"] = await measure(http, broker, settings, 0)
            print("pending: measured", file=sys.stderr)

            drainer = WorkerCapabilities(services={"sim"}, tags=set(tags))
            start = time.perf_counter()
            while claims := await broker.claim_many("drainer", drainer, BATCH):
                await asyncio.gather(*(broker.complete(c.job.id, c.token) for c in claims))
            drain_s = time.perf_counter() - start
            await bump(broker, 1)
            report["drained"] = await measure(http, broker, settings, 1)
            print("drained: measured", file=sys.stderr)

            passes: list[float] = []
            collected = 0
            while True:
                took, done = await ms(broker.maintain)
                passes.append(took)
                collected += done.classes_collected
                if not done.classes_collected:
                    break
            report["collection"] = {
                "classes_collected": collected,
                "passes": len(passes),
                "max_pass_ms": max(passes),
                "total_ms": round(sum(passes), 2),
            }
            report["collected"] = await measure(http, broker, settings, 2)
    finally:
        keys = [k async for k in client.scan_iter(match="{" + NAMESPACE + "}:*", count=5000)]
        for i in range(0, len(keys), 5000):
            await client.unlink(*keys[i : i + 5000])
        await client.aclose()
    return {
        "conditions": {
            "jobs": n,
            "classes_submitted": n,
            "live_workers": len(WORKERS),
            "distinct_worker_capabilities": len({c.canonical_json for c in WORKERS.values()}),
            "submit_batch": BATCH,
            "submit_s": round(submit_s, 2),
            "drain_s": round(drain_s, 2),
            "class_idle_s": settings.class_idle_s,
            "maintenance_limit": 1000,
            "server": server or f"redis {info['redis_version']}",
            "version": emp_hub.__version__,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        },
        **report,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2,000 jobs instead of 20,000")
    parser.add_argument("--jobs", type=int, help="jobs (and classes) to submit")
    parser.add_argument("--url", help="Redis URL (default: an embedded Valkey in a temp dir)")
    args = parser.parse_args(argv)
    n = args.jobs or (2_000 if args.quick else 20_000)
    with tempfile.TemporaryDirectory() as tmp, redis_url_or_embedded(args.url, Path(tmp)) as url:
        report = asyncio.run(run(url, n))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
