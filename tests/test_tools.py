"""The demo and the benchmark script keep working (small sizes; figures are not checked)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys

import httpx
import pytest
from rich.console import Console

from benchmarks import claim as claim_benchmark
from benchmarks import faults as faults_benchmark
from benchmarks import hub as hub_benchmark
from benchmarks import recovery as recovery_benchmark
from benchmarks import worker as worker_benchmark
from emp_hub.demo import run_demo


async def test_demo_runs_every_scenario(redis_url: str) -> None:
    out = io.StringIO()
    await run_demo(redis_url, Console(file=out, width=200))
    text = out.getvalue()
    assert "crashed while running crash-victim" in text
    assert "lease of crash-victim expired: requeued in place" in text
    assert "stopped cancel-me: it was cancelled" in text
    assert "unschedulable: 1 job(s) of service 'a1111'" in text
    assert text.count("completed") >= 9


@pytest.mark.timeout(300)
def test_claim_benchmark_prints_its_json(
    redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    claim_benchmark.main(["--sizes", "300", "--url", redis_url, "--cc-jobs", "200"])
    report = json.loads(capsys.readouterr().out)
    assert report["conditions"]["classes"] == 100
    [row] = report["results"]
    assert row["backlog"] == 300
    assert row["ours"]["p99_ms"] > 0 and row["scan"]["p99_ms"] > 0
    assert report["submit_jobs_per_s"] > 0 and report["claim_complete_per_s"] > 0


@pytest.mark.timeout(300)
def test_hub_benchmark_prints_its_json(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    hub_benchmark.main(["--jobs", "200", "--workers", "4", "--samples", "10", "--url", redis_url])
    report = json.loads(capsys.readouterr().out)
    assert [r["replicas"] for r in report["results"]] == [1, 2]
    for row in report["results"]:
        assert row["throughput"]["jobs"] == 200 and row["throughput"]["jobs_per_s"] > 0
        assert row["submit_to_assigned"]["from_submission"]["p99_ms"] > 0


@pytest.mark.timeout(300)
def test_worker_benchmark_prints_its_json(
    redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    worker_benchmark.main(["--jobs", "100", "--workers", "2", "--url", redis_url])
    report = json.loads(capsys.readouterr().out)
    results = report["results"]
    assert results["completed"] == 100 and results["jobs_per_s"] > 0
    assert results["worker_side_overhead"]["p99_ms"] > 0


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


@pytest.mark.timeout(180)
def test_system_demo_runs_hub_and_worker_processes() -> None:
    """scripts/demo.sh's program, fast: it waits for Ctrl-C at the end, then stops all."""
    demo = subprocess.Popen(
        [sys.executable, "-c", "from emp_hub.demo_system import main; main()", "--speed", "4"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert demo.stdout is not None
    lines = []
    for line in demo.stdout:
        lines.append(line)
        if "Press Ctrl-C" in line:
            break
    demo.send_signal(signal.SIGINT)
    rest, _ = demo.communicate(timeout=60)
    assert demo.returncode == 0, "".join(lines) + rest
    assert "stopped." in rest
    rows = {
        cells[2]: cells
        for line in lines
        if len(cells := [c.strip() for c in line.split("│")]) == 10 and cells[1].isdigit()
    }
    order = {job: int(cells[1]) for job, cells in rows.items()}
    # Priority, then FIFO: the first wave (4 slots) takes urgent; the low ones go last.
    assert order["urgent"] <= 4
    assert order["urgent"] < order["cancel-me"] < order["low-1"] < order["low-2"]
    assert rows["flux-art"][5] == "gpu-4090"  # the only worker with the model
    assert rows["acme-secret"][5] == "acme-only"  # strict to its customer
    assert (rows["cancel-me"][6], rows["flaky"][6], rows["flaky"][7]) == (
        "cancelled",
        "completed",
        "2",
    )
    url = next(line for line in lines if "The hub is still up" in line).split()[-3]
    with pytest.raises(httpx.TransportError):  # the hub is gone
        httpx.get(url.rsplit("/", 1)[0] + "/health/live", timeout=2)
