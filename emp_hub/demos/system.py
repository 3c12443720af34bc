"""The whole system on one machine: a hub, three `emp-worker` processes, a mix of jobs.

`scripts/demo.sh` (or `emp-demo`): starts a hub on an embedded Valkey and three workers
with the simulation connector and different capabilities (one with a model the others
lack, one strict to a customer), submits jobs with priorities and requirements, one that
fails and is retried, one that is cancelled while it runs, one whose near deadline makes it
overtake the others (the hub runs the weighted priority policy), shows them live, then prints who
ran what (the path of a retried job: `gpu-4090 -> cpu-box`), in which order and how long,
and the hub's URL. Then fair share (on in this hub): customer bigco submits a batch of 12 jobs,
customer solo 2 just after; solo's jobs start among the next few, not after bigco's batch.
Ctrl-C, SIGTERM or SIGHUP stop every process it started (the hub's
embedded Valkey too) and remove its temporary folder (`--keep` keeps it, with the logs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from emp_hub.broker import TERMINAL
from emp_hub.demos.broker import live_view
from emp_hub.embedded import free_port

#: Worker id -> its environment (beside the hub URL and plugin folder).
WORKERS: dict[str, dict[str, str]] = {
    "gpu-4090": {
        "EMP_SIMULATION_SERVICES": "simulation,comfyui",
        "EMP_SIMULATION_MODELS": "sdxl,flux",
        "EMP_TAGS": "gpu",
        "EMP_SIMULATION_CONCURRENCY": "2",
    },
    "cpu-box": {
        "EMP_SIMULATION_SERVICES": "simulation,comfyui",
        "EMP_SIMULATION_MODELS": "sdxl",
    },
    "acme-only": {
        "EMP_SIMULATION_SERVICES": "simulation",
        "EMP_CUSTOMER_ISOLATION": "strict",
        "EMP_CUSTOMERS_ALLOWED": "acme",
    },
}


def demo_jobs(scale: float) -> list[dict[str, Any]]:
    """The mix (POST /api/jobs bodies); `scale` multiplies the durations."""

    def job(job_id: str, seconds: float, **fields: Any) -> dict[str, Any]:
        payload = {"duration": round(seconds * scale, 3), **fields.pop("payload", {})}
        return {"job_id": job_id, "job_type": "simulation", "payload": payload, **fields}

    return [
        job("low-1", 2, priority=0),
        job("low-2", 2, priority=0),
        job("urgent", 1, priority=10),
        job("flux-art", 3, job_type="comfyui", priority=5, requirements={"models": ["flux"]}),
        job("sdxl-art", 2, job_type="comfyui", priority=5, requirements={"models": ["sdxl"]}),
        job("acme-secret", 2, customer="acme", priority=1, requirements={"isolation": "strict"}),
        job("flaky", 1, priority=3, max_attempts=3, payload={"fail_attempts": 1}),
        job("cancel-me", 30, priority=2),
        job("mid-1", 1.5, priority=5),
        job("mid-2", 1.5, priority=5),
        # The deadline scene: priority 0, but due within a minute; the hub's weighted policy
        # (docs/scheduling.md) adds 500, so it overtakes the whole backlog.
        job("deadline-soon", 1, priority=0, deadline_in_s=60),
    ]


def fair_jobs(scale: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The fair-share scene: customer bigco's batch of 12, then customer solo's 2."""

    def job(job_id: str, customer: str) -> dict[str, Any]:
        payload = {"duration": round(1 * scale, 3)}
        return {
            "job_id": job_id,
            "job_type": "simulation",
            "customer": customer,
            "payload": payload,
        }

    big = [job(f"big-{i:02d}", "bigco") for i in range(1, 13)]
    return big, [job("solo-1", "solo"), job("solo-2", "solo")]


