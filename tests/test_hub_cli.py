"""emp-hub's token commands and its errors (the CLI run in-process), and what `emp-hub serve`
logs (a real process)."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from websockets.sync.client import connect

from emp_hub.cli import main
from emp_hub.logs import redact
from tests.processes import Cluster, eventually_sync

pytestmark = [pytest.mark.slow, pytest.mark.hub]


@pytest.fixture(autouse=True)
def hub_env(monkeypatch: pytest.MonkeyPatch, redis_url: str, namespace: str) -> Iterator[None]:
    monkeypatch.setenv("EMP_REDIS_URL", redis_url)
    monkeypatch.setenv("EMP_BROKER__NAMESPACE", namespace)
    yield
    client = redis.Redis.from_url(redis_url)
    client.delete("{" + namespace + "}:tokens")
    client.close()


def test_token_lifecycle(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["token", "create", "--role", "client", "--customer", "acme", "--name", "shop"]) == 0
    )
    token = capsys.readouterr().out.strip()
    assert token.startswith("emp_")
    assert main(["token", "list", "--json"]) == 0
    [record] = json.loads(capsys.readouterr().out)
    assert (record["name"], record["role"], record["customer"]) == ("shop", "client", "acme")
    assert token not in json.dumps(record)
    assert main(["token", "revoke", record["id"]]) == 0
    assert main(["token", "revoke", record["id"]]) == 1
    assert "no token with id" in capsys.readouterr().err


def test_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["token", "create", "--role", "root"])
    assert "invalid choice" in capsys.readouterr().err
    assert main(["token", "create", "--role", "worker", "--customer", "acme"]) == 2
    assert "only client tokens" in capsys.readouterr().err


def test_unreachable_redis(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EMP_REDIS_URL", "redis://127.0.0.1:1/0")
    assert main(["token", "list"]) == 1
    assert "cannot reach Redis" in capsys.readouterr().err


def test_serve_never_logs_a_token(redis_url: str, namespace: str, tmp_path: Path) -> None:
    """`emp-hub serve` at its most verbose (trace: access log, WebSocket handshakes and
    headers, ASGI scopes) logs the requests, with every token replaced by ***."""
    secret = "emp_" + "S3cretTokenValue" * 3
    hub = Cluster(redis_url, namespace, tmp_path)
    hub.start_hub(EMP_AUTH_TOKEN=secret, EMP_LOG_LEVEL="trace")
    try:
        assert httpx.get(f"{hub.url}/api/jobs", params={"token": secret}).status_code == 200
        bearer = {"Authorization": f"Bearer {secret}"}
        assert httpx.get(f"{hub.url}/api/queues", headers=bearer).status_code == 200
        assert httpx.get(f"{hub.url}/api/jobs?limit=5&token={secret}x").status_code == 401
        ws = hub.url.replace("http", "ws")
        with connect(f"{ws}/ws/client/c1?token={secret}") as conn:
            assert json.loads(conn.recv(5))["type"] == "connection_established"
        with connect(f"{ws}/ws/client/c2", additional_headers=bearer) as conn:
            assert json.loads(conn.recv(5))["type"] == "connection_established"
    finally:
        hub.stop()
    log = hub.hub.text() if hub.hub else ""
    assert "S3cretTokenValue" not in log
    assert '"GET /api/jobs?token=*** HTTP/1.1" 200' in log  # the access log still says what
    assert '"GET /api/jobs?limit=5&token=*** HTTP/1.1" 401' in log
    assert '"WebSocket /ws/client/c1?token=***" [accepted]' in log
    assert "authorization: ***" in log.lower()  # the handshake headers (debug and trace)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("GET /ws/worker/w1?token=emp_abc&x=1", "GET /ws/worker/w1?token=***&x=1"),
        ("{'query_string': b'token=emp_abc'}", "{'query_string': b'token=***'}"),
        ("(b'authorization', b'Basic dXNlcjpwYXNz')", "(b'authorization', b'***')"),
        ("Authorization: Bearer emp_abc", "Authorization: ***"),
        ("redis://:hunter2@10.0.0.5:6379/0", "redis://:***@10.0.0.5:6379/0"),
        ("redis://10.0.0.5:6379/0 job-1 at 12:30", "redis://10.0.0.5:6379/0 job-1 at 12:30"),
    ],
)
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_ends_its_event_streams_when_told_to_stop(
    redis_url: str, namespace: str, tmp_path: Path, workers: str
) -> None:
    """An open event stream (a dashboard's feed, a job's events) ends as soon as the hub is
    told to stop: the hub exits at once, well within EMP_SHUTDOWN_TIMEOUT_S (10 s), and
    logs no error."""
    hub = Cluster(redis_url, namespace, tmp_path)
    proc = hub.start_hub("--workers", workers, EMP_LOG_LEVEL="info")
    try:
        with httpx.Client(base_url=hub.url, timeout=10) as http:
            job_id = http.post("/api/jobs", json={"job_type": "simulation"}).json()["job_id"]
            with (
                http.stream("GET", "/api/dashboard/feed") as feed,
                http.stream("GET", f"/api/jobs/{job_id}/events") as events,
            ):
                feed_lines, event_lines = feed.iter_lines(), events.iter_lines()
                assert next(feed_lines) == ": open"
                assert next(event_lines).startswith("id: ")
                started = time.monotonic()
                proc.signal(signal.SIGTERM)
                for lines in (feed_lines, event_lines):  # both end (else: 10 s, ReadTimeout)
                    list(lines)
                assert time.monotonic() - started < 3
            # uvicorn ends by the signal it got (-15); its supervisor, with 2, by 0
            assert proc.wait(timeout=15) in (0, -signal.SIGTERM), proc.text()
            assert time.monotonic() - started < 6
    finally:
        hub.stop()
    assert "ERROR" not in proc.text() and "Shutting down" in proc.text()


def test_serve_cuts_other_open_requests_after_the_shutdown_timeout(
    redis_url: str, namespace: str, tmp_path: Path
) -> None:
    """A request that would go on (a submit that waits for its job) holds a stopping hub up
    for EMP_SHUTDOWN_TIMEOUT_S at most."""
    hub = Cluster(redis_url, namespace, tmp_path)
    proc = hub.start_hub(EMP_SHUTDOWN_TIMEOUT_S="1")
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            body = {"job_type": "simulation", "wait": True, "timeout": 60}
            waiting = pool.submit(httpx.post, f"{hub.url}/api/jobs", json=body, timeout=30)
            eventually_sync(lambda: _busy(hub.url), what="a pending job, its submit waiting")
            started = time.monotonic()
            proc.signal(signal.SIGTERM)
            assert proc.wait(timeout=15) in (0, -signal.SIGTERM), proc.text()
            assert time.monotonic() - started < 6
            waiting.cancel()
    finally:
        hub.stop()


def _busy(url: str) -> bool:
    """Whether a submit is waiting at the hub (its job is pending)."""
    jobs = httpx.get(f"{url}/api/jobs", params={"status": "pending"}).json()["jobs"]
    return bool(jobs)
