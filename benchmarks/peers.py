"""emp beside taskiq and dramatiq: the same no-op workload through each. Prints JSON.

One private Valkey (embedded, no persistence), flushed before every run. Each run of a
system measures

* throughput: N no-op jobs queued first (not timed), then W worker processes started; timed
  from just before the first worker process is spawned to the last job's completion (emp:
  the largest `finished_at` the hub recorded; taskiq and dramatiq: the wall clock at the end
  of the task body, written by the task itself to a per-process file). Worker start-up
  (imports, connecting) is inside the time for every system alike, and reported apart
  (`startup_s`: to the first job's start; `after_startup_jobs_per_s`: the rate after it);
* enqueue-to-start latency with W idle workers, one job at a time: from just before the
  client's enqueue call to the job starting (emp: the job's `started_at`; the peers: the
  wall clock at the start of the task body), p50 and p99 over all runs.

emp: one `emp-hub serve` process and W `emp-worker run` processes with the simulation
connector at zero duration (one slot each, prefetch at its defaults); N jobs submitted in
HTTP batches of 500. The hub is on the path of every emp job, so the client's questions
to it are kept rare (see until_drained, emp_latency).
taskiq: taskiq-redis's ListQueueBroker, `taskiq worker --workers W` (its defaults otherwise).
dramatiq: its RedisBroker, `dramatiq --processes W` (its defaults otherwise: 8 threads).
The peers run in a virtual environment of their own (`--venv`, created and installed on
first use, pinned versions) from small scripts this module writes into a temp dir.

Runs interleave (per repeat: taskiq, emp, dramatiq, emp) so drift of a shared machine
falls on all systems alike. In emp's runs the CPU time (utime + stime from /proc) of the
hub, each worker and Valkey during the throughput phase, per job.

Usage: python -m benchmarks.peers [--jobs 20000] [--workers 2] [--runs 3]
       [--systems emp taskiq dramatiq] [--samples 200] [--quick] [--venv PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import redis

import emp_hub
from benchmarks.hub import LeanHTTP, hubs, percentiles
from benchmarks.worker import completed_jobs, start_workers
from emp_hub.embedded import EmbeddedValkey

PEERS = ("taskiq", "dramatiq")
PINS = ("taskiq==0.13.0", "taskiq-redis==1.2.4", "dramatiq[redis]==2.2.1")
DEFAULT_VENV = Path.home() / ".cache" / "emp-bench" / "peers-venv"
RECORD = 31  # bytes per line a peer's task writes: b"%17.6f %12.6f\n"
TICK = os.sysconf("SC_CLK_TCK")
DRAINED_POLL_S = 0.25  # how often emp's run asks the hub whether the queue is drained
LATENCY_POLL_S = 0.01  # how long after an emp latency sample's submit it is asked for

# The peers' code, written into a temp dir and run with the peers' venv's Python.
RECORDER = '''
import os, time
OUT = os.environ["PEER_OUT"]
URL = os.environ["PEER_REDIS_URL"]
_fd = None

def record(sent):
    """Append this job's start time and, for a latency sample, start - enqueue."""
    global _fd
    if _fd is None:
        path = os.path.join(OUT, "%d.rec" % os.getpid())
        _fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    now = time.time()
    os.write(_fd, b"%17.6f %12.6f\\n" % (now, now - sent if sent else 0.0))

def recorded():
    return sum(e.stat().st_size for e in os.scandir(OUT)) // 31
