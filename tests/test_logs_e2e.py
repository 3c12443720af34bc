"""What `emp-hub serve` and `emp-worker run` (real processes) log with EMP_LOG_FORMAT=json,
a job going through them: every line JSON, the job's state changes with its ids, the
request id of an HTTP call in its lines and its answer, no token; and text by default."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.processes import Cluster, Proc, eventually_sync

pytestmark = [pytest.mark.slow, pytest.mark.hub, pytest.mark.worker]

SECRET = "emp_" + "L0gSecretValue" * 3
TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def json_lines(proc: Proc) -> list[dict[str, Any]]:
    """Every line the process wrote (stdout and stderr), each parsed as a JSON object with
    the fields every line has. While it runs, a last line without its newline yet is
    still being written (a long one takes several writes) and is left for the next read."""
    written = proc.text()
    if proc.popen.poll() is None:
        written = written[: written.rfind("\n") + 1]
    lines = []
    for text in written.splitlines():
        line = json.loads(text)  # fails on any line that is not JSON
        assert isinstance(line, dict), text
        assert {"ts", "level", "logger", "message"} <= line.keys(), text
        assert TS.fullmatch(line["ts"]), text
        lines.append(line)
    return lines


def of_job(lines: list[dict[str, Any]], job_id: str, logger: str) -> list[dict[str, Any]]:
    return [line for line in lines if line["logger"] == logger and line.get("job_id") == job_id]


def test_json_logs_of_a_job_through_hub_and_worker(
    redis_url: str, namespace: str, tmp_path: Path
) -> None:
    hub = Cluster(redis_url, namespace, tmp_path)
    auth = {"Authorization": f"Bearer {SECRET}"}
    # The most verbose levels: uvicorn's ASGI traces and handshake headers, the worker's
    # websockets and httpx lines; every one of them JSON, none with the token.
    served = hub.start_hub(EMP_AUTH_TOKEN=SECRET, EMP_LOG_LEVEL="trace", EMP_LOG_FORMAT="json")
    try:
        worker = hub.start_worker(
            "w-json",
            EMP_TOKEN=SECRET,
            EMP_LOG_FORMAT="json",
            EMP_LOG_LEVEL="debug",
            EMP_SIMULATION_DURATION="0.2",
        )

        def registered() -> bool:
            live = httpx.get(f"{hub.url}/api/workers", headers=auth, timeout=10).json()
            return any(w["worker_id"] == "w-json" for w in live)

        eventually_sync(registered, within_s=30, what="w-json registered", log=worker.text)
        submitted = httpx.post(
            f"{hub.url}/api/jobs",
            params={"token": SECRET},
            headers={"X-Request-ID": "req-logs-1"},
            json={"job_type": "simulation", "payload": {}},
            timeout=10,
        )
        assert submitted.headers["x-request-id"] == "req-logs-1"
        job_id = submitted.json()["job_id"]
        fetched = httpx.get(f"{hub.url}/api/jobs/{job_id}", headers=auth, timeout=10)
        assert re.fullmatch(r"[0-9a-f]{16}", fetched.headers["x-request-id"])  # made one

        def done() -> bool:  # the hub's line is written as the job is, the worker's after
            ends = [
                line.get("event")
                for proc, logger in ((served, "emp_hub.jobs"), (worker, "emp_worker"))
                for line in of_job(json_lines(proc), job_id, logger)
            ]
            return ends.count("completed") == 2

        eventually_sync(done, within_s=30, what=f"{job_id} completed", log=worker.text)
    finally:
        hub.stop()
    hub_lines, worker_lines = json_lines(served), json_lines(worker)
    changes = of_job(hub_lines, job_id, "emp_hub.jobs")
    assert [(c["event"], c["state"]) for c in changes] == [
        ("submitted", "pending"),
        ("assigned", "active"),
        ("completed", "completed"),
    ]
    assert all(c["level"] == "INFO" for c in changes)
    assert changes[0]["request_id"] == "req-logs-1"
    assert (changes[1]["worker_id"], changes[2]["worker_id"]) == ("w-json", "w-json")
    [access] = [
        line
        for line in hub_lines
        if line["logger"] == "uvicorn.access" and line.get("request_id") == "req-logs-1"
    ]
    assert (access["method"], access["path"], access["status"]) == (
        "POST",
        "/api/jobs?token=***",
        200,
    )
    ran = of_job(worker_lines, job_id, "emp_worker")
    assert [line["event"] for line in ran] == ["started", "completed"]
    assert {line["worker_id"] for line in ran} == {"w-json"}
    # The handshakes' header lines are there, their tokens redacted.
    assert any(line["message"] == "> Authorization: ***" for line in worker_lines)
    assert any(line["message"] == "< authorization: ***" for line in hub_lines)
    assert "L0gSecretValue" not in served.text() + worker.text()


def test_text_is_the_default(redis_url: str, namespace: str, tmp_path: Path) -> None:
    hub = Cluster(redis_url, namespace, tmp_path)
    served = hub.start_hub(EMP_LOG_LEVEL="info")
    try:
        worker = hub.start_worker("w-text", EMP_SIMULATION_DURATION="0.1")
        hub.wait_for_workers("w-text")
        job_id = hub.submit()
        hub.wait_job(job_id)
        eventually_sync(
            lambda: f"job {job_id}: completed" in worker.text(), what="the worker's line"
        )
    finally:
        hub.stop()
    hub_log, worker_log = served.text(), worker.text()
    assert f"INFO      emp_hub.jobs: job {job_id} submitted" in hub_log
    assert re.search(r'INFO: +127\.0\.0\.1:\d+ - "POST /api/jobs HTTP/1\.1" 200', hub_log)
    assert f"INFO emp_worker: job {job_id}: started (simulation, attempt 1)" in worker_log
    assert not any(line.startswith("{") for line in (hub_log + worker_log).splitlines())
