"""Claim latency against backlog size: our broker versus a scanning broker. Prints JSON.

The backlog of N pending jobs is spread over 100 requirement classes. The claiming worker
matches exactly one class, which holds 1% of the jobs and is last in priority order: the
worst case for a broker that scans its pending set. In the same run we measure

* ours: Broker.claim (one Lua script over the heads of the matching classes' queues);
* scan: the predecessor's way, without its 100-job cap: walk one pending ZSET in priority
  order, 1,000 ids a round trip, fetch each job's requirements, and take the first one
  the worker matches;
* batch submit throughput (jobs/s), and claim+complete throughput of one client.

`--policy` names the scheduling policies to measure ours with (docs/scheduling.md), each
on its own backlog (`all`: the four); `fifo`, today's order, always runs and is "ours":

* `priority`: the `weighted` priority policy with customer tiers (4 customers, one per
  tier), an urgency on every job, a deadline on 1 job in 10 (`keep` at the deadline) and
  aging on; the report adds `promotion_step`: the time of one maintenance promotion pass
  (PROMOTE_LIMIT due steps) with the whole backlog pending;
* `fair`: fair share on, the jobs spread over FAIR_CUSTOMERS customers with weights 1 to 4
  (so the worker's one class becomes one class per customer);
* `affinity`: model-warm affinity on, the worker's class split in 4 by preferred model
  (m0..m3 in turn, the oldest m0), the worker with m1 loaded, so that every claim passes
  an older cold head over for a warm one (the affinity path, with its extra read); each
  claim is checked to have taken a warm job.

Each claimed job is handed back (release / re-add, not timed) so the backlog stays the same
for every sample. Usage:
python benchmarks/claim.py [--quick] [--url redis://...] [--policy fifo priority fair affinity]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Coroutine
from importlib.metadata import version
from pathlib import Path
from typing import Any, cast

import redis.asyncio

import emp_hub
from emp_hub.broker import Broker, BrokerSettings, JobSpec, RequirementsSpec, connect
from emp_hub.broker.settings import AffinitySettings, FairShareSettings
from emp_hub.embedded import redis_url_or_embedded
from emp_hub.scheduling import Scheduler, SchedulingSettings
from emp_protocol.capabilities import JobRequirements, WorkerCapabilities, matches

CLASSES = 100
TARGET_TAG = "t0"  # the class the worker matches; its jobs have the lowest priority
WORKER = WorkerCapabilities(services={"sim"}, tags={TARGET_TAG})
SUBMIT_BATCH = 1000
SUBMIT_INFLIGHT = 2  # batches in flight: one is prepared while the server runs the other
CLAIM_SAMPLES = 1000
#: The policies --policy measures (fifo: today's order, always measured; `all`: the four).
POLICIES = ("fifo", "priority", "fair", "affinity")
#: --policy priority: one customer per tier, and the promotion passes timed.
TIERS = {"c0": "free", "c1": "standard", "c2": "premium", "c3": "enterprise"}
PROMOTE_LIMIT = 1000  # steps per promotion pass (the default)
PROMOTE_SAMPLES = 20  # passes timed, at most (each takes PROMOTE_LIMIT due steps)
#: --policy fair: customers c0..c9, weights 1, 2, 3, 4, 1, 2, ...
FAIR_CUSTOMERS = 10
FAIR_WEIGHTS = {f"c{i}": float(1 + i % 4) for i in range(FAIR_CUSTOMERS)}
#: --policy affinity: the models the worker's jobs prefer, and the one it has loaded.
PREFERRED = ("m0", "m1", "m2", "m3")
WARM = "m1"
LOADED = {"sim": frozenset({WARM})}
#: What each policy turns on (the report's conditions).
SETUPS = {
    "fifo": "today's order (ours)",
    "priority": f"weighted policy, {len(TIERS)} customers (one per tier), an urgency on every "
    "job, a deadline on 1 job in 10 (keep), aging (max_wait_s 3600)",
    "fair": f"fair share, {FAIR_CUSTOMERS} customers with weights 1 to 4 (the worker's class: "
    f"{FAIR_CUSTOMERS} classes)",
    "affinity": f"model-warm affinity, the worker's class split by {len(PREFERRED)} preferred "
    f"models ({CLASSES + len(PREFERRED) - 1} classes), {WARM} loaded: each claim takes a warm job",
}


class BenchClock:
    """The broker's clock: the real time, plus a shift the benchmark sets."""

    def __init__(self) -> None:
        self.shift = 0.0

    def __call__(self) -> float:
        return time.time() + self.shift


