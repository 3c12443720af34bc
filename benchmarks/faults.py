"""Jobs under faults: is any accepted job lost, or completed twice? Prints JSON.

One `emp-hub serve` process on an embedded Valkey (or --url) and N `emp-worker run`
processes (simulation connector, short jobs in a few steps, progress on). J jobs are
submitted one by one over HTTP, spread over a chaos phase of --chaos-s seconds. Each has
an id chosen here and the same idempotency key, and a submit that got no answer (the hub
was down) is sent again. Meanwhile a seeded random loop, every --interval seconds on
average, does one of these to a random worker not already under a fault:

* `kill9`: SIGKILL, then a new process with the same worker id;
* `term`: SIGTERM (it drains: finishes its job, hands back the rest, exits 0), then a new
  process;
* `stop`: SIGSTOP for 0.5 s up to the lease + 2 s, then SIGCONT (past the lease, its job
  is requeued and runs elsewhere; its late result must be refused);

and with --hub-kills, `hub_kill9`: SIGKILL the hub, then start it again on the same Redis
and port (workers reconnect and announce the jobs they hold).

The seed fixes the random draws (gaps, kinds, workers, durations); what they meet depends
on timing. When the chaos ends every worker is brought back (stopped ones continued, exited
ones started), and the script waits (at most --settle-s) until every accepted job has
ended. It then reads each job (GET /api/jobs/{id}) and its whole event stream (the SSE at
/api/jobs/{id}/events, which ends at the first terminal status, then resumed after that
event to see whatever came later) and counts:

* accepted: submits answered 200; completed, failed, cancelled: their final status;
* lost: accepted but not ended at the deadline, or unknown to the hub;
* completed_twice: jobs with more than one `completed` status event, or whose result was
  written by another attempt than the one that completed it (the simulation result
  carries its attempt): the fencing token must keep this at 0;
* rerun: jobs claimed more than once (attempt > 1: a worker was lost, stopped past its
  lease, or handed the job back while draining); allowed, delivery is at-least-once;
* orphans: the sum of the jobs' `orphans` (times their worker was lost);
* completed_events, progress_events: in all the streams (completed_events equals
  completed when each completion was recorded once).

Usage: python -m benchmarks.faults [--workers 4] [--jobs 400] [--chaos-s 30]
       [--interval 1] [--seed 1] [--hub-kills] [--grace 1] [--lease 5] [--url REDIS_URL]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import signal
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

import emp_hub
from benchmarks.hub import RunningHub, hubs
from benchmarks.recovery import wait_for
from benchmarks.worker import start_worker
from emp_hub.broker import TERMINAL
from emp_hub.embedded import redis_url_or_embedded

KINDS = ("kill9", "term", "stop")
#: Jobs read back at once (each holds a hub connection while its event stream is read).
READ_CONCURRENCY = 50
#: Reading a job's events past its terminal one: what is there comes at once; a stream
#: silent this long has nothing more (the hub would wait up to 15 s for news).
AFTER_END_READ_S = 2.0
#: What a worker logs (at level info) once connected and registered.
CONNECTED = "connected to "


@dataclass
class Chaos:
    """The worker processes, and the faults done to them."""

    hub: RunningHub
    tmp: Path
    args: argparse.Namespace
    settings: dict[str, str]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    busy: set[str] = field(default_factory=set)  # workers under a fault now
    faults: Counter[str] = field(default_factory=Counter)
    exits: Counter[str] = field(default_factory=Counter)  # unexpected exits, by status
    term_exits: Counter[str] = field(default_factory=Counter)  # exit status after SIGTERM
    connects: dict[str, int] = field(default_factory=dict)  # its log's lines at its start

    def start(self, worker_id: str) -> None:
        """Start (or start again) a worker process."""
        self.connects[worker_id] = self._connects(worker_id)
        self.procs[worker_id] = start_worker(self.hub.url, worker_id, self.tmp, **self.settings)

    def _connects(self, worker_id: str) -> int:
        log = self.tmp / f"{worker_id}.log"
        return log.read_text(errors="replace").count(CONNECTED) if log.exists() else 0

    async def up(self, worker_id: str) -> None:
        """Until the worker's latest process has connected to the hub (its log says so);
        one that exits meanwhile (refused its id: status 2) is started again."""

        async def connected() -> bool:
            proc = self.procs[worker_id]
            if proc.poll() is not None:
                self.exits[str(proc.returncode)] += 1
                self.start(worker_id)
            return self._connects(worker_id) > self.connects[worker_id]

        await wait_for(connected, f"worker {worker_id} to connect", 120)

    async def exited(self, worker_id: str, within: float) -> int | None:
        """Wait (at most `within` s) for the worker process to exit; its status."""
        proc = self.procs[worker_id]
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(proc.wait, within)
        return proc.poll()

    async def kill9(self, worker_id: str, rng: random.Random) -> None:
        """SIGKILL; a new process after a moment."""
        self.procs[worker_id].kill()
        await self.exited(worker_id, 30)
        await asyncio.sleep(rng.uniform(0, 1))
        self.start(worker_id)
        await self.up(worker_id)

    async def term(self, worker_id: str, rng: random.Random) -> None:
        """SIGTERM: it drains and exits; a new process."""
        self.procs[worker_id].terminate()
        status = await self.exited(worker_id, 30)
        if status is None:  # not drained in time: say so, and make room
            self.procs[worker_id].kill()
            await self.exited(worker_id, 30)
        self.term_exits[str(status)] += 1
        self.start(worker_id)
        await self.up(worker_id)

    async def stop(self, worker_id: str, rng: random.Random) -> None:
        """SIGSTOP for a while, then SIGCONT."""
        self.procs[worker_id].send_signal(signal.SIGSTOP)
        await asyncio.sleep(rng.uniform(0.5, self.args.lease + 2))
        self.procs[worker_id].send_signal(signal.SIGCONT)

    def restart_exited(self) -> None:
        """Start again the workers that exited while no fault was at work on them (e.g.
        refused their id: status 2)."""
        for worker_id, proc in self.procs.items():
            if worker_id not in self.busy and proc.poll() is not None:
                self.exits[str(proc.returncode)] += 1
                self.start(worker_id)

    async def run(self, until: float) -> None:
        """Inject faults until `until` (monotonic); wait for the last ones to finish."""
        rng = random.Random(self.args.seed)
        kinds = [*KINDS, "hub_kill9"] if self.args.hub_kills else list(KINDS)
        ids = sorted(self.procs)
        tasks: set[asyncio.Task[None]] = set()
        while (left := until - time.monotonic()) > 0:
            gap = rng.expovariate(1 / self.args.interval)
            kind = rng.choice(kinds)
            pick = rng.randrange(len(ids))
            fault_rng = random.Random(rng.random())  # its own draws, whatever the timing
            await asyncio.sleep(min(gap, left))
            if time.monotonic() >= until:
                break
            self.restart_exited()
            free = [w for w in ids[pick:] + ids[:pick] if w not in self.busy]
            target = "hub" if kind == "hub_kill9" else (free[0] if free else "")
            if not target or target in self.busy:
                continue
            action: Awaitable[None] = (
                self.hub.kill_and_restart(fault_rng.uniform(0.5, 2))
                if kind == "hub_kill9"
                else getattr(self, kind)(target, fault_rng)
            )
            self.faults[kind] += 1
            self.busy.add(target)
            task = asyncio.create_task(self._fault(target, action))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)

    async def _fault(self, target: str, action: Awaitable[None]) -> None:
        try:
            await action
        finally:
            self.busy.discard(target)

    async def all_back(self, http: httpx.AsyncClient) -> None:
        """Every worker running (continued, or started again) and listed by the hub."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
        for worker_id in self.procs:
            await self.up(worker_id)

        async def listed() -> bool:
            live = {w["worker_id"] for w in (await http.get("/api/workers")).json()}
            return set(self.procs) <= live

        await wait_for(listed, "every worker to be back", 120)

    def stop_all(self) -> None:
        """Stop every worker process (continue it first, so that it can drain)."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@dataclass
class Submits:
    """What the submitter saw."""

    accepted: list[str] = field(default_factory=list)
    retries: int = 0  # submits sent again after no answer or a 5xx
    refused: Counter[str] = field(default_factory=Counter)  # final answers other than 200
    refusals: list[str] = field(default_factory=list)  # the first few, verbatim


async def submit_one(
    http: httpx.AsyncClient, job_id: str, body: dict[str, Any], out: Submits
) -> None:
    """Submit until answered (the idempotency key makes a repeat safe), at most 60 s."""
    deadline = time.monotonic() + 60
    while True:
        try:
            response = await http.post("/api/jobs", json=body)
            if response.status_code < 500:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            out.refused["no answer"] += 1
            return
        out.retries += 1
        await asyncio.sleep(0.2)
    if response.status_code == 200:
        out.accepted.append(job_id)
        return
    out.refused[str(response.status_code)] += 1
    if len(out.refusals) < 5:
        out.refusals.append(f"{job_id}: {response.status_code} {response.text[:200]}")


async def submit_all(
    http: httpx.AsyncClient, run_id: str, args: argparse.Namespace, spread_s: float
) -> Submits:
    """Submit the jobs one by one, evenly over `spread_s` seconds."""
    rng = random.Random(args.seed + 1)
    out = Submits()
    tasks = []
    started = time.monotonic()
    for i in range(args.jobs):
        await asyncio.sleep(max(0.0, started + i * spread_s / args.jobs - time.monotonic()))
        job_id = f"{run_id}-{i:05d}"
        body = {
            "job_type": "simulation",
            "job_id": job_id,
            "idempotency_key": job_id,
            "payload": {"duration": round(args.job_s * rng.uniform(0.5, 1.5), 3)},
        }
        tasks.append(asyncio.create_task(submit_one(http, job_id, body, out)))
    await asyncio.gather(*tasks)
    return out


async def settle(http: httpx.AsyncClient, ids: list[str], within: float) -> float:
    """Wait until every job has ended (at most `within` s); the seconds it took."""
    started = time.monotonic()
    waiting = set(ids)
    gate = asyncio.Semaphore(READ_CONCURRENCY)

    async def ended(job_id: str) -> bool:
        async with gate:
            response = await http.get(f"/api/jobs/{job_id}")
        return response.status_code == 200 and response.json()["status"] in TERMINAL

    while waiting and time.monotonic() - started < within:
        batch = sorted(waiting)
        done = await asyncio.gather(*(ended(j) for j in batch))
        waiting -= {j for j, d in zip(batch, done, strict=True) if d}
        if waiting:
            await asyncio.sleep(0.5)
    return time.monotonic() - started


async def event_stream(http: httpx.AsyncClient, job_id: str) -> list[dict[str, Any]]:
    """Every event of the job: its SSE stream to the first terminal status, then resumed
    after it (the stream ends there, so a second completion would be past it)."""
    events: list[dict[str, Any]] = []
    cursor: str | None = None
    for read_s in (30.0, AFTER_END_READ_S):
        params = {"after": cursor} if cursor else {}
        timeout = httpx.Timeout(30, read=read_s)
        try:
            async with http.stream(
                "GET", f"/api/jobs/{job_id}/events", params=params, timeout=timeout
            ) as response:
                if response.status_code != 200:
                    return events
                async for line in response.aiter_lines():
                    if line.startswith("id:"):
                        cursor = line[3:].strip()
                    elif line.startswith("data:"):
                        events.append(json.loads(line[5:]))
        except httpx.ReadTimeout:
            pass
    return events


async def audit(http: httpx.AsyncClient, ids: list[str]) -> dict[str, Any]:
    """Each job's final state and events: the counts of the report."""
    gate = asyncio.Semaphore(READ_CONCURRENCY)

    async def read(job_id: str) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        async with gate:
            response = await http.get(f"/api/jobs/{job_id}")
            if response.status_code == 404:
                return None, []
            response.raise_for_status()
            return response.json(), await event_stream(http, job_id)

    rows = await asyncio.gather(*(read(j) for j in ids))
    statuses: Counter[str] = Counter()
    lost, twice = [], []
    rerun = orphans = progress = completed_events = 0
    for job_id, (job, events) in zip(ids, rows, strict=True):
        if job is None or job["status"] not in TERMINAL:
            lost.append(job_id)
            statuses["unknown" if job is None else job["status"]] += 1
            continue
        statuses[job["status"]] += 1
        rerun += job["attempt"] > 1
        orphans += job["orphans"]
        progress += sum(e["type"] == "progress" for e in events)
        completions = sum(e["type"] == "status" and e["status"] == "completed" for e in events)
        completed_events += completions
        result = job["result"] if isinstance(job["result"], dict) else {}
        output = result.get("output") or {}
        other_attempt = job["status"] == "completed" and (
            output.get("attempt") != job["attempt"] or output.get("job_id") != job_id
        )
        if completions > 1 or other_attempt:
            twice.append(job_id)
    return {
        "completed": statuses["completed"],
        "failed": statuses["failed"],
        "cancelled": statuses["cancelled"],
        "lost": len(lost),
        "completed_twice": len(twice),
        "rerun": rerun,
        "orphans": orphans,
        "completed_events": completed_events,
        "progress_events": progress,
        "not_ended": {s: n for s, n in statuses.items() if s not in TERMINAL},
        "lost_ids": lost[:10],
        "completed_twice_ids": twice[:10],
    }