@dataclass
class System:
    """The processes of the demo, in its folder (data and logs)."""

    tmp: Path
    port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """The hub's URL."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, console: Console, *, keep: bool) -> None:
        """Start the hub and the workers; return when all workers are registered."""
        base = {**os.environ, "EMP_LOG_LEVEL": "warning", "PYTHONUNBUFFERED": "1"}
        base.pop("EMP_REDIS_URL", None)
        hub_env = {
            **base,
            "EMP_DATA_DIR": str(self.tmp / "data"),
            "EMP_PORT": str(self.port),
            "EMP_SCHEDULING__FAIR_SHARE__ENABLED": "true",  # the fair-share scene
            "EMP_SCHEDULING__POLICY": "weighted",  # the deadline scene
        }
        logs = self.tmp / "logs"
        logs.mkdir()
        self._spawn("hub", ["emp_hub.cli", "serve"], hub_env)
        where = f"; data and logs in {self.tmp}, kept" if keep else ""
        console.print(f"hub starting on {self.url} (embedded Valkey{where})")
        self._wait_until(
            lambda: httpx.get(f"{self.url}/health/ready", timeout=1).status_code == 200
        )
        for worker_id, extra in WORKERS.items():
            env = {
                **base,
                "EMP_HUB_URL": f"ws://127.0.0.1:{self.port}",
                "EMP_WORKER_ID": worker_id,
                "EMP_PLUGIN_DIR": str(self.tmp / "plugins"),
                "EMP_CONNECTORS": "simulation",
                "EMP_SIMULATION_STEPS": "10",
                "EMP_HEARTBEAT_S": "5",
                "EMP_DRAIN_TIMEOUT_S": "5",
                "EMP_LOG_LEVEL": "info",
                **extra,
            }
            self._spawn(worker_id, ["emp_worker.cli", "run"], env)
        console.print(f"workers starting: {', '.join(WORKERS)}")

        def registered() -> bool:
            live = {w["worker_id"] for w in httpx.get(f"{self.url}/api/workers").json()}
            return set(WORKERS) <= live

        self._wait_until(registered)

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> None:
        with (self.tmp / "logs" / f"{name}.log").open("wb") as log:
            # A session (so a process group) of its own: Ctrl-C reaches the demo alone,
            # which stops them in order; what a child starts (the hub's Valkey) stays in
            # the child's group, so stop() can end it too.
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", *args],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _wait_until(self, ready: Callable[[], bool], seconds: float = 60) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if gone := [name for name, proc in self.procs.items() if proc.poll() is not None]:
                raise DemoError(f"{', '.join(gone)} exited")
            try:
                if ready():
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise DemoError(f"not ready after {seconds:g} s")

    def stop(self) -> None:
        """Workers first (they drain), then the hub; then anything left in their process
        groups (the hub's embedded Valkey, should the hub not have stopped it)."""
        workers = [proc for name, proc in self.procs.items() if name != "hub"]
        for proc in workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in workers:
            _wait(proc)
        hub = self.procs.get("hub")
        if hub is not None:
            if hub.poll() is None:
                hub.send_signal(signal.SIGTERM)
            _wait(hub)
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):  # the group is empty: all ended
                os.killpg(proc.pid, signal.SIGKILL)


class DemoError(Exception):
    """The demo's processes did not start."""


def _wait(proc: subprocess.Popen[bytes]) -> None:
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def prio(job: dict[str, Any]) -> str:
    """The priority asked, and the one queued at when the policy changed it: "0->500"."""
    effective = job.get("effective_priority")
    asked = str(job["priority"])
    return asked if effective in (None, job["priority"]) else f"{asked}->{effective}"


def jobs_table(jobs: list[dict[str, Any]]) -> Table:
    """Live view: one row per job."""
    table = Table(title="jobs (live)")
    for column in ("job", "service", "prio", "status", "worker", "progress", "attempt"):
        table.add_column(column)
    colour = {"completed": "green", "failed": "red", "cancelled": "yellow", "active": "cyan"}
    for job in jobs:
        filled = int(job["progress"] / 10)
        bar = "█" * filled + "·" * (10 - filled)
        status = job["status"]
        table.add_row(
            job["job_id"],
            job["job_type"],
            prio(job),
            f"[{colour.get(status, 'white')}]{status}[/]",
            job["worker_id"] or "-",
            f"{bar} {job['progress']:3.0f}%",
            str(job["attempt"]),
        )
    return table


def summary_table(jobs: list[dict[str, Any]], paths: dict[str, list[str]]) -> Table:
    """Who ran what, in which order, how long; `paths`: job id -> the workers that ran it."""
    table = Table(title="who ran what, in start order")
    for column in ("#", "job", "prio", "needs", "ran on", "outcome", "attempts", "seconds"):
        table.add_column(column)
    # Jobs claimed together (one worker's free slots) were taken best first.
    started = sorted(
        (j for j in jobs if j["claimed_at"]),
        key=lambda j: (j["claimed_at"], -(j.get("effective_priority") or j["priority"])),
    )
    for n, job in enumerate(started, 1):
        needs = list(job["requirements"].get("models", []))
        if job["requirements"].get("isolation") == "strict":
            needs.append(f"customer {job['customer']} only")
        began = job.get("started_at") or job["claimed_at"]
        took = (job.get("finished_at") or time.time()) - began
        table.add_row(
            str(n),
            job["job_id"],
            prio(job),
            ", ".join(needs) or "-",
            " -> ".join(paths.get(job["job_id"]) or [job["worker_id"] or "-"]),
            job["status"],
            str(job["attempt"]),
            f"{took:.1f}",
        )
    return table