def make_broker(client: redis.asyncio.Redis, namespace: str, policy: str) -> Broker:
    """Our broker with `policy` on (affinity: never aged out during the run)."""
    scheduler = Scheduler()
    if policy == "priority":
        scheduler = Scheduler.from_settings(
            SchedulingSettings(
                policy="weighted",
                tiers=TIERS,
                max_wait_s=3600,
                deadline_action="keep",
                promote_limit=PROMOTE_LIMIT,
            )
        )
    return Broker(
        client,
        BrokerSettings(namespace=namespace),
        clock=BenchClock(),
        scheduler=scheduler,
        affinity=AffinitySettings(enabled=policy == "affinity", max_wait_s=1e9),
        fair_share=FairShareSettings(enabled=policy == "fair", weights=FAIR_WEIGHTS),
    )


def spec_of(i: int, cls: int, priority: int, policy: str, nth: int = 0) -> JobSpec:
    """The backlog's job i under `policy` (module docstring: what each policy adds); `nth`:
    its rank among the worker's class's jobs (affinity: they prefer m0..m3 in turn, so the
    oldest is cold to the worker, whatever the backlog's size)."""
    if policy == "priority":
        return JobSpec(
            service="sim",
            priority=priority,
            requirements=requirements(cls),
            customer=f"c{i % len(TIERS)}",
            urgency=("low", "normal", "high", "critical")[i % 4],
            deadline_in_s=600 + 60 * (i % 60) if i % 10 == 0 else None,
        )
    if policy == "fair":
        customer = f"c{i % FAIR_CUSTOMERS}"
        return JobSpec(
            service="sim", priority=priority, requirements=requirements(cls), customer=customer
        )
    prefer = PREFERRED[nth % len(PREFERRED)] if policy == "affinity" and cls == 0 else None
    return JobSpec(service="sim", priority=priority, requirements=requirements(cls, prefer))


