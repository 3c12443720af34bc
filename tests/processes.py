"""Real processes for end-to-end tests: `emp-hub serve` and `emp-worker run`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import redis

from emp_hub.broker import TERMINAL
from emp_hub.embedded import free_port

T = TypeVar("T")


def eventually_sync(
    check: Callable[[], T | None],
    *,
    within_s: float = 10,
    every_s: float = 0.02,
    what: str = "the condition",
    log: Callable[[], str] | None = None,
) -> T:
    """emp_worker.testing.eventually for synchronous tests (processes): call `check` every
    `every_s` until it returns something true, and return that; AssertionError naming `what`,
    the last answer and what `log()` returns then (the processes' logs) when `within_s`
    passes first. An exception from `check` (an assert that a process still runs) fails at
    once."""
    deadline = time.monotonic() + within_s
    while True:
        answer = check()
        if answer:
            return answer
        if time.monotonic() >= deadline:
            message = f"{what} did not come true within {within_s} s: {answer!r}"
            raise AssertionError(f"{message}\n{log()}" if log else message)
        time.sleep(every_s)


@dataclass
class Proc:
    """A child process with its log file."""

    popen: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        """What it logged so far."""
        return self.log.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        """Send it a signal."""
        self.popen.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        """Its exit status."""
        return self.popen.wait(timeout)

    def stop(self) -> None:
        """Terminate it (kill if it lingers)."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def spawn(args: list[str], env: dict[str, str], log: Path, program: str | None = None) -> Proc:
    """Start `python -m ...args` (or `program ...args`) with the environment, logging to
    `log`."""
    handle = log.open("wb")
    command = [program, *args] if program else [sys.executable, "-m", *args]
    popen = subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT)
    return Proc(popen, log)


@dataclass
class Cluster:
    """A hub process and workers, in a private Redis namespace and folder."""

    redis_url: str
    namespace: str
    tmp: Path
    port: int = field(default_factory=free_port)
    hub: Proc | None = None
    workers: dict[str, Proc] = field(default_factory=dict)
    hub_env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """The hub's HTTP base URL."""
        return f"http://127.0.0.1:{self.port}"

    def start_hub(self, *args: str, **env: str) -> Proc:
        """Start (or restart) the hub (`emp-hub serve` with `args`) and wait until it
        answers."""
        self.hub_env = {
            **os.environ,
            "EMP_REDIS_URL": self.redis_url,
            "EMP_BROKER__NAMESPACE": self.namespace,
            "EMP_PORT": str(self.port),
            "EMP_OUTPUT_DIR": str(self.tmp / "outputs"),
            "EMP_BROKER__LEASE_S": "2",
            "EMP_MAINTENANCE_INTERVAL_S": "0.2",
            "EMP_LOG_LEVEL": "warning",
            **env,
        }
        hub = self.hub = spawn(["emp_hub.cli", "serve", *args], self.hub_env, self.tmp / "hub.log")

        def ready() -> bool:
            assert hub.popen.poll() is None, hub.text()
            try:
                return httpx.get(f"{self.url}/health/ready", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        eventually_sync(ready, within_s=30, every_s=0.1, what="the hub ready", log=hub.text)
        return hub

    def start_worker(self, worker_id: str, program: str | None = None, **env: str) -> Proc:
        """Start `emp-worker run` with the simulation connector (1 s jobs by default); by
        `program` (the single-file worker) if given, else this Python's emp_worker."""
        full = {
            **os.environ,
            "EMP_HUB_URL": f"ws://127.0.0.1:{self.port}",
            "EMP_WORKER_ID": worker_id,
            "EMP_CONNECTORS": "simulation",  # not the other installed connectors' services
            "EMP_PLUGIN_DIR": str(self.tmp / "plugins"),
            "EMP_SIMULATION_DURATION": "1",
            "EMP_SIMULATION_STEPS": "4",
            "EMP_HEARTBEAT_S": "0.5",
            "EMP_RECONNECT_MAX_S": "1",
            "EMP_PROGRESS_INTERVAL_S": "0",
            **env,
        }
        args = ["run"] if program else ["emp_worker.cli", "run"]
        proc = spawn(args, full, self.tmp / f"worker-{worker_id}.log", program)
        self.workers[worker_id] = proc
        return proc

    def wait_for_workers(self, *worker_ids: str, timeout: float = 30) -> None:
        """Until the hub lists these workers as live."""

        def registered() -> bool:
            return set(worker_ids) <= {w["worker_id"] for w in self.get("/api/workers")}

        def logs() -> str:
            return "\n".join(self.workers[w].text() for w in worker_ids if w in self.workers)

        what = f"workers {worker_ids} registered"
        eventually_sync(registered, within_s=timeout, every_s=0.1, what=what, log=logs)

    def get(self, path: str) -> Any:
        """GET a hub API path; the JSON answer."""
        response = httpx.get(self.url + path, timeout=10)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        """POST to a hub API path; the JSON answer."""
        response = httpx.post(self.url + path, json=body or {}, timeout=10)
        response.raise_for_status()
        return response.json()

    def events(self, job_id: str) -> list[dict[str, Any]]:
        """A job's events so far (its server-sent event stream, read to its end)."""
        text = httpx.get(f"{self.url}/api/jobs/{job_id}/events", timeout=30).text
        return [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:")]

    def submit(self, **body: Any) -> str:
        """Submit a job; its id."""
        body.setdefault("job_type", "simulation")
        job_id: str = self.post("/api/jobs", body)["job_id"]
        return job_id

    def wait_job(
        self, job_id: str, statuses: Collection[str] = TERMINAL, timeout: float = 30
    ) -> Any:
        """Poll the job until its status is one of `statuses`; the job."""

        def job_if_there() -> Any:
            job = self.get(f"/api/jobs/{job_id}")
            return job if job["status"] in statuses else None

        def logs() -> str:
            workers = (f"--- {w}\n{p.text()[-3000:]}" for w, p in self.workers.items())
            return "\n".join([f"it is {self.get(f'/api/jobs/{job_id}')['status']}", *workers])

        what = f"job {job_id} {'/'.join(sorted(statuses))}"
        return eventually_sync(job_if_there, within_s=timeout, every_s=0.05, what=what, log=logs)

    def stop(self) -> None:
        """Stop every process, then remove the namespace (nothing writes to it any more)."""
        for proc in self.workers.values():
            proc.stop()
        if self.hub is not None:
            self.hub.stop()
        if not self.redis_url:
            return  # the hub ran its own embedded server, gone with it
        client = redis.Redis.from_url(self.redis_url)
        keys = list(client.scan_iter(match="{" + self.namespace + "}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


@contextmanager
def cluster(redis_url: str, namespace: str, tmp: Path) -> Iterator[Cluster]:
    """A started hub; workers are started by the test."""
    running = Cluster(redis_url, namespace, tmp)
    running.start_hub()
    try:
        yield running
    finally:
        running.stop()
