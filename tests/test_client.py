"""The Python client and the emp CLI against the real hub."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import httpx
import pytest
import redis.asyncio

from emp_client import AuthError, Client, HubUnreachable, JobNotFound, Rejected
from emp_client.cli import main
from emp_hub.auth import Role, TokenStore
from emp_hub.broker import Broker, BrokerSettings
from emp_hub.embedded import free_port
from emp_hub.settings import HubSettings
from emp_protocol.capabilities import WorkerCapabilities
from emp_worker.testing import eventually
from tests.hub_server import running_hub

pytestmark = pytest.mark.hub

SIM = WorkerCapabilities(services={"sim"})


@pytest.fixture
def hub_settings(redis_url: str, namespace: str, redis_client: redis.asyncio.Redis) -> HubSettings:
    return HubSettings(redis_url=redis_url, broker=BrokerSettings(namespace=namespace))


async def work_one(broker: Broker, *, fail: bool = False) -> str:
    """Play a worker: claim the next job, report progress, finish it."""
    claim = await eventually(lambda: broker.claim("w1", SIM), within_s=6, what="a job to claim")
    for p in (25, 50, 75):
        await broker.progress(claim.job.id, claim.token, p, f"step {p}")
        await asyncio.sleep(0.02)
    if fail:
        await broker.fail(claim.job.id, claim.token, "bad prompt", retryable=False)
    else:
        await broker.complete(claim.job.id, claim.token, {"image": "out.png"})
    return claim.job.id


@pytest.mark.slow
async def test_client_round_trip(
    base_url: str, hub_settings: HubSettings, redis_client: redis.asyncio.Redis
) -> None:
    broker = Broker(redis_client, hub_settings.broker)
    async with Client(base_url) as emp:
        job_id = await emp.submit("sim", {"prompt": "a cat"}, priority=4)
        assert (await emp.get(job_id))["status"] == "pending"
        worker = asyncio.create_task(work_one(broker))
        events = [e async for e in emp.events(job_id)]
        assert [e.get("status") or e["progress"] for e in events] == [
            "pending",
            "active",
            25,
            50,
            75,
            "completed",
        ]
        assert all(e["id"] for e in events)
        await worker
        job = await emp.wait(job_id)
        assert job["result"] == {"image": "out.png"}
        assert [j["job_id"] for j in (await emp.jobs(status="completed"))["jobs"]] == [job_id]
        with pytest.raises(JobNotFound, match="nope"):
            await emp.get("nope")
        with pytest.raises(Rejected, match="priority"):
            await emp.submit("sim", priority=5000)
        failing = await emp.submit("sim")
        await work_one(broker, fail=True)
        assert (await emp.retry(failing))["status"] == "pending"
        assert (await emp.cancel(failing))["previous_status"] == "pending"
        assert (await emp.queues())["pending"] == 0


async def test_client_errors_are_friendly(
    hub_settings: HubSettings, redis_client: redis.asyncio.Redis, namespace: str
) -> None:
    async with Client("http://127.0.0.1:1") as emp:
        with pytest.raises(HubUnreachable, match=r"cannot reach the hub at http://127\.0\.0\.1:1"):
            await emp.get("x")
    await TokenStore(redis_client, namespace).create(Role.ADMIN)
    async with running_hub(hub_settings) as url, Client(url, token="emp_wrong") as emp:
        with pytest.raises(AuthError, match="invalid token"):
            await emp.submit("sim")


@pytest.mark.slow
async def test_cli(
    base_url: str,
    hub_settings: HubSettings,
    redis_client: redis.asyncio.Redis,
    capsys: pytest.CaptureFixture[str],
) -> None:
    broker = Broker(redis_client, hub_settings.broker)

    def emp(*args: str) -> int:
        return main(["--hub", base_url, *args])

    assert await asyncio.to_thread(emp, "submit", "sim", "--payload", '{"n": 1}') == 0
    job_id = capsys.readouterr().out.strip()
    assert job_id.startswith("job-rest-")
    assert await asyncio.to_thread(emp, "status", job_id) == 0
    assert "pending" in capsys.readouterr().out
    assert await asyncio.to_thread(emp, "cancel", job_id) == 0
    assert "was pending" in capsys.readouterr().out

    worker = asyncio.create_task(work_one(broker))
    assert await asyncio.to_thread(emp, "submit", "sim", "--wait", "--priority", "9") == 0
    await worker
    out = capsys.readouterr().out
    assert "completed" in out and "100%" in out and '"image": "out.png"' in out

    assert await asyncio.to_thread(emp, "jobs", "--status", "completed") == 0
    assert "completed" in capsys.readouterr().out
    assert await asyncio.to_thread(emp, "queues") == 0
    assert await asyncio.to_thread(emp, "workers") == 0
    capsys.readouterr()
    assert await asyncio.to_thread(emp, "status", "nope") == 1
    assert "emp: Job with ID nope not found" in capsys.readouterr().err
    assert await asyncio.to_thread(main, ["--hub", "http://127.0.0.1:1", "jobs"]) == 1
    assert "cannot reach the hub" in capsys.readouterr().err
    assert await asyncio.to_thread(emp, "submit", "sim", "--payload", "[1]") == 2
    assert "is a JSON array, not an object" in capsys.readouterr().err


@pytest.mark.slow
async def test_a_waiting_job_says_why_no_worker_can_run_it(
    base_url: str,
    hub_settings: HubSettings,
    redis_client: redis.asyncio.Redis,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broker = Broker(redis_client, hub_settings.broker)
    await broker.register_worker("w-simulation", WorkerCapabilities(services={"simulation"}))
    why = "no live worker offers service 'sim' (the 1 live worker(s) offer: simulation)"
    async with httpx.AsyncClient(base_url=base_url) as http:
        # Registered as if through another replica: this one's view of the live workers
        # may lag by live_cache_s (the alerts read it at start); GET /api/workers reads it.
        listed = (await http.get("/api/workers")).json()
        assert [w["worker_id"] for w in listed] == ["w-simulation"]
        submitted = (await http.post("/api/jobs", json={"job_type": "sim"})).json()
        assert submitted["unschedulable"] == why
        job = (await http.get(f"/api/jobs/{submitted['job_id']}")).json()
        assert job["unschedulable"] == why
        waited = await http.post(
            "/api/jobs", json={"job_type": "sim", "wait": True, "timeout": 0.3}
        )
        assert (waited.json()["status"], waited.json()["unschedulable"]) == ("pending", why)
        fine = await http.post("/api/jobs", json={"job_type": "simulation"})
        assert fine.json()["unschedulable"] is None
    await broker.cancel(submitted["job_id"])
    await broker.cancel(waited.json()["job_id"])
    await broker.cancel(fine.json()["job_id"])

    monkeypatch.setattr("emp_client.cli.WAITING_CHECK_S", 0.1)

    async def late_worker() -> str:
        await asyncio.sleep(1)  # the CLI says why it waits meanwhile
        return await work_one(broker)

    worker = asyncio.create_task(late_worker())
    cli = ["--hub", base_url, "submit", "sim", "--wait"]
    assert await asyncio.to_thread(main, cli) == 0
    await worker
    out = capsys.readouterr().out
    assert f"waits: {why}" in " ".join(out.split()) and "completed" in out


# -- the emp command, run as a user runs it -----------------------------------------------
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


async def run_emp(*args: str, token: str | None = None) -> tuple[int, str, str]:
    """Run `emp ARGS` in a child process (the hub keeps serving meanwhile): its exit
    status, stdout and stderr."""
    env = {k: v for k, v in os.environ.items() if k not in ("EMP_HUB_URL", "EMP_TOKEN")}
    if token:
        env["EMP_TOKEN"] = token
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "emp_client.cli",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def one_line(err: str) -> str:
    """The error, checked to be one line that starts with 'emp' and has no traceback."""
    assert "Traceback" not in err, err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("emp"), err
    return err.strip()


@pytest.mark.slow
async def test_cli_usage_errors_are_one_line_and_exit_2(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{oops")
    (tmp_path / "list.json").write_text("[1, 2]")
    hub = ["--hub", "http://127.0.0.1:1"]  # never reached: usage is checked first
    cases = {
        (
            "submit",
            "sim",
            "--payload",
            "@missing.json",
        ): "emp: --payload @missing.json: no such file",
        ("submit", "sim", "--payload", "not json"): (
            "emp: --payload is not JSON: Expecting value at line 1 column 1; "
            "give a JSON object or @file.json"
        ),
        ("submit", "sim", "--payload", f"@{tmp_path}/bad.json"): (
            f"emp: --payload @{tmp_path}/bad.json is not JSON: Expecting property name enclosed "
            "in double quotes at line 1 column 2; give a JSON object or @file.json"
        ),
        ("submit", "sim", "--payload", f"@{tmp_path}/list.json"): (
            f"emp: --payload @{tmp_path}/list.json is a JSON array, not an object; "
            "give a JSON object or @file.json"
        ),
        ("submit", "sim", "--payload", f"@{tmp_path}"): (
            f"emp: --payload @{tmp_path}: cannot read it (Is a directory)"
        ),
        ("submit", "sim", "--requirements", "7"): (
            "emp: --requirements is a JSON number, not an object; give a JSON object or @file.json"
        ),
        ("submit", "sim", "--priority", "high"): (
            "emp submit: argument --priority: invalid int value: 'high'; see emp submit --help"
        ),
        ("submit",): (
            "emp submit: the following arguments are required: service; see emp submit --help"
        ),
        (): "emp: the following arguments are required: command; see emp --help",
        ("--hub", "127.0.0.1:8001", "jobs"): (
            "emp: the hub URL 127.0.0.1:8001 is not a URL like http://127.0.0.1:8001; "
            "set EMP_HUB_URL or --hub to the hub's URL"
        ),
        ("--hub", "http://[::1", "jobs"): (
            "emp: the hub URL http://[::1 is not a URL like http://127.0.0.1:8001; "
            "set EMP_HUB_URL or --hub to the hub's URL"
        ),
    }
    for args, message in cases.items():
        code, out, err = await run_emp(*hub, *args)
        assert (code, out, one_line(err)) == (2, "", message), args


@pytest.mark.slow
async def test_cli_failed_operations_say_what_to_do_and_exit_1(
    hub_settings: HubSettings, redis_client: redis.asyncio.Redis, namespace: str, tmp_path: Path
) -> None:
    code, _, err = await run_emp("--hub", "http://127.0.0.1:1", "jobs")
    assert code == 1
    assert one_line(err).startswith("emp: cannot reach the hub at http://127.0.0.1:1 (")
    assert err.strip().endswith("; is it running there? set EMP_HUB_URL or --hub to its URL")

    tokens = TokenStore(redis_client, namespace)
    admin = await tokens.create(Role.ADMIN)
    client = await tokens.create(Role.CLIENT)
    async with running_hub(hub_settings) as url:
        code, _, err = await run_emp("--hub", url, "submit", "sim")
        assert code == 1
        assert one_line(err) == (
            f"emp: the hub at {url} refused the token: missing token; set EMP_TOKEN or "
            "--token to a token it issued (emp-hub token create --role client)"
        )
        code, _, err = await run_emp("--hub", url, "submit", "sim", token="emp_wrong")
        assert code == 1
        assert one_line(err).startswith(f"emp: the hub at {url} refused the token: invalid token;")
        code, _, err = await run_emp("--hub", url, "queues", token=client)
        assert code == 1
        assert one_line(err) == (
            f"emp: the hub at {url} refused the token: this needs a token with role admin, "
            "monitor; set EMP_TOKEN or --token to a token with that role"
        )
        code, _, err = await run_emp("--hub", url, "status", "job-nope", token=admin)
        assert code == 1
        assert one_line(err) == (
            "emp: Job with ID job-nope not found; `emp jobs` lists the jobs this token can see"
        )
        code, _, err = await run_emp("--hub", url, "retry", "job-nope", token=admin)
        assert (code, one_line(err)[:27]) == (1, "emp: Job with ID job-nope n")

    # a URL that answers, but not as a hub does (here: a plain web server's file)
    (tmp_path / "api").mkdir()
    (tmp_path / "api" / "queues").write_text("<html>sign in</html>")
    port = free_port()
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
        cwd=tmp_path, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        web = f"http://127.0.0.1:{port}"

        async def reached() -> tuple[int, str, str] | None:
            answer = await run_emp("--hub", web, "queues")
            return None if "cannot reach" in answer[2] else answer

        code, _, err = await eventually(reached, within_s=30, what="the web server up")
        assert code == 1
        assert one_line(err) == (
            f"emp: {web} did not answer GET /api/queues as an emp hub does "
            "(application/octet-stream, not JSON); is it running there? set EMP_HUB_URL or "
            "--hub to its URL"
        )
    finally:
        server.terminate()
        await server.wait()


def run_in_terminal(args: list[str], columns: int) -> str:
    """Run a command with a terminal `columns` wide as its stdout; what it printed, without
    colours."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = {**os.environ, "COLUMNS": str(columns), "TERM": "xterm-256color"}
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    chunks = []
    with contextlib.suppress(OSError):  # EIO once the child has closed the terminal
        while chunk := os.read(master, 65536):
            chunks.append(chunk)
    os.close(master)
    assert proc.wait(30) == 0, b"".join(chunks)
    return ANSI.sub("", b"".join(chunks).decode())