def job_plan(n: int, seed: int = 7) -> list[tuple[int, int]]:
    """(class index, priority) per job: 1% in class 0 at priority 0, the rest above it."""
    rnd = random.Random(seed)
    target = max(1, n // 100)
    plan = [(0, 0)] * target + [
        (rnd.randrange(1, CLASSES), rnd.randrange(1, 11)) for _ in range(n - target)
    ]
    rnd.shuffle(plan)
    return plan


def requirements(cls: int, prefer: str | None = None) -> RequirementsSpec:
    return RequirementsSpec(tags=[f"t{cls}"], prefer_model=prefer)


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {
        "p50_ms": round(statistics.median(ordered) * 1000, 3),
        "p99_ms": round(pick(0.99) * 1000, 3),
        "samples": len(ordered),
    }


async def fill_ours(broker: Broker, plan: list[tuple[int, int]], policy: str) -> float:
    """Submit the backlog in batches, SUBMIT_INFLIGHT batches at a time; returns seconds."""
    specs = []
    nth = 0  # jobs of the worker's class so far
    for i, (cls, priority) in enumerate(plan):
        specs.append(spec_of(i, cls, priority, policy, nth))
        nth += cls == 0
    batches = [specs[i : i + SUBMIT_BATCH] for i in range(0, len(specs), SUBMIT_BATCH)]

    async def submitter(k: int) -> None:
        for batch in batches[k::SUBMIT_INFLIGHT]:
            await broker.submit_many(batch)

    start = time.perf_counter()
    await asyncio.gather(*(submitter(k) for k in range(SUBMIT_INFLIGHT)))
    return time.perf_counter() - start


async def promotion_passes(broker: Broker, n: int) -> dict[str, float]:
    """Time promotion passes with every job's aging step due: PROMOTE_LIMIT steps each."""
    clock = cast(BenchClock, broker.clock)
    clock.shift = 7200  # past max_wait_s and every deadline
    out = []
    for _ in range(min(PROMOTE_SAMPLES, max(1, n // PROMOTE_LIMIT))):
        start = time.perf_counter()
        steps, _ = await broker.apply_promotions()
        out.append(time.perf_counter() - start)
        assert steps == PROMOTE_LIMIT or n < PROMOTE_LIMIT
    clock.shift = 0
    return {**percentiles(out), "steps_per_pass": PROMOTE_LIMIT}


async def claim_ours(broker: Broker, samples: int) -> list[float]:
    out = []
    for _ in range(samples):
        start = time.perf_counter()
        claim = await broker.claim("bench-worker", WORKER, loaded=LOADED)
        out.append(time.perf_counter() - start)
        assert claim is not None and claim.job.requirements.tags == (TARGET_TAG,)
        if broker.affinity.enabled:  # the warm job, though an older cold one waits
            assert claim.job.requirements.prefer_model == WARM
        await broker.release(claim.job.id, claim.token)
    return out


class ScanBroker:
    """The baseline: one pending ZSET in priority order, scanned until a job matches."""

    def __init__(self, client: redis.asyncio.Redis, prefix: str) -> None:
        self.r = client
        self.queue = prefix + "pending"
        self.prefix = prefix
        self.parsed: dict[str, JobRequirements] = {}  # parse each distinct JSON once

    async def fill(self, plan: list[tuple[int, int]]) -> None:
        reqs = [
            JobRequirements(service="sim", tags=(f"t{c}",)).model_dump_json()
            for c in range(CLASSES)
        ]
        for start in range(0, len(plan), 5000):
            async with self.r.pipeline(transaction=False) as pipe:
                for i in range(start, min(start + 5000, len(plan))):
                    cls, prio = plan[i]
                    job_id = f"j{i}"
                    pipe.hset(self.prefix + job_id, mapping={"req": reqs[cls], "status": "pending"})
                    pipe.zadd(self.queue, {job_id: (10 - prio) * 10**9 + i})
                await pipe.execute()

    async def claim(self, caps: WorkerCapabilities) -> tuple[str, float] | None:
        offset = 0
        while True:
            ids = cast(
                list[tuple[str, float]],
                await self.r.zrange(self.queue, offset, offset + 999, withscores=True),
            )
            if not ids:
                return None
            async with self.r.pipeline(transaction=False) as pipe:
                for job_id, _ in ids:
                    pipe.hget(self.prefix + job_id, "req")
                reqs = await pipe.execute()
            for (job_id, score), raw in zip(ids, reqs, strict=True):
                req = self.parsed.get(raw) or self.parsed.setdefault(
                    raw, JobRequirements.model_validate_json(raw)
                )
                if matches(req, caps) and await self.r.zrem(self.queue, job_id):
                    await self.r.hset(self.prefix + job_id, "status", "active")
                    return job_id, score
            offset += len(ids)

    async def release(self, job_id: str, score: float) -> None:
        await self.r.zadd(self.queue, {job_id: score})
        await self.r.hset(self.prefix + job_id, "status", "pending")


async def claim_scan(scan: ScanBroker, samples: int) -> list[float]:
    out = []
    for _ in range(samples):
        start = time.perf_counter()
        got = await scan.claim(WORKER)
        out.append(time.perf_counter() - start)
        assert got is not None
        await scan.release(*got)
    return out


async def claim_complete_rate(client: redis.asyncio.Redis, jobs: int, concurrency: int) -> float:
    broker = Broker(client, BrokerSettings(namespace="bench-cc"))
    caps = WorkerCapabilities(services={"sim"})
    specs = [JobSpec(service="sim", payload={"i": i}) for i in range(jobs)]
    for i in range(0, jobs, SUBMIT_BATCH):
        await broker.submit_many(specs[i : i + SUBMIT_BATCH])
    done = 0
    start = time.perf_counter()
    # One client with `concurrency` slots: it asks for work for its free slots, like a worker.
    while claims := await broker.claim_many("bench-worker", caps, concurrency):
        await asyncio.gather(*(broker.complete(c.job.id, c.token, {"ok": True}) for c in claims))
        done += len(claims)
    elapsed = time.perf_counter() - start
    assert done == jobs
    return jobs / elapsed


async def drop(client: redis.asyncio.Redis, pattern: str) -> None:
    batch: list[str] = []
    async for key in client.scan_iter(match=pattern, count=5000):
        batch.append(key)
        if len(batch) >= 5000:
            await client.unlink(*batch)
            batch = []
    if batch:
        await client.unlink(*batch)


async def measure(
    client: redis.asyncio.Redis, plan: list[tuple[int, int]], policy: str
) -> tuple[float, dict[str, Any]]:
    """Fill a backlog with `policy` on and time our claims over it (and, for `priority`,
    promotion passes); then drop it. Returns the fill's seconds and the figures."""
    n = len(plan)
    ours = make_broker(client, f"bench-{n}", policy)
    took = await fill_ours(ours, plan, policy)
    measured: dict[str, Any] = percentiles(await claim_ours(ours, CLAIM_SAMPLES))
    if policy == "priority":
        measured["promotion_step"] = await promotion_passes(ours, n)
    await drop(client, f"{{bench-{n}}}:*")
    return took, measured


async def run(
    url: str, sizes: list[int], cc_jobs: int, concurrency: int, policies: list[str]
) -> dict[str, Any]:
    client = connect(url)
    info = await client.info("server")
    server = (
        f"valkey {info['valkey_version']}"
        if "valkey_version" in info
        else f"redis {info['redis_version']}"
    )
    persistence = await client.config_get("appendonly")
    results = []
    submitted = 0
    submit_seconds = 0.0
    try:
        for n in sizes:
            plan = job_plan(n)
            measured: dict[str, Any] = {}
            fill: dict[str, int] = {}
            for policy in policies:
                took, measured[policy] = await measure(client, plan, policy)
                fill[policy] = round(n / took)
                if policy == "fifo":  # the plain submit
                    submitted += n
                    submit_seconds += took

            scan = ScanBroker(client, f"{{scan-{n}}}:")
            await scan.fill(plan)
            scan_samples = await claim_scan(scan, max(5, min(100, 200_000 // n)))
            await drop(client, f"{{scan-{n}}}:*")
            results.append(
                {
                    "backlog": n,
                    "fill_jobs_per_s": fill["fifo"],
                    "ours": measured["fifo"],
                    "policies": measured,
                    "fill_by_policy": fill,
                    "scan": percentiles(scan_samples),
                }
            )
            print(f"backlog {n}: done", file=sys.stderr)
        rate = await claim_complete_rate(client, cc_jobs, concurrency)
        await drop(client, "{bench-cc}:*")
    finally:
        await client.aclose()
    return {
        "conditions": {
            "classes": CLASSES,
            "worker_matches": "1 class holding 1% of the jobs, lowest priority",
            "server": server,
            "server_appendonly": persistence.get("appendonly"),
            "version": emp_hub.__version__,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "submit_batch": SUBMIT_BATCH,
            "submit_batches_in_flight": SUBMIT_INFLIGHT,
            "claim_complete_jobs": cc_jobs,
            "claim_complete_concurrency": concurrency,
            "policies": policies,
            "policy_setup": {p: SETUPS[p] for p in policies},
            **({"fair_customers": FAIR_CUSTOMERS} if "fair" in policies else {}),
        },
        "results": results,
        "submit_jobs_per_s": round(submitted / submit_seconds),
        "claim_complete_per_s": round(rate),
    }


def run_loop(coro: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    """Run on uvloop where installed (as the hub does under uvicorn), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        report = asyncio.run(coro)
        report["conditions"]["event_loop"] = "asyncio"
        return report
    report = uvloop.run(coro)
    report["conditions"]["event_loop"] = f"uvloop {version('uvloop')}"
    return report


def policies_of(names: list[str]) -> list[str]:
    """The policies to measure, in POLICIES order: fifo always, `all` for the four."""
    return [p for p in POLICIES if p == "fifo" or p in names or "all" in names]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (main's)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only N = 1,000 and 100,000")
    parser.add_argument("--sizes", type=int, nargs="+", help="backlog sizes to measure")
    parser.add_argument("--url", help="Redis URL (default: an embedded Valkey in a temp dir)")
    parser.add_argument("--cc-jobs", type=int, default=20_000, help="jobs for claim+complete")
    parser.add_argument("--concurrency", type=int, default=8, help="claim+complete tasks")
    parser.add_argument(
        "--policy",
        nargs="+",
        choices=[*POLICIES, "all"],
        default=["fifo"],
        help="scheduling policies to measure, each on its own backlog (fifo, today's order, "
        "always runs; all: the four)",
    )
    args = parser.parse_args(argv)
    args.policy = policies_of(args.policy)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sizes = args.sizes or ([1_000, 100_000] if args.quick else [1_000, 100_000, 1_000_000])
    with tempfile.TemporaryDirectory() as tmp, redis_url_or_embedded(args.url, Path(tmp)) as url:
        report = run_loop(run(url, sizes, args.cc_jobs, args.concurrency, args.policy))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
