"""The demo and the benchmark script keep working (small sizes; figures are not checked)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from rich.console import Console

from benchmarks import claim as claim_benchmark
from benchmarks import connectors as connectors_benchmark
from benchmarks import dashboard as dashboard_benchmark
from benchmarks import faults as faults_benchmark
from benchmarks import hub as hub_benchmark
from benchmarks import lane as lane_benchmark
from benchmarks import peers as peers_benchmark
from benchmarks import recovery as recovery_benchmark
from benchmarks import worker as worker_benchmark
from emp_hub.demos.broker import run_demo
from emp_hub.demos.system import WORKERS, summary_table
from tests.processes import eventually_sync

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parent.parent


async def test_demo_runs_every_scenario(redis_url: str) -> None:
    out = io.StringIO()
    await run_demo(redis_url, Console(file=out, width=200))
    text = out.getvalue()
    assert "crashed while running crash-victim" in text
    assert "lease of crash-victim expired: requeued in place" in text
    assert "stopped cancel-me: it was cancelled" in text
    assert "unschedulable: 1 job(s) of service 'a1111'" in text
    assert text.count("completed") >= 9
    # Its own line, also when the output is not a terminal (the live table ends without one).
    assert any(line.startswith("who ran what") for line in map(str.strip, text.splitlines()))


@pytest.mark.timeout(300)
def test_claim_benchmark_prints_its_json(
    redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """fair and affinity, each on its own backlog beside fifo (which always runs)."""
    claim_benchmark.main(
        ["--sizes", "300", "--url", redis_url, "--cc-jobs", "200", "--policy", "affinity", "fair"]
    )
    report = json.loads(capsys.readouterr().out)
    conditions = report["conditions"]
    assert conditions["classes"] == 100 and conditions["fair_customers"] == 10
    assert conditions["policies"] == ["fifo", "fair", "affinity"]
    assert set(conditions["policy_setup"]) == {"fifo", "fair", "affinity"}
    [row] = report["results"]
    assert row["backlog"] == 300
    assert row["ours"] == row["policies"]["fifo"] and row["scan"]["p99_ms"] > 0
    for policy in ("fifo", "fair", "affinity"):
        assert row["policies"][policy]["p99_ms"] > 0 and row["fill_by_policy"][policy] > 0
        assert "promotion_step" not in row["policies"][policy]
    assert report["submit_jobs_per_s"] > 0 and report["claim_complete_per_s"] > 0


def test_claim_benchmark_measures_the_priority_policy(
    redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--sizes", "1000", "--url", redis_url, "--cc-jobs", "100"]
    claim_benchmark.main([*args, "--policy", "fifo", "priority"])
    report = json.loads(capsys.readouterr().out)
    assert report["conditions"]["policies"] == ["fifo", "priority"]
    assert "fair_customers" not in report["conditions"]
    [row] = report["results"]
    assert row["policies"]["fifo"]["p99_ms"] > 0 and row["policies"]["priority"]["p99_ms"] > 0
    step = row["policies"]["priority"]["promotion_step"]
    assert step["samples"] == 1 and step["steps_per_pass"] == 1000 and step["p99_ms"] > 0
    # `all` names the four, in one order, whatever order they are given in.
    assert claim_benchmark.parse_args(["--policy", "all"]).policy == [
        "fifo",
        "priority",
        "fair",
        "affinity",
    ]
    assert claim_benchmark.parse_args([]).policy == ["fifo"]


@pytest.mark.timeout(300)
def test_hub_benchmark_prints_its_json(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    hub_benchmark.main(["--jobs", "200", "--workers", "4", "--samples", "10", "--url", redis_url])
    report = json.loads(capsys.readouterr().out)
    assert [r["replicas"] for r in report["results"]] == [1, 2]
    for row in report["results"]:
        assert row["throughput"]["jobs"] == 200 and row["throughput"]["jobs_per_s"] > 0
        latency = row["submit_to_assigned"]
        assert latency["from_submission"]["p99_ms"] > 0
        assert latency["from_http_request"]["p50_ms"] >= latency["from_submission"]["p50_ms"]
    floor = report["client_floor"]
    assert floor["samples"] == 10 and floor["round_trip"]["p50_ms"] > 0
    hops = report["topology_floor"]  # the bare hub: its workers got every job
    assert hops["samples"] == 10 and hops["from_http_request"]["p50_ms"] > 0
    assert len(hops["from_submission"]) == 2
    with redis.Redis.from_url(redis_url) as client:
        assert not client.keys("bench-bare-hub:*")  # its counter is gone


def test_lane_benchmark_prints_its_json(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--samples", "20", "--pause-ms", "1", "--callers", "3", "--commands", "10"]
    lane_benchmark.main([*args, "--url", redis_url])
    report = json.loads(capsys.readouterr().out)
    assert report["conditions"]["samples"] == 20 and report["conditions"]["server"] == "--url"
    assert set(report["results"]) == {"ping", "evalsha"}
    for row in report["results"].values():
        for timing in ("back_to_back", "after_pause"):
            for way in ("redis_py", "lane"):
                assert row[timing][way]["samples"] == 20 and row[timing][way]["p50_ms"] > 0
            assert row[timing]["redis_py_over_lane_p50"] > 0
        assert row["concurrent_per_s"]["redis_py"] > 0 and row["concurrent_per_s"]["lane"] > 0


@pytest.mark.timeout(300)
def test_dashboard_benchmark_prints_its_json(
    redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--quick, as documented; it needs chromium as tests/test_dashboard.py does."""
    from tests.test_dashboard import chromium_path

    chromium_path()  # a clear failure when there is none
    dashboard_benchmark.main(["--quick", "--url", redis_url])
    report = json.loads(capsys.readouterr().out)
    assert report["conditions"]["registered_workers"] == 200
    assert set(report["first_render_ms"]) == {
        "overview",
        "queues",
        "workers",
        "jobs",
        "job",
        "dead",
        "alerts",
    }
    assert all(ms > 0 for ms in report["first_render_ms"].values())
    cpu = report["hub_cpu"]
    assert set(cpu) == {
        "no_dashboard",
        "dashboard_on_overview",
        "dashboard_on_workers",
        "monitor_client",
    }
    for phase in cpu.values():
        assert phase["jobs_per_s"] > 0 and phase["hub_cpu_s_per_s"] > 0, phase
        assert phase["hub_cpu_ms_per_job_until_settled"] > 0, phase
    overview = cpu["dashboard_on_overview"]
    assert overview["live_during_load"] + overview["live_after_load"] > 0, overview
    assert overview["job_events_during_load"] + overview["job_events_after_load"] > 0, overview
    monitor = cpu["monitor_client"]
    assert monitor["live_during_load"] + monitor["live_after_load"] > 0, monitor