@pytest.mark.slow
async def test_cli_tables_never_cut_job_ids(base_url: str) -> None:
    async with Client(base_url) as emp:
        ids = [await emp.submit("sim", priority=p) for p in (1, 2)]
        ids.append(await emp.submit("sim", job_id="a-job-id-of-my-own-that-is-long-" + "x" * 30))

    code, out, err = await run_emp("--hub", base_url, "jobs")  # piped: plain columns
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == ["job", "status", "service", "priority", "progress", "worker"]
    assert sorted(line.split()[0] for line in lines[1:]) == sorted(ids)

    cli = [sys.executable, "-m", "emp_client.cli", "--hub", base_url]
    for columns in (80, 200):  # too narrow for the table: plain lines; wide: the table
        shown = await asyncio.to_thread(run_in_terminal, [*cli, "jobs"], columns)
        assert ("┃ job" in shown) is (columns == 200), shown
        for job_id in ids:
            assert job_id in shown, shown

    code, out, err = await run_emp("--hub", base_url, "queues")
    assert (code, err) == (0, "")
    header, row = out.splitlines()[:2]
    assert re.split(r"\s{2,}", header.strip()) == [
        "service",
        "pending",
        "by priority",
        "workers",
        "state",
    ]
    assert row.split()[-1] == "unschedulable"
    shown = await asyncio.to_thread(run_in_terminal, [*cli, "queues"], 80)
    assert "┃ state " in shown and "│ unschedulable │" in shown, shown