def hub_settings(args: argparse.Namespace) -> dict[str, str]:
    """The hub's EMP_* settings of the run."""
    return {
        "EMP_BROKER__RECONNECT_GRACE_S": str(args.grace),
        "EMP_BROKER__LEASE_S": str(args.lease),
        "EMP_BROKER__MAX_ORPHANS": "1000",  # lost often by the chaos: not the job's fault
        "EMP_BROKER__WORKER_TTL_S": "15",
        "EMP_MAINTENANCE_INTERVAL_S": "0.2",
    }


def worker_settings(args: argparse.Namespace) -> dict[str, str]:
    """The workers' EMP_* settings of the run."""
    return {
        "EMP_SIMULATION_DURATION": str(args.job_s),
        "EMP_SIMULATION_STEPS": "4",
        "EMP_PROGRESS_INTERVAL_S": "0",
        "EMP_HEARTBEAT_S": "1",
        "EMP_RECONNECT_MAX_S": "1",
        "EMP_DRAIN_TIMEOUT_S": "10",
        "EMP_LOG_LEVEL": "info",  # its log says when it is connected (and what it ran)
    }


async def run(args: argparse.Namespace, url: str, tmp: Path) -> dict[str, Any]:
    """The whole run, in its own namespace."""
    run_id = f"faults-{uuid.uuid4().hex[:8]}"
    workers = worker_settings(args)
    async with hubs(url, 1, run_id, settings=hub_settings(args)) as [hub]:
        chaos = Chaos(hub, tmp, args, workers)
        try:
            async with httpx.AsyncClient(base_url=hub.url, timeout=30) as http:
                for i in range(args.workers):
                    chaos.start(f"w{i}")
                await chaos.all_back(http)
                started = time.monotonic()
                submits = asyncio.create_task(
                    submit_all(http, run_id, args, args.chaos_s * args.submit_share)
                )
                await chaos.run(started + args.chaos_s)
                chaos_s = time.monotonic() - started
                await chaos.all_back(http)
                submitted = await submits
                settle_s = await settle(http, submitted.accepted, args.settle_s)
                wall_s = time.monotonic() - started
                # Fresh connections for the audit: a pooled one the hub closed while idle
                # (keep-alive ends after 5 s) would fail the read on a loaded machine.
                fresh = httpx.Limits(max_keepalive_connections=0)
                async with httpx.AsyncClient(base_url=hub.url, limits=fresh, timeout=30) as reader:
                    counts = await audit(reader, submitted.accepted)
        finally:
            chaos.stop_all()
    return {
        "benchmark": "faults",
        "what": "jobs submitted while workers (and the hub) are killed, stopped and drained",
        "conditions": {
            "workers": args.workers,
            "jobs": args.jobs,
            "job_s": f"{args.job_s} x uniform(0.5, 1.5), in 4 steps, progress on",
            "chaos_s": args.chaos_s,
            "submits_over_s": round(args.chaos_s * args.submit_share, 2),
            "fault_every_s": f"exponential, mean {args.interval}",
            "fault_kinds": [*KINDS, "hub_kill9"] if args.hub_kills else list(KINDS),
            "stop_s": f"uniform(0.5, {args.lease + 2})",
            "kill9_restart_after_s": "uniform(0, 1)",
            "hub_down_s": "uniform(0.5, 2)" if args.hub_kills else None,
            "seed": args.seed,
            "settle_s_max": args.settle_s,
            "hub_settings": hub_settings(args),
            "worker_settings": workers,
            "redis": "embedded Valkey" if not args.url else "given",
            "emp": emp_hub.__version__,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        },
        "results": {
            "accepted": len(submitted.accepted),
            **{k: v for k, v in counts.items() if not k.endswith("_ids")},
            "faults": dict(sorted(chaos.faults.items())),
            "exit_status_after_term": dict(chaos.term_exits),
            "unexpected_worker_exits": dict(chaos.exits),
            "submit_retries": submitted.retries,
            "submits_refused": dict(submitted.refused),
            "submit_refusals": submitted.refusals,
            "lost_ids": counts["lost_ids"],
            "completed_twice_ids": counts["completed_twice_ids"],
            "chaos_s": round(chaos_s, 1),
            "settle_s": round(settle_s, 1),
            "wall_s": round(wall_s, 1),
        },
    }


def main(argv: list[str] | None = None) -> None:
    """Run the chaos and print the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--job-s", type=float, default=0.2, help="mean job duration (s)")
    parser.add_argument("--chaos-s", type=float, default=30, help="how long faults go on")
    parser.add_argument("--submit-share", type=float, default=0.8, help="of chaos-s, submits")
    parser.add_argument("--interval", type=float, default=1.0, help="mean s between faults")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--hub-kills", action="store_true", help="kill -9 the hub too")
    parser.add_argument("--grace", type=float, default=1.0, help="reconnect grace (s)")
    parser.add_argument("--lease", type=float, default=5.0, help="lease (s)")
    parser.add_argument("--settle-s", type=float, default=120, help="longest wait for the end")
    parser.add_argument("--url", help="Redis URL (default: an embedded Valkey)")
    parser.add_argument("--logs", type=Path, help="keep the workers' logs in this folder")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        logs = args.logs or tmp / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with redis_url_or_embedded(args.url, tmp / "valkey") as url:
            print(json.dumps(asyncio.run(run(args, url, logs)), indent=2))


if __name__ == "__main__":
    main()