def worker_path(http: httpx.Client, job_id: str) -> list[str]:
    """The workers that ran an ended job, in order: from its events (each status event
    `active` names the worker)."""
    text = http.get(f"/api/jobs/{job_id}/events").text
    events = [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:")]
    return [e["worker"] for e in events if e["type"] == "status" and e["status"] == "active"]


def run(console: Console, scale: float, *, wait_for_ctrl_c: bool, keep: bool) -> None:
    """The demo. Ctrl-C, SIGTERM and SIGHUP raise KeyboardInterrupt; on any ending it stops
    every process it started and removes its folder (unless `keep`)."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    system = System(Path(tempfile.mkdtemp(prefix="emp-demo-")))
    try:
        system.start(console, keep=keep)
        play(system, console, scale)
        fair_scene(system, console, scale)
        console.print(f"\nThe hub is still up: {system.url}/docs (API), {system.url}/api/jobs")
        if wait_for_ctrl_c:
            console.print("Press Ctrl-C to stop the hub and the workers.")
            while True:
                time.sleep(3600)
    except DemoError as error:
        keep = True  # to read why in the logs
        console.print(f"[red]the demo's processes did not start: {error}[/]")
        raise
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # a second one must not cut the clean-up short
        try:
            console.print("stopping the workers and the hub ...")
        finally:
            system.stop()
            if not keep:
                shutil.rmtree(system.tmp, ignore_errors=True)
        console.print(f"stopped; logs kept in {system.tmp / 'logs'}" if keep else "stopped.")


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def play(system: System, console: Console, scale: float) -> None:
    """Submit the mix, cancel one job once it runs, show progress until all ended."""
    jobs = demo_jobs(scale)
    ids = [j["job_id"] for j in jobs]
    with httpx.Client(base_url=system.url, timeout=10) as http:
        # One batch: the jobs arrive together, so the workers take them in priority order.
        http.post("/api/jobs/batch", json={"jobs": jobs}).raise_for_status()
        cancelled = False
        with live_view(console) as live:
            while True:
                current = [http.get(f"/api/jobs/{job_id}").json() for job_id in ids]
                live.update(jobs_table(current))
                victim = next(j for j in current if j["job_id"] == "cancel-me")
                if not cancelled and victim["status"] == "active" and victim["progress"] >= 10:
                    http.post(
                        "/api/jobs/cancel-me/cancel", json={"reason": "demo: changed my mind"}
                    )
                    cancelled = True
                if all(j["status"] in TERMINAL for j in current):
                    break
                time.sleep(0.2)
        console.print(summary_table(current, {i: worker_path(http, i) for i in ids}))


def fair_scene(system: System, console: Console, scale: float) -> None:
    """Fair share: bigco's batch, then solo's two jobs; show the start order."""
    big, solo = fair_jobs(scale)
    console.print(
        "\nFair share (EMP_SCHEDULING__FAIR_SHARE__ENABLED=true): customer bigco submits "
        "12 jobs, then customer solo 2; solo's jobs do not wait for bigco's batch."
    )
    ids = [j["job_id"] for j in big + solo]
    with httpx.Client(base_url=system.url, timeout=10) as http:
        http.post("/api/jobs/batch", json={"jobs": big}).raise_for_status()
        http.post("/api/jobs/batch", json={"jobs": solo}).raise_for_status()
        with live_view(console) as live:
            while True:
                current = [http.get(f"/api/jobs/{job_id}").json() for job_id in ids]
                live.update(jobs_table(current))
                if all(j["status"] in TERMINAL for j in current):
                    break
                time.sleep(0.2)
        table = summary_table(current, {i: worker_path(http, i) for i in ids})
        table.title = "fair share: who ran what, in start order"
        console.print(table)


def main(argv: list[str] | None = None) -> None:
    """Entry point of `emp-demo`."""
    parser = argparse.ArgumentParser(
        prog="emp-demo",
        description="The whole system on one machine: a hub on an embedded Valkey and three "
        "emp-worker processes with the simulation connector and different capabilities. It "
        "submits a mix of jobs (priorities, model requirements, one strict to a customer, one "
        "that fails and is retried, one cancelled while it runs), shows them live, then who "
        "ran what, in which order and how long; then fair share: one customer's batch of 12 "
        "and another's 2 jobs submitted after it, which start among the next few.",
        epilog="It works in a temporary folder (the Valkey's data, the processes' logs), "
        "removed at the end unless --keep. Ctrl-C, SIGTERM or SIGHUP stop every process it "
        "started. Example: emp-demo --speed 4 --exit",
    )
    parser.add_argument(
        "--speed",
        type=float,
        default=1.0,
        help="divide every job's duration by this (4: four times faster)",
    )
    parser.add_argument(
        "--exit", action="store_true", help="stop after the summary instead of waiting for Ctrl-C"
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary folder (data and the hub's and workers' logs) and say where",
    )
    args = parser.parse_args(argv)
    console = Console()
    try:
        run(console, 1 / args.speed, wait_for_ctrl_c=not args.exit, keep=args.keep)
    except KeyboardInterrupt:
        sys.exit(0)
    except DemoError:
        sys.exit(1)
