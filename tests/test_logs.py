"""Structured logs (EMP_LOG_FORMAT): the JSON formatter and its context ids, redaction in
both formats, the hub's request ids, one line per job state change in the broker, and the
settings' checks. The real processes' logs: tests/test_logs_e2e.py."""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from emp_hub.app import HubApp, RequestId
from emp_hub.broker import Broker, JobSpec
from emp_hub.cli import main as hub_main
from emp_hub.logs import HubJsonFormatter, configure_hub_logging
from emp_protocol.capabilities import WorkerCapabilities
from emp_protocol.logs import (
    JOB_ID,
    REQUEST_ID,
    WORKER_ID,
    JsonFormatter,
    RedactingFormatter,
    configure,
    redact,
)
from emp_worker.cli import main as worker_main

SECRET = "emp_" + "T0kenValue" * 3
TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def record(
    msg: str = "hello %s",
    args: tuple[Any, ...] = ("world",),
    name: str = "emp_hub",
    level: int = logging.INFO,
    **extra: Any,
) -> logging.LogRecord:
    """A record as `logging.getLogger(name).log(level, msg, *args, extra=extra)` makes it."""
    made = logging.getLogger(name).makeRecord(name, level, __file__, 1, msg, args, None)
    made.__dict__.update(extra)
    return made


def as_json(made: logging.LogRecord, formatter: logging.Formatter | None = None) -> Any:
    line = (formatter or JsonFormatter()).format(made)
    assert "\n" not in line
    return json.loads(line)


def test_a_json_line_has_the_fields() -> None:
    line = as_json(record(level=logging.WARNING))
    assert line == {
        "ts": line["ts"],
        "level": "WARNING",
        "logger": "emp_hub",
        "message": "hello world",
    }
    assert TS.fullmatch(line["ts"]), line["ts"]


def test_the_context_ids_are_in_the_line_and_a_record_s_own_win() -> None:
    tokens = [JOB_ID.set("job-1"), WORKER_ID.set("w-1"), REQUEST_ID.set("r-1")]
    try:
        line = as_json(record())
        own = as_json(record(job_id="job-2", worker_id=None))
    finally:
        for var, token in zip((JOB_ID, WORKER_ID, REQUEST_ID), tokens, strict=True):
            var.reset(token)
    assert (line["job_id"], line["worker_id"], line["request_id"]) == ("job-1", "w-1", "r-1")
    assert (own["job_id"], own["request_id"]) == ("job-2", "r-1")
    assert "worker_id" not in own  # None: no worker involved, whatever the context says
    assert "job_id" not in as_json(record())


def test_extra_fields_are_kept_json_ready() -> None:
    line = as_json(record(state="active", attempt=2, ok=True, gone=None, obj=object(), xs=(1, 2)))
    assert (line["state"], line["attempt"], line["ok"], line["xs"]) == ("active", 2, True, [1, 2])
    assert line["obj"].startswith("<object object")
    assert "gone" not in line


def test_exceptions_are_in_exc() -> None:
    try:
        raise RuntimeError(f"boom with token={SECRET}")
    except RuntimeError:
        made = logging.getLogger("emp_hub").makeRecord(
            "emp_hub", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    line = as_json(made)
    assert line["message"] == "failed"
    assert line["exc"].startswith("Traceback")
    assert "RuntimeError: boom with token=***" in line["exc"]
    assert SECRET not in json.dumps(line)


def test_secrets_are_redacted_everywhere_in_a_json_line() -> None:
    made = record(
        "GET %s with token=%s",
        (f"/ws/worker/w1?token={SECRET}", SECRET),
        url=f"redis://:{SECRET}@host:6379/0",
        headers={"authorization": f"Bearer {SECRET}"},
        hub=[f"ws://hub?token={SECRET}"],
    )
    line = as_json(made)
    assert SECRET not in json.dumps(line)
    assert line["message"] == "GET /ws/worker/w1?token=*** with token=***"
    assert line["url"] == "redis://:***@host:6379/0"
    assert line["headers"] == {"authorization": "Bearer ***"}
    assert line["hub"] == ["ws://hub?token=***"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("GET /x?TOKEN=abc&y=1", "GET /x?TOKEN=***&y=1"),
        ("BEARER abc", "BEARER ***"),
        ("AUTHORIZATION: Basic dXNlcjpwYXNz", "AUTHORIZATION: ***"),
        ("redis://:pw@10.0.0.5:6379/0", "redis://:***@10.0.0.5:6379/0"),
        ("job job-1 assigned to w-1", "job job-1 assigned to w-1"),  # nothing to redact
    ],
)
def test_redact_in_any_case(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_the_text_format_is_redacted_traceback_included() -> None:
    try:
        raise ValueError(f"Authorization: Bearer {SECRET}")
    except ValueError:
        made = logging.getLogger("emp_worker").makeRecord(
            "emp_worker",
            logging.ERROR,
            __file__,
            1,
            "connected to %s",
            (f"ws://hub?token={SECRET}",),
            sys.exc_info(),
        )
    text = RedactingFormatter("%(levelname)s %(name)s: %(message)s").format(made)
    assert text.startswith("ERROR emp_worker: connected to ws://hub?token=***\nTraceback")
    assert SECRET not in text


def test_uvicorn_s_access_line_has_its_parts_as_fields() -> None:
    made = record(
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "GET", "/api/jobs?token=***", "1.1", 200),
        name="uvicorn.access",
    )
    line = as_json(made, HubJsonFormatter())
    assert line["message"] == '127.0.0.1:5000 - "GET /api/jobs?token=*** HTTP/1.1" 200'
    assert (line["client"], line["method"], line["path"], line["status"]) == (
        "127.0.0.1:5000",
        "GET",
        "/api/jobs?token=***",
        200,
    )