'''
TASKIQ_APP = """
from taskiq_redis import ListQueueBroker
from peer_record import URL, record

broker = ListQueueBroker(URL)

@broker.task
async def noop(sent: float = 0.0) -> None:
    record(sent)
"""
DRAMATIQ_APP = """
import dramatiq
from dramatiq.brokers.redis import RedisBroker
from peer_record import URL, record

broker = RedisBroker(url=URL)
dramatiq.set_broker(broker)

@dramatiq.actor(max_retries=0)
def noop(sent=0.0):
    record(sent)
"""
PRODUCER = """
import asyncio, sys, time
from peer_record import recorded

system, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])

if system == "taskiq":
    from taskiq_app import broker, noop

    async def main():
        await broker.startup()
        if mode == "fill":
            for i in range(0, n, 500):
                await asyncio.gather(*(noop.kiq(0.0) for _ in range(min(500, n - i))))
        else:
            for _ in range(n + 1):  # the first one warms up
                before = recorded()
                await noop.kiq(time.time())
                while recorded() <= before:
                    await asyncio.sleep(0.001)
                await asyncio.sleep(0.005)
        await broker.shutdown()

    asyncio.run(main())
else:
    from dramatiq_app import noop

    if mode == "fill":
        for _ in range(n):
            noop.send(0.0)
    else:
        for _ in range(n + 1):
            before = recorded()
            noop.send(time.time())
            while recorded() <= before:
                time.sleep(0.001)
            time.sleep(0.005)
"""
VERSIONS = """
import json, importlib.metadata as m
print(json.dumps({p: m.version(p) for p in ("taskiq", "taskiq-redis", "dramatiq", "redis")}))
"""


def ensure_venv(venv: Path) -> float:
    """Create the peers' venv and install them unless it is there; seconds it took."""
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import taskiq, taskiq_redis, dramatiq, redis"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return 0.0
    began = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *PINS], check=True)
    return round(time.perf_counter() - began, 1)


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process, in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


class Bench:
    """The shared state of one benchmark: the Valkey, the peers' scripts, the settings."""

    def __init__(self, args: argparse.Namespace, valkey: EmbeddedValkey, tmp: Path) -> None:
        self.args = args
        self.url = valkey.url
        self.tmp = tmp
        self.redis = redis.Redis.from_url(valkey.url)
        self.redis.config_set("save", "")
        self.valkey_pid = int(self.redis.info("server")["process_id"])
        self.out = tmp / "records"
        self.out.mkdir()
        self.code = tmp / "code"
        self.code.mkdir()
        for name, text in (
            ("peer_record.py", RECORDER),
            ("taskiq_app.py", TASKIQ_APP),
            ("dramatiq_app.py", DRAMATIQ_APP),
            ("producer.py", PRODUCER),
        ):
            (self.code / name).write_text(text)

    def reset(self) -> None:
        """An empty Valkey and no records."""
        self.redis.flushall()
        for path in self.out.iterdir():
            path.unlink()

    # --- the peers -------------------------------------------------------------------

    def _peer_env(self) -> dict[str, str]:
        return {
            **os.environ,
            "PYTHONPATH": str(self.code),
            "PEER_OUT": str(self.out),
            "PEER_REDIS_URL": self.url,
        }

    def _python(self) -> str:
        return str(self.args.venv / "bin" / "python")

    def produce(self, system: str, mode: str, n: int) -> None:
        """Run the peers' producer: `fill` queues n jobs, `latency` sends n + 1 one by one."""
        command = [self._python(), str(self.code / "producer.py"), system, mode, str(n)]
        subprocess.run(command, env=self._peer_env(), check=True, timeout=600)

    def start_peer_workers(self, system: str) -> subprocess.Popen[bytes]:
        """The peer's worker command with W processes, in a process group of its own."""
        bin_dir = self.args.venv / "bin"
        workers = str(self.args.workers)
        if system == "taskiq":
            command = [str(bin_dir / "taskiq"), "worker", "taskiq_app:broker", "--workers"]
            command += [workers, "--log-level", "WARNING"]
        else:
            command = [str(bin_dir / "dramatiq"), "dramatiq_app", "--processes", workers]
        with (self.tmp / f"{system}.log").open("ab") as log:
            return subprocess.Popen(
                command,
                cwd=self.code,
                env=self._peer_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def records(self) -> list[tuple[float, float]]:
        """Every (start time, latency) the peers' tasks wrote, in time order."""
        out = []
        for path in self.out.iterdir():
            for line in path.read_text().splitlines():
                at, latency = line.split()
                out.append((float(at), float(latency)))
        return sorted(out)

    def _until_recorded(self, n: int) -> None:
        deadline = time.monotonic() + 600
        while sum(p.stat().st_size for p in self.out.iterdir()) // RECORD < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the peer's workers did not run {n} jobs")
            time.sleep(0.02)

    def run_peer(self, system: str) -> dict[str, Any]:
        """One run of taskiq or dramatiq: throughput, then latency."""
        jobs = self.args.jobs
        self.reset()
        self.produce(system, "fill", jobs)
        began = time.time()
        workers = self.start_peer_workers(system)
        try:
            self._until_recorded(jobs)
            done = self.records()
            # The workers keep their files open: the latency samples follow in them.
            self.produce(system, "latency", self.args.samples)
            samples = self.records()[len(done) + 1 :]  # not the warm-up
            latencies = [latency for _, latency in samples]
        finally:
            stop_group(workers)
        return {**rates(began, done[0][0], done[-1][0], len(done)), "latency_s": latencies}

    # --- emp -------------------------------------------------------------------------

    def run_emp(self) -> dict[str, Any]:
        """One run of emp: a hub, W workers; throughput, then latency."""
        self.reset()
        return asyncio.run(self._run_emp())

    async def _run_emp(self) -> dict[str, Any]:
        namespace = f"bench-peers-{os.getpid()}"
        async with (
            hubs(self.url, 1, namespace) as running,
            httpx.AsyncClient(timeout=60) as http,
        ):
            url, hub_pid = running[0].url, running[0].pid
            batch = [{"job_type": "simulation", "payload": {}} for _ in range(500)]
            for i in range(0, self.args.jobs, 500):
                response = await http.post(
                    f"{url}/api/jobs/batch", json={"jobs": batch[: self.args.jobs - i]}
                )
                response.raise_for_status()
            before = {"hub": cpu_ticks(hub_pid), "valkey": cpu_ticks(self.valkey_pid)}
            began = time.time()
            procs = start_workers(url, self.args.workers, self.tmp)
            try:
                await until_drained(http, url)
                cpu = {
                    "hub": cpu_ticks(hub_pid) - before["hub"],
                    "valkey": cpu_ticks(self.valkey_pid) - before["valkey"],
                    **{f"worker{i}": cpu_ticks(p.pid) for i, p in enumerate(procs)},
                }
                cpu["total"] = sum(cpu.values())
                first, last, completed = await run_span(http, url)
                latencies, to_claim = await emp_latency(http, url, self.args.samples)
            finally:
                for proc in procs:
                    proc.terminate()
                for proc in procs:
                    proc.wait(30)
        return {
            **rates(began, first, last, completed),
            "latency_s": latencies,
            "claim_latency_s": to_claim,
            "cpu_us_per_job": {
                name: round(ticks / TICK / completed * 1e6, 1) for name, ticks in cpu.items()
            },
        }


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group we started (a peer's worker and its children); SIGKILL
    it when it does not exit within 30 s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        proc.wait()


async def until_drained(http: httpx.AsyncClient, url: str) -> None:
    """Until the hub has nothing pending, active or delayed. Asked every DRAINED_POLL_S:
    the hub is on the path of every job, and each /api/queues costs it about a millisecond
    of CPU (asked every 20 ms, some 5% of what it spent on the jobs); the time measured
    is the last job's `finished_at`, whenever the question is asked."""
    deadline = time.monotonic() + 600
    while True:
        stats = (await http.get(f"{url}/api/queues")).json()
        if stats["pending"] + stats["active"] + stats["delayed"] == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError("emp's workers did not drain the queue")
        await asyncio.sleep(DRAINED_POLL_S)


async def run_span(http: httpx.AsyncClient, url: str) -> tuple[float, float, int]:
    """The first job's start, the last job's end and the number of completed jobs."""
    jobs = await completed_jobs(http, url)
    first = min(job["started_at"] for job in jobs)
    return first, max(job["finished_at"] for job in jobs), len(jobs)


def rates(began: float, first: float, last: float, completed: int) -> dict[str, Any]:
    """A throughput run's figures: jobs/s from the workers' spawn to the last job's end,
    the start-up (spawn to the first job's start) and jobs/s after it."""
    return {
        "completed": completed,
        "seconds": round(last - began, 3),
        "jobs_per_s": round(completed / (last - began), 1),
        "startup_s": round(first - began, 3),
        "after_startup_jobs_per_s": round(completed / (last - first), 1),
    }


async def emp_latency(
    http: httpx.AsyncClient, url: str, samples: int
) -> tuple[list[float], list[float]]:
    """Submit one job at a time to idle workers; from just before each submit to its
    `started_at`, and to its `claimed_at` (the first job warms up and is not counted).
    The submit goes through `LeanHTTP` (benchmarks/hub.py), not httpx, whose own time a
    request is more than the hub's here; the peers' producers call their Redis directly.

    The hub stamps `started_at` when it records the worker's "started" report or, for a
    job this short, its result (the worker batches what it sends within 2 ms, and the
    result replaces the report still waiting): an upper bound of the worker's start;
    the claim (the hub handing the job out, before the frame reaches the worker) is a
    lower bound. The job is first asked for LATENCY_POLL_S after the submit, then as
    often: a question asked while the job runs would hold up the hub recording it.
    Meanwhile the client wakes every millisecond, as the peers' producer does while it
    waits for a job's record (else the machine's CPUs idle deeper during emp's samples
    than during the peers', and waking them is part of the time)."""
    started: list[float] = []
    claimed: list[float] = []
    submitter = LeanHTTP()
    try:
        for i in range(samples + 1):
            before = time.time()
            job_id = (await submitter.post(f"{url}/api/jobs", {"job_type": "simulation"}))["job_id"]
            while True:
                await idle_wait(LATENCY_POLL_S)
                job = (await http.get(f"{url}/api/jobs/{job_id}")).json()
                if job["status"] == "completed":
                    break
            if i:
                started.append(job["started_at"] - before)
                claimed.append(job["claimed_at"] - before)
            await asyncio.sleep(0.005)
    finally:
        await submitter.aclose()
    return started, claimed


async def idle_wait(seconds: float) -> None:
    """Sleep at least `seconds`, in steps of a millisecond."""
    for _ in range(max(1, round(seconds / 0.001))):
        await asyncio.sleep(0.001)


def schedule(systems: list[str], runs: int) -> list[str]:
    """The order of the runs: per repeat each peer, each followed by emp (emp alone when
    it is the only system; the peers alone when emp is not asked for)."""
    peers = [s for s in systems if s in PEERS]
    order: list[str] = []
    for _ in range(runs):
        if not peers:
            order.append("emp")
        for peer in peers:
            order.append(peer)
            if "emp" in systems:
                order.append("emp")
    return order


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A system's runs: jobs/s of each and their median, latency over all runs."""
    latencies = [x for run in runs for x in run["latency_s"]]
    out: dict[str, Any] = {
        "jobs_per_s": [run["jobs_per_s"] for run in runs],
        "median_jobs_per_s": round(statistics.median(run["jobs_per_s"] for run in runs), 1),
        "completed": [run["completed"] for run in runs],
        "seconds": [run["seconds"] for run in runs],
        "startup_s": [run["startup_s"] for run in runs],
        "after_startup_jobs_per_s": [run["after_startup_jobs_per_s"] for run in runs],
        "latency": percentiles(latencies) if latencies else None,
        "latency_samples": len(latencies),
    }
    to_claim = [x for run in runs for x in run.get("claim_latency_s", [])]
    if to_claim:
        out["latency_to_claim"] = percentiles(to_claim)
    cpu = [run["cpu_us_per_job"] for run in runs if "cpu_us_per_job" in run]
    if cpu:
        out["cpu_us_per_job"] = {
            name: round(statistics.median(c[name] for c in cpu), 1) for name in cpu[0]
        }
        out["cpu_us_per_job_runs"] = cpu
    return out


def peer_versions(venv: Path) -> dict[str, str]:
    """The installed versions of the peers' packages."""
    python = str(venv / "bin" / "python")
    result = subprocess.run([python, "-c", VERSIONS], capture_output=True, check=True, text=True)
    versions: dict[str, str] = json.loads(result.stdout)
    return versions


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark."""
    peers = [s for s in args.systems if s in PEERS]
    install_s = ensure_venv(args.venv) if peers else 0.0
    results: dict[str, list[dict[str, Any]]] = {s: [] for s in args.systems}
    began = time.perf_counter()
    with (
        tempfile.TemporaryDirectory() as tmp,
        EmbeddedValkey(Path(tmp) / "valkey", appendonly=False) as valkey,
    ):
        bench = Bench(args, valkey, Path(tmp))
        (Path(tmp) / "plugins").mkdir()
        runners: dict[str, Callable[[], dict[str, Any]]] = {
            "emp": bench.run_emp,
            "taskiq": lambda: bench.run_peer("taskiq"),
            "dramatiq": lambda: bench.run_peer("dramatiq"),
        }
        for system in schedule(args.systems, args.runs):
            results[system].append(runners[system]())
            print(f"{system}: {results[system][-1]['jobs_per_s']} jobs/s", file=sys.stderr)
        bench.redis.close()
    systems = {s: summary(r) for s, r in results.items()}
    return {
        "conditions": conditions(args, peers, install_s, time.perf_counter() - began),
        "systems": systems,
        "ratios_emp_over_peer": ratios(systems),
    }


def conditions(
    args: argparse.Namespace, peers: list[str], install_s: float, seconds: float
) -> dict[str, Any]:
    """What the figures were measured under."""
    return {
        "machine": platform.machine(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "versions": {"emp": emp_hub.__version__, **(peer_versions(args.venv) if peers else {})},
        "jobs": args.jobs,
        "workers": args.workers,
        "runs": args.runs,
        "latency_samples_per_run": args.samples,
        "order": schedule(args.systems, args.runs),
        "venv_install_s": install_s,
        "seconds": round(seconds, 1),
        "timed": "throughput: from spawning the first worker process (N jobs already queued) "
        "to the last job's completion; latency: from just before the enqueue call to the "
        "job's start, one job at a time, idle workers (emp: its started_at, stamped when the "
        "hub records the worker's started report or, for a job this short, its result, sent "
        "in the same frame; latency_to_claim: to its claimed_at); startup_s: from the spawn "
        "to the first job's start; after_startup_jobs_per_s: the jobs over the time from the "
        "first job's start to the last one's end",
        "emp": "one emp-hub serve, W emp-worker run processes (simulation connector, "
        "duration 0, 1 step, 1 slot, prefetch at its defaults), submitted in HTTP batches "
        "of 500; the client asks the hub whether the queue is drained every "
        f"{DRAINED_POLL_S} s, and a latency sample's job {LATENCY_POLL_S} s after its "
        "submit (a bare HTTP/1.1 POST, LeanHTTP), waking every millisecond meanwhile (as "
        "the peers' producer)",
        "taskiq": "ListQueueBroker, taskiq worker --workers W (defaults otherwise)",
        "dramatiq": "RedisBroker, dramatiq --processes W (defaults otherwise: 8 threads)",
        "valkey": "one embedded Valkey, no persistence, flushed before every run",
    }


def ratios(systems: dict[str, Any]) -> dict[str, Any]:
    """emp / peer of the median jobs/s and of the latency p50 and p99."""
    if "emp" not in systems:
        return {}
    emp = systems["emp"]
    out: dict[str, Any] = {}
    for peer in PEERS:
        if peer not in systems:
            continue
        other = systems[peer]
        out[peer] = {
            "jobs_per_s": round(emp["median_jobs_per_s"] / other["median_jobs_per_s"], 3),
            "latency_p50": round(emp["latency"]["p50_ms"] / other["latency"]["p50_ms"], 3),
            "latency_p99": round(emp["latency"]["p99_ms"] / other["latency"]["p99_ms"], 3),
        }
    return out


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--runs", type=int, default=3, help="repeats of the interleaved order")
    parser.add_argument("--samples", type=int, default=200, help="latency samples per run")
    parser.add_argument("--systems", nargs="+", choices=("emp", *PEERS), default=["emp", *PEERS])
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="the peers' venv")
    parser.add_argument(
        "--quick", action="store_true", help="2,000 jobs, 1 run, 30 latency samples"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.jobs, args.runs, args.samples = 2_000, 1, 30
    print(json.dumps(run(args), indent=2))


if __name__ == "__main__":
    main()
