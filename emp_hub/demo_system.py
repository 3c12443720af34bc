"""The whole system on one machine: a hub, three `emp-worker` processes, a mix of jobs.

`scripts/demo.sh` (or `emp-demo`): starts a hub on an embedded Valkey and three workers
with the simulation connector and different capabilities (one with a model the others
lack, one strict to a customer), submits jobs with priorities and requirements, one that
fails and is retried, one that is cancelled while it runs, shows them live, then prints who
ran what, in which order and how long, and the hub's URL. Ctrl-C stops everything cleanly.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.live import Live
from rich.table import Table

from emp_hub.broker import TERMINAL
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
    ]


@dataclass
class System:
    """The processes of the demo."""

    tmp: Path
    port: int
    procs: dict[str, subprocess.Popen[bytes]]

    @property
    def url(self) -> str:
        """The hub's URL."""
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        """Workers first (they drain), then the hub."""
        for name, proc in self.procs.items():
            if name != "hub" and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in self.procs.items():
            if name != "hub":
                _wait(proc)
        hub = self.procs.get("hub")
        if hub is not None and hub.poll() is None:
            hub.send_signal(signal.SIGTERM)
            _wait(hub)


def _wait(proc: subprocess.Popen[bytes]) -> None:
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start(tmp: Path, console: Console) -> System:
    """Start the hub and the workers; return when all workers are registered."""
    port = free_port()
    base = {**os.environ, "EMP_LOG_LEVEL": "warning", "PYTHONUNBUFFERED": "1"}
    base.pop("EMP_REDIS_URL", None)
    hub_env = {**base, "EMP_DATA_DIR": str(tmp / "data"), "EMP_PORT": str(port)}
    logs = tmp / "logs"
    logs.mkdir()
    procs: dict[str, subprocess.Popen[bytes]] = {}
    system = System(tmp, port, procs)
    procs["hub"] = _spawn(["emp_hub.cli", "serve"], hub_env, logs / "hub.log")
    console.print(f"hub starting on {system.url} (embedded Valkey in {tmp / 'data'})")
    _wait_until(lambda: httpx.get(f"{system.url}/health/ready", timeout=1).status_code == 200)
    for worker_id, extra in WORKERS.items():
        env = {
            **base,
            "EMP_HUB_URL": f"ws://127.0.0.1:{port}",
            "EMP_WORKER_ID": worker_id,
            "EMP_PLUGIN_DIR": str(tmp / "plugins"),
            "EMP_CONNECTORS": "simulation",
            "EMP_SIMULATION_STEPS": "10",
            "EMP_HEARTBEAT_INTERVAL": "5",
            "EMP_DRAIN_TIMEOUT": "5",
            "EMP_LOG_LEVEL": "info",
            **extra,
        }
        procs[worker_id] = _spawn(["emp_worker.cli", "run"], env, logs / f"{worker_id}.log")
    console.print(f"workers starting: {', '.join(WORKERS)} (logs in {logs})")

    def registered() -> bool:
        live = {w["worker_id"] for w in httpx.get(f"{system.url}/api/workers").json()}
        return set(WORKERS) <= live

    _wait_until(registered)
    return system


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    handle = log.open("wb")
    # A process group of its own: Ctrl-C reaches the demo, which stops them in order.
    return subprocess.Popen(
        [sys.executable, "-m", *args],
        env=env,
        stdout=handle,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _wait_until(ready: Any, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if ready():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("the demo's processes did not start; see the logs")


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
            str(job["priority"]),
            f"[{colour.get(status, 'white')}]{status}[/]",
            job["worker_id"] or "-",
            f"{bar} {job['progress']:3.0f}%",
            str(job["attempt"]),
        )
    return table


def summary_table(jobs: list[dict[str, Any]]) -> Table:
    """Who ran what, in which order, how long."""
    table = Table(title="who ran what, in start order")
    for column in ("#", "job", "prio", "needs", "worker", "outcome", "attempts", "seconds"):
        table.add_column(column)
    started = sorted((j for j in jobs if j["claimed_at"]), key=lambda j: j["claimed_at"])
    for n, job in enumerate(started, 1):
        needs = list(job["requirements"].get("models", []))
        if job["requirements"].get("isolation") == "strict":
            needs.append(f"customer {job['customer']} only")
        took = (job["finished_at"] or time.time()) - (job["started_at"] or job["claimed_at"])
        table.add_row(
            str(n),
            job["job_id"],
            str(job["priority"]),
            ", ".join(needs) or "-",
            job["worker_id"] or "-",
            job["status"],
            str(job["attempt"]),
            f"{took:.1f}",
        )
    return table


def run(console: Console, scale: float, wait_for_ctrl_c: bool) -> None:
    """The demo; raises KeyboardInterrupt through to its caller's clean-up."""
    with tempfile.TemporaryDirectory(prefix="emp-demo-") as tmp:
        system = start(Path(tmp), console)
        try:
            play(system, console, scale)
            console.print(f"\nThe hub is still up: {system.url}/docs (API), {system.url}/api/jobs")
            if wait_for_ctrl_c:
                console.print("Press Ctrl-C to stop the hub and the workers.")
                while True:
                    time.sleep(3600)
        finally:
            console.print("stopping the workers and the hub ...")
            system.stop()
            console.print("stopped.")


def play(system: System, console: Console, scale: float) -> None:
    """Submit the mix, cancel one job once it runs, show progress until all ended."""
    jobs = demo_jobs(scale)
    ids = [j["job_id"] for j in jobs]
    with httpx.Client(base_url=system.url, timeout=10) as http:
        # One batch: the jobs arrive together, so the workers take them in priority order.
        http.post("/api/jobs/batch", json={"jobs": jobs}).raise_for_status()
        cancelled = False
        with Live(console=console, refresh_per_second=6) as live:
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
    console.print(summary_table(current))


def main(argv: list[str] | None = None) -> None:
    """Entry point of `emp-demo`."""
    parser = argparse.ArgumentParser(prog="emp-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--speed", type=float, default=1.0, help="divide every job's duration by this"
    )
    parser.add_argument(
        "--exit", action="store_true", help="stop after the summary instead of waiting for Ctrl-C"
    )
    args = parser.parse_args(argv)
    console = Console()
    try:
        run(console, 1 / args.speed, wait_for_ctrl_c=not args.exit)
    except KeyboardInterrupt:
        sys.exit(0)