@pytest.fixture
def root_logging() -> Iterator[logging.Logger]:
    """The root logger, its handlers and level put back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)


def test_configure_writes_the_format_to_stderr(
    root_logging: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    configure("INFO", "json", "%(message)s")
    logging.getLogger("emp_worker").info("job %s: started", "job-9", extra={"event": "started"})
    logging.getLogger("emp_worker").debug("not at info")
    [line] = capsys.readouterr().err.splitlines()
    assert json.loads(line)["event"] == "started"
    configure("INFO", "text", "%(levelname)s %(name)s: %(message)s")
    logging.getLogger("emp_worker").info("to ws://hub?token=%s", SECRET)
    assert len(root_logging.handlers) == 1
    assert capsys.readouterr().err == "INFO emp_worker: to ws://hub?token=***\n"


def test_the_hub_s_uvicorn_config_per_format(root_logging: logging.Logger) -> None:
    assert configure_hub_logging("info", "text") is None  # uvicorn's own, as before
    config = configure_hub_logging("warning", "json")
    assert config is not None
    assert config["formatters"]["json"]["()"] == "emp_hub.logs.HubJsonFormatter"
    assert config["loggers"]["uvicorn.access"]["handlers"] == ["default"]  # JSON too
    assert config["root"]["level"] == logging.WARNING
    assert config["handlers"]["default"]["stream"] == "ext://sys.stderr"


# -- request ids ------------------------------------------------------------------------


async def answer_with_the_request_id(scope: Scope, receive: Receive, send: Send) -> None:
    """An ASGI app that logs a line and answers what the context's request id is."""
    logging.getLogger("emp_hub").info("handling %s", scope["path"])
    body = json.dumps({"request_id": REQUEST_ID.get()}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("abc-123", True),
        ("0f8fad5b-d9cb-469f-a165-70867728950e", True),
        ("trace:a/b+c=d@e.f_g", True),
        ("x" * 128, True),
        ("x" * 129, False),
        ("has space", False),
        ("quote\"'", False),
        ("", False),
        (None, False),
    ],
)
async def test_a_request_gets_an_id_and_it_comes_back(given: str | None, kept: bool) -> None:
    transport = httpx.ASGITransport(RequestId(answer_with_the_request_id))
    headers = {} if given is None else {"X-Request-ID": given}
    async with httpx.AsyncClient(transport=transport, base_url="http://hub") as http:
        response = await http.get("/api/x", headers=headers)
    returned = response.headers["x-request-id"]
    assert response.json() == {"request_id": returned}
    if kept:
        assert returned == given
    else:
        assert re.fullmatch(r"[0-9a-f]{16}", returned), returned
    assert REQUEST_ID.get() is None  # reset after the request