@pytest.mark.timeout(300)
def test_worker_benchmark_prints_its_json(
    redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    worker_benchmark.main(["--jobs", "100", "--workers", "2", "--url", redis_url])
    report = json.loads(capsys.readouterr().out)
    results = report["results"]
    assert results["completed"] == 100 and results["jobs_per_s"] > 0
    assert results["worker_side_overhead"]["p99_ms"] > 0


def check_peers_report(report: dict[str, Any], systems: list[str], jobs: int) -> None:
    """The JSON's shape, and every job of every run done."""
    assert report["conditions"]["jobs"] == jobs
    assert set(report["systems"]) == set(systems)
    for system in systems:
        summary = report["systems"][system]
        assert summary["completed"] and all(n == jobs for n in summary["completed"]), system
        assert summary["median_jobs_per_s"] > 0 and len(summary["jobs_per_s"]) >= 1
        assert 0 < summary["latency"]["p50_ms"] <= summary["latency"]["p99_ms"], system
        for seconds, startup, after in zip(
            summary["seconds"],
            summary["startup_s"],
            summary["after_startup_jobs_per_s"],
            strict=True,
        ):
            assert 0 < startup < seconds and after > jobs / seconds, system
    cpu = report["systems"]["emp"]["cpu_us_per_job"]
    assert set(cpu) == {"hub", "valkey", "worker0", "worker1", "total"}
    assert cpu["hub"] > 0 and cpu["total"] >= cpu["hub"] + cpu["worker0"]


@pytest.mark.timeout(300)
def test_peers_benchmark_runs_emp_alone(capsys: pytest.CaptureFixture[str]) -> None:
    peers_benchmark.main(["--jobs", "200", "--runs", "1", "--samples", "3", "--systems", "emp"])
    report = json.loads(capsys.readouterr().out)
    check_peers_report(report, ["emp"], 200)
    assert report["conditions"]["order"] == ["emp"] and report["ratios_emp_over_peer"] == {}


@pytest.mark.timeout(600)
def test_peers_benchmark_interleaves_emp_with_taskiq_and_dramatiq(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Installs the peers into a venv of their own (the package registry is needed)."""
    args = ["--jobs", "200", "--runs", "1", "--samples", "3", "--venv", str(tmp_path / "venv")]
    peers_benchmark.main(args)
    report = json.loads(capsys.readouterr().out)
    check_peers_report(report, ["emp", "taskiq", "dramatiq"], 200)
    assert report["conditions"]["order"] == ["taskiq", "emp", "dramatiq", "emp"]
    assert report["conditions"]["versions"]["taskiq"] == "0.13.0"
    assert report["conditions"]["venv_install_s"] > 0
    assert len(report["systems"]["emp"]["jobs_per_s"]) == 2
    for peer in ("taskiq", "dramatiq"):
        assert set(report["ratios_emp_over_peer"][peer]) == {
            "jobs_per_s",
            "latency_p50",
            "latency_p99",
        }


@pytest.mark.timeout(300)
def test_connectors_benchmark_prints_its_json(capsys: pytest.CaptureFixture[str]) -> None:
    connectors_benchmark.main(["--jobs", "3"])
    report = json.loads(capsys.readouterr().out)
    assert set(report["results"]) == {"comfyui", "a1111", "rest", "websocket"}
    for name, figures in report["results"].items():
        assert figures["connector"] == name and figures["jobs"] == 3, figures


@pytest.mark.timeout(300)
async def test_real_comfyui_check_as_documented_passes_against_the_fake() -> None:
    """docs/connectors/comfyui.md's command, run as written but at the fake ComfyUI's URL
    (and with 3 timed jobs, not 20): every check passes against the fake too (which
    behaves as the real server did)."""
    sys.path.insert(0, str(ROOT / "plugins" / "emp-connector-comfyui" / "tests"))
    from fake_comfyui import fake_comfyui

    text = (ROOT / "docs" / "connectors" / "comfyui.md").read_text()
    section = text[text.index("### Checked against a real ComfyUI") :]
    [command] = re.findall(r"```sh\n(.*?)```", section, re.S)
    assert "--url http://127.0.0.1:8188" in command
    async with fake_comfyui(node_s=0.2) as (fake, url, _):
        check = await asyncio.create_subprocess_exec(
            "bash",
            "-c",
            command.replace("http://127.0.0.1:8188", url).strip() + " --jobs 3",
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(check.communicate(), 240)
    assert check.returncode == 0, out.decode()[-3000:] + err.decode()[-3000:]
    report = json.loads(out)
    assert report["passed"] == len(report["checks"]) == 12 and report["failed"] == [], report
    assert report["summary"]["jobs"] == 3, report["summary"]
    assert all(t["overhead_s"] >= 0 for t in report["timings"]), report["timings"]
    assert fake.running is None and fake.pending == []  # it left ComfyUI idle


@pytest.mark.timeout(300)
def test_recovery_benchmark_prints_its_json(
    redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--runs", "1", "--scenarios", "kill9", "--grace", "1", "--lease", "60"]
    recovery_benchmark.main([*args, "--url", redis_url])
    report = json.loads(capsys.readouterr().out)
    assert report["conditions"]["reconnect_grace_s"] == 1
    [seconds] = report["results"]["kill9"]["seconds"]
    assert 1 <= seconds < 60  # after the grace, not the lease


@pytest.mark.timeout(300)
def test_faults_benchmark_loses_nothing_and_completes_nothing_twice(
    redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Workers killed, drained and stopped while jobs run: every accepted job completes,
    once (these are the benchmark's invariants, not its figures)."""
    args = ["--workers", "2", "--jobs", "60", "--chaos-s", "8", "--interval", "0.7"]
    faults_benchmark.main([*args, "--seed", "3", "--url", redis_url])
    results = json.loads(capsys.readouterr().out)["results"]
    assert sum(results["faults"].values()) >= 3, results
    assert results["accepted"] == 60, results
    assert (results["lost"], results["completed_twice"]) == (0, 0), results
    assert results["completed"] == results["accepted"], results
    # The event streams were read whole: one completed event per job, progress flowed.
    assert results["completed_events"] == results["completed"], results
    assert results["progress_events"] > 0, results


def _start_demo(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[str], Path]:
    """`emp-demo` as a real process, its temporary files in a folder of the test's."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    demo = subprocess.Popen(
        [sys.executable, "-c", "from emp_hub.demos.system import main; main()", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "200", "TMPDIR": str(tmp)},
    )
    return demo, tmp


def _read_until(demo: subprocess.Popen[str], text: str) -> list[str]:
    """The demo's output lines up to the first that contains `text`."""
    assert demo.stdout is not None
    lines = []
    for line in demo.stdout:
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"the demo ended before {text!r}:\n{''.join(lines)}")


def _descendants(pid: int) -> dict[int, str]:
    """The processes below `pid` now (children, theirs...): pid -> start time."""
    parent, started = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parent[int(entry.name)], started[int(entry.name)] = int(fields[1]), fields[19]
    found: dict[int, str] = {}
    below = [pid]
    while below:
        above = below.pop()
        for child in (c for c, p in parent.items() if p == above):
            found[child] = started[child]
            below.append(child)
    return found


def _alive(procs: dict[int, str]) -> list[int]:
    """Those of `procs` still running (the same process: not a reused pid, not a zombie)."""
    alive = []
    for pid, start in procs.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[19] == start and fields[0] != "Z":
            alive.append(pid)
    return alive


def _kill(procs: dict[int, str]) -> None:
    """Kill what a failed test left running."""
    for pid in _alive(procs):
        os.kill(pid, signal.SIGKILL)


linux_only = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")


@linux_only
@pytest.mark.timeout(180)
def test_system_demo_runs_hub_and_worker_processes(tmp_path: Path) -> None:
    """scripts/demo.sh's program, fast: it waits for Ctrl-C at the end, then stops all."""
    demo, tmp = _start_demo(tmp_path, "--speed", "4")
    procs: dict[int, str] = {}
    try:
        lines = _read_until(demo, "Press Ctrl-C")
        procs = _descendants(demo.pid)
        assert len(procs) >= 5, procs  # the hub, its Valkey, three workers
        demo.send_signal(signal.SIGINT)
        rest, _ = demo.communicate(timeout=60)
        assert demo.returncode == 0, "".join(lines) + rest
        assert "stopped." in rest
        assert _alive(procs) == []
        assert list(tmp.iterdir()) == []  # its data and logs are gone ...
        assert str(tmp) not in "".join(lines) + rest  # ... so it names no folder
    finally:
        demo.kill()
        _kill(procs)
    rows = {
        cells[2]: cells
        for line in lines
        if len(cells := [c.strip() for c in line.split("│")]) == 10 and cells[1].isdigit()
    }
    order = {job: int(cells[1]) for job, cells in rows.items()}
    # Priority, then FIFO: the first wave (4 slots) takes urgent; the low ones go last.
    assert order["urgent"] <= 4
    assert order["urgent"] < order["cancel-me"] < order["low-1"] < order["low-2"]
    # The deadline scene: priority 0, due within a minute: the weighted policy adds 500.
    assert order["deadline-soon"] < order["urgent"]
    assert rows["deadline-soon"][3] == "0->500"
    assert rows["flux-art"][5] == "gpu-4090"  # the only worker with the model
    assert rows["acme-secret"][5] == "acme-only"  # strict to its customer
    assert (rows["cancel-me"][6], rows["flaky"][6], rows["flaky"][7]) == (
        "cancelled",
        "completed",
        "2",
    )
    first, second = rows["flaky"][5].split(" -> ")  # the path of its two attempts
    # Fair share: solo's two jobs, submitted after bigco's 12, start among the next few.
    assert order["solo-2"] <= 7 and order["solo-2"] < order["big-12"]
    assert {first, second} <= set(WORKERS)
    # The summary's title has its own line, also when the output is not a terminal.
    assert any(line.strip().startswith("who ran what") for line in lines)
    url = next(line for line in lines if "The hub is still up" in line).split()[-3]
    with pytest.raises(httpx.TransportError):  # the hub is gone
        httpx.get(url.rsplit("/", 1)[0] + "/health/live", timeout=2)


@linux_only
@pytest.mark.timeout(180)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_system_demo_stopped_by_a_signal_leaves_nothing_behind(
    sig: signal.Signals, tmp_path: Path
) -> None:
    """SIGTERM (kill) or SIGHUP (terminal closed) while jobs run: like Ctrl-C, everything it
    started stops (the hub's embedded Valkey too) and its temporary folder is removed."""
    demo, tmp = _start_demo(tmp_path)
    procs: dict[int, str] = {}
    try:
        lines = _read_until(demo, "workers starting")
        match = re.search(r"http://127\.0\.0\.1:\d+", "".join(lines))
        assert match, lines

        def active() -> bool:
            assert demo.poll() is None, lines
            job = httpx.get(f"{match[0]}/api/jobs/cancel-me", timeout=5).json()
            return bool(job.get("status") == "active")

        eventually_sync(
            active, within_s=60, every_s=0.1, what="cancel-me active", log=lambda: "".join(lines)
        )
        procs = _descendants(demo.pid)
        assert len(procs) >= 5, procs  # the hub, its Valkey, three workers
        demo.send_signal(sig)
        rest, _ = demo.communicate(timeout=90)
        assert demo.returncode == 0, "".join(lines) + rest
        assert "stopping the workers and the hub ...\nstopped.\n" in rest  # own lines
        assert _alive(procs) == []
        assert list(tmp.iterdir()) == []
    finally:
        demo.kill()
        _kill(procs)


@pytest.mark.timeout(180)
def test_system_demo_keeps_its_logs_when_asked(tmp_path: Path) -> None:
    demo, tmp = _start_demo(tmp_path, "--speed", "8", "--exit", "--keep")
    out, _ = demo.communicate(timeout=150)
    assert demo.returncode == 0, out
    match = re.search(r"logs kept in (\S+)", out)
    assert match, out
    logs = Path(match[1])
    assert logs.parent.parent == tmp
    assert {p.name for p in logs.iterdir()} == {"hub.log", *(f"{w}.log" for w in WORKERS)}


def test_system_demo_summary_times_a_job_from_its_claim_without_started_at() -> None:
    """`started_at` may be missing (an older hub); the seconds count from the claim then."""
    job = {
        "job_id": "j1",
        "priority": 0,
        "requirements": {},
        "customer": None,
        "worker_id": "cpu-box",
        "status": "completed",
        "attempt": 1,
        "claimed_at": 100.0,
        "finished_at": 102.5,
    }
    out = io.StringIO()
    Console(file=out, width=200).print(summary_table([job], {"j1": ["cpu-box"]}))
    assert re.search(r"│ 2\.5 +│", out.getvalue()), out.getvalue()
