"""A short demo of the broker: an embedded Valkey, a mix of jobs, three simulated workers.

Run it with `scripts/demo.sh` (or `emp-broker-demo` once installed). It shows live what
each job is doing, then a table of who ran what, in which order, and how long it took.
Ctrl-C stops it cleanly at any point.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console, RenderableType
from rich.live import Live
from rich.table import Table

from emp_hub.broker import (
    Broker,
    BrokerSettings,
    JobSpec,
    JobStatus,
    RequirementsSpec,
    StaleLease,
    connect,
)
from emp_hub.embedded import redis_url_or_embedded
from emp_protocol.capabilities import GPU, CustomerAccess, Isolation, WorkerCapabilities

WORKERS: dict[str, WorkerCapabilities] = {
    "gpu-big": WorkerCapabilities(
        services={"comfyui", "sim"},
        models={"comfyui": {"sdxl", "flux"}},
        gpus=(GPU(name="RTX 4090", memory_gb=24),),
    ),
    "gpu-small": WorkerCapabilities(
        services={"comfyui", "sim"},
        models={"comfyui": {"sdxl"}},
        gpus=(GPU(name="RTX 3060", memory_gb=12),),
    ),
    "acme-only": WorkerCapabilities(
        services={"sim"},
        customer_access=CustomerAccess(isolation=Isolation.STRICT, allowed={"acme"}),
    ),
}


def demo_jobs() -> list[JobSpec]:
    """The mix: priorities, requirements, a strict customer, a flaky one, a doomed one."""
    flux = RequirementsSpec(models=["flux"], gpu_memory_gb=20)
    strict = RequirementsSpec(isolation=Isolation.STRICT)
    return [
        JobSpec(id="sim-low", service="sim", priority=0, payload={"steps": 4}),
        JobSpec(id="sim-high", service="sim", priority=10, payload={"steps": 4}),
        JobSpec(
            id="sdxl-1",
            service="comfyui",
            priority=5,
            payload={"steps": 5},
            requirements=RequirementsSpec(models=["sdxl"]),
        ),
        JobSpec(
            id="flux-24gb", service="comfyui", priority=5, payload={"steps": 6}, requirements=flux
        ),
        JobSpec(
            id="acme-private",
            service="sim",
            customer="acme",
            priority=1,
            payload={"steps": 3},
            requirements=strict,
        ),
        JobSpec(id="flaky", service="sim", priority=3, payload={"steps": 3, "fail_once": True}),
        JobSpec(id="cancel-me", service="sim", priority=2, payload={"steps": 30}),
        JobSpec(id="crash-victim", service="sim", priority=4, payload={"steps": 3, "crash": True}),
        JobSpec(id="sim-mid", service="sim", priority=5, payload={"steps": 3}),
        JobSpec(
            id="sdxl-2",
            service="comfyui",
            priority=0,
            payload={"steps": 4},
            requirements=RequirementsSpec(models=["sdxl"]),
        ),
        JobSpec(id="nobody-can", service="a1111", priority=9, payload={}),
    ]


@dataclass
class Record:
    """What the demo saw of one job."""

    runs: list[str] = field(default_factory=list)
    order: list[int] = field(default_factory=list)
    started: float | None = None
    finished: float | None = None


@dataclass
class Demo:
    broker: Broker
    console: Console
    records: dict[str, Record] = field(default_factory=dict)
    claims: int = 0
    crashed: set[str] = field(default_factory=set)
    failed_once: set[str] = field(default_factory=set)

    async def worker(self, name: str, caps: WorkerCapabilities, stop: asyncio.Event) -> None:
        """A simulated worker: claim, report progress, complete (or misbehave on purpose)."""
        await self.broker.register_worker(name, caps)
        while not stop.is_set():
            claim = await self.broker.claim(name, caps)
            if claim is None:
                await asyncio.sleep(0.1)
                continue
            job = claim.job
            self.claims += 1
            rec = self.records.setdefault(job.id, Record())
            rec.runs.append(name)
            rec.order.append(self.claims)
            rec.started = rec.started or time.time()
            if job.payload.get("crash") and job.id not in self.crashed:
                self.crashed.add(job.id)  # this worker "dies" holding the job
                self.console.log(f"[red]{name} crashed while running {job.id}[/]")
                await asyncio.sleep(3)
                continue
            try:
                steps = int(job.payload.get("steps", 3))
                for step in range(1, steps + 1):
                    await asyncio.sleep(0.25)
                    await self.broker.progress(
                        job.id, claim.token, 100 * step / steps, f"step {step}/{steps}"
                    )
                if job.payload.get("fail_once") and job.id not in self.failed_once:
                    self.failed_once.add(job.id)
                    await self.broker.fail(job.id, claim.token, f"{name}: CUDA out of memory")
                    continue
                await self.broker.complete(job.id, claim.token, {"by": name})
                rec.finished = time.time()
            except StaleLease:
                self.console.log(f"[yellow]{name} stopped {job.id}: it was cancelled[/]")

    async def janitor(self, stop: asyncio.Event) -> None:
        """What every hub replica runs: requeue lost jobs, promote due retries."""
        while not stop.is_set():
            report = await self.broker.maintain()
            for job_id in report.requeued:
                self.console.log(f"[magenta]lease of {job_id} expired: requeued in place[/]")
            await asyncio.sleep(0.2)

    async def table(self) -> Table:
        table = Table(title="jobs", expand=False)
        for col in ("job", "service", "prio", "status", "progress", "worker(s)", "attempts"):
            table.add_column(col)
        for spec in demo_jobs():
            assert spec.id is not None
            job = await self.broker.get(spec.id)
            rec = self.records.get(spec.id, Record())
            table.add_row(
                job.id,
                job.service,
                str(job.priority),
                _status(job.status),
                f"{job.progress:.0f}%",
                ", ".join(rec.runs) or "-",
                f"{job.attempt} (failed {job.failures}, lost {job.orphans})",
            )
        return table


@contextmanager
def live_view(console: Console, first: RenderableType | None = None) -> Iterator[Live]:
    """A rich `Live` display that, when it stops (even on Ctrl-C), ends the line it leaves
    open where the output is not a terminal (rich ends it only on one), so that what is
    printed next starts a line of its own."""
    try:
        with Live(first, console=console, refresh_per_second=8) as live:
            yield live
    finally:
        if not console.is_terminal:
            console.line()


def _status(status: JobStatus) -> str:
    colour = {
        JobStatus.COMPLETED: "green",
        JobStatus.FAILED: "red",
        JobStatus.CANCELLED: "yellow",
        JobStatus.ACTIVE: "cyan",
        JobStatus.DELAYED: "magenta",
    }.get(status, "white")
    return f"[{colour}]{status.value}[/]"


async def run_demo(url: str, console: Console) -> None:
    client = connect(url)
    broker = Broker(
        client,
        BrokerSettings(
            namespace=f"demo-{os.getpid()}",
            lease_s=2,
            retry_base_s=0.5,
            worker_ttl_s=5,
            live_cache_s=0.2,
        ),
    )
    demo = Demo(broker, console)
    stop = asyncio.Event()
    try:
        await broker.submit_many(demo_jobs())
        console.log("submitted 11 jobs; starting 3 workers: " + ", ".join(WORKERS))
        tasks = [asyncio.create_task(demo.worker(n, c, stop)) for n, c in WORKERS.items()]
        tasks.append(asyncio.create_task(demo.janitor(stop)))
        started = time.time()
        with live_view(console, await demo.table()) as live:
            cancelled = False
            while time.time() - started < 30:
                await asyncio.sleep(0.25)
                job = await broker.get("cancel-me")
                if not cancelled and job.status is JobStatus.ACTIVE and job.progress >= 10:
                    await broker.cancel("cancel-me", "the user cancelled it")
                    cancelled = True
                live.update(await demo.table())
                stats = await broker.stats()
                if stats.active == stats.delayed == 0 and stats.pending == stats.unschedulable_jobs:
                    break
        stop.set()
        await asyncio.gather(*tasks)
        await summary(demo, console)
    finally:
        stop.set()
        await client.aclose()


async def summary(demo: Demo, console: Console) -> None:
    table = Table(title="who ran what, in claim order")
    for col in ("#", "job", "priority", "requirements", "ran on", "outcome", "took"):
        table.add_column(col)
    rows = []
    for job_id, rec in demo.records.items():
        job = await demo.broker.get(job_id)
        req = job.requirements
        needs = [f"models={','.join(req.models)}"] if req.models else []
        needs += [f"gpu>={req.gpu_memory_gb:g}GB"] if req.gpu_memory_gb else []
        needs += [f"customer={req.customer} ({req.isolation.value})"] if req.customer else []
        took = f"{rec.finished - rec.started:.1f} s" if rec.finished and rec.started else "-"
        rows.append((rec.order[0], job, " ".join(needs) or "-", " -> ".join(rec.runs), took))
    for first, job, need, runs, took in sorted(rows, key=lambda r: r[0]):
        table.add_row(str(first), job.id, str(job.priority), need, runs, _status(job.status), took)
    console.print(table)
    stats = await demo.broker.stats()
    for c in stats.classes:
        if c.unschedulable:
            console.print(
                f"[red]unschedulable[/]: {c.pending} job(s) of service "
                f"{c.requirements.service!r}: no live worker can run them"
            )


def main(argv: list[str] | None = None) -> None:
    """Entry point of emp-broker-demo."""
    parser = argparse.ArgumentParser(
        description="Demo of the emp broker: jobs, matching, priorities, retries, cancel.",
        epilog="Uses an embedded Valkey unless --redis-url (or EMP_REDIS_URL) is given.",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("EMP_REDIS_URL"),
        help="Redis/Valkey to use (the demo works in its own key namespace)",
    )
    args = parser.parse_args(argv)
    console = Console()
    try:
        with (
            tempfile.TemporaryDirectory() as tmp,
            redis_url_or_embedded(args.redis_url, Path(tmp)) as url,
        ):
            console.log(f"Redis at {url}" if args.redis_url else f"embedded Valkey at {url}")
            asyncio.run(run_demo(url, console))
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: stopped the workers and the server[/]")


if __name__ == "__main__":
    main()