async def test_an_error_answer_carries_the_request_id_too() -> None:
    """RequestId is outside all of the app's middleware: the 500 that Starlette's
    outermost one makes of an exception carries the id as well."""
    app = HubApp()

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    transport = httpx.ASGITransport(app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://hub") as http:
        response = await http.get("/boom", headers={"X-Request-ID": "r-500"})
    assert (response.status_code, response.headers["x-request-id"]) == (500, "r-500")


# -- job state changes ------------------------------------------------------------------


class Lines(logging.Handler):
    """The JSON lines of one logger, formatted as they are logged (in their context)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter())
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))

    def of(self, job_id: str) -> list[dict[str, Any]]:
        """The lines of one job."""
        return [line for line in self.lines if line.get("job_id") == job_id]


@pytest.fixture
def jobs_log() -> Iterator[Lines]:
    """The state-change lines (emp_hub.jobs) logged during the test, at INFO."""
    logger, handler = logging.getLogger("emp_hub.jobs"), Lines()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.mark.broker
async def test_every_state_change_is_one_line(broker: Broker, jobs_log: Lines) -> None:
    sim = WorkerCapabilities(services={"sim"})
    await broker.submit(JobSpec(service="sim", id="job-a"))
    [claim] = await broker.claim_many("w-1", sim, 1)
    context = WORKER_ID.set("w-1")  # as the worker's connection sets it
    try:
        await broker.fail("job-a", claim.token, "oops", retryable=False)
    finally:
        WORKER_ID.reset(context)
    await broker.retry("job-a")
    [claim] = await broker.claim_many("w-2", sim, 1)
    await broker.release("job-a", claim.token)
    [claim] = await broker.claim_many("w-2", sim, 1)
    await broker.complete("job-a", claim.token, {"ok": True})
    await broker.submit(JobSpec(service="sim", id="job-b"))
    await broker.cancel("job-b", "not needed")
    seen = [
        (c["event"], c.get("old_state"), c["state"], c.get("worker_id"))
        for c in jobs_log.of("job-a")
    ]
    assert seen == [
        ("submitted", None, "pending", None),
        ("assigned", "pending", "active", "w-1"),
        ("failed: dead-lettered", "active", "failed", "w-1"),
        ("retried by hand", None, "pending", None),
        ("assigned", "pending", "active", "w-2"),
        ("released", "active", "pending", None),
        ("assigned", "pending", "active", "w-2"),
        ("completed", "active", "completed", None),
    ]
    assert [(c["event"], c.get("old_state"), c["state"]) for c in jobs_log.of("job-b")] == [
        ("submitted", None, "pending"),
        ("cancelled", "pending", "cancelled"),
    ]
    assert jobs_log.of("job-a")[0]["message"] == "job job-a submitted"


@pytest.mark.broker
async def test_a_job_requeued_after_its_worker_was_lost_is_one_line(
    broker: Broker, clock: Any, jobs_log: Lines
) -> None:
    sim = WorkerCapabilities(services={"sim"})
    await broker.submit(JobSpec(service="sim", id="job-l"))
    await broker.claim_many("w-lost", sim, 1)
    clock.advance(broker.settings.lease_s + 1)
    context = WORKER_ID.set("w-other")  # the pass may run where another worker is known
    try:
        await broker.maintain()
    finally:
        WORKER_ID.reset(context)
    last = jobs_log.of("job-l")[-1]
    assert (last["event"], last["old_state"], last["state"]) == (
        "requeued: its worker was lost",
        "active",
        "pending",
    )
    assert "worker_id" not in last


@pytest.mark.broker
async def test_no_line_when_the_level_is_above_info(broker: Broker, jobs_log: Lines) -> None:
    logging.getLogger("emp_hub.jobs").setLevel(logging.WARNING)
    await broker.submit(JobSpec(service="sim", id="job-q"))
    assert jobs_log.of("job-q") == []


# -- the settings -----------------------------------------------------------------------


def test_the_hub_refuses_an_unknown_format(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EMP_LOG_FORMAT", "xml")
    assert hub_main(["serve"]) == 2
    assert "EMP_LOG_FORMAT\n  Input should be 'text' or 'json'" in capsys.readouterr().err


def test_the_worker_refuses_an_unknown_format(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EMP_LOG_FORMAT", "xml")
    with pytest.raises(SystemExit) as exit_:
        worker_main(["plugins", "list"])
    assert exit_.value.code == 2
    assert "EMP_LOG_FORMAT must be text or json, not 'xml'" in capsys.readouterr().err
    monkeypatch.delenv("EMP_LOG_FORMAT")
    with pytest.raises(SystemExit) as exit_:
        worker_main(["--log-format", "xml", "plugins", "list"])
    assert exit_.value.code == 2
    assert "invalid choice: 'xml'" in capsys.readouterr().err
