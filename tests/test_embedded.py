"""The embedded Valkey a hub runs when no EMP_REDIS_URL is set: private files and a
password, one server per data directory (locked), restarted by the hub when it dies."""

from __future__ import annotations

import logging
import os
import signal
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import redis.exceptions

from emp_hub.cli import main
from emp_hub.embedded import EmbeddedValkey
from emp_hub.hub import open_hub
from emp_hub.logs import redact
from emp_hub.settings import HubSettings
from tests.processes import Cluster, eventually_sync, spawn

pytestmark = pytest.mark.slow


def mode(path: Path) -> int:
    """The permission bits of a file or directory."""
    return stat.S_IMODE(path.stat().st_mode)


def server_pid(data_dir: Path) -> int:
    """The pid of the Valkey running on `data_dir` (asked with the URL its owner wrote)."""
    url = (data_dir / "url").read_text().strip()
    with redis.Redis.from_url(url) as client:
        return int(client.info("server")["process_id"])


@pytest.fixture
def embedded_hub(tmp_path: Path, namespace: str) -> Iterator[Cluster]:
    """`emp-hub serve` with no EMP_REDIS_URL: its own embedded Valkey in tmp_path/data."""
    hub = Cluster("", namespace, tmp_path)
    hub.start_hub(EMP_DATA_DIR=str(tmp_path / "data"))
    try:
        yield hub
    finally:
        hub.stop()


# -- item: files and password -----------------------------------------------------------


def test_files_are_private_and_the_server_wants_its_password(tmp_path: Path) -> None:
    data = tmp_path / "valkey"
    data.mkdir(mode=0o755)
    (data / "valkey.log").write_text("from an older version\n")
    os.chmod(data / "valkey.log", 0o644)
    umask = os.umask(0o022)
    os.umask(umask)
    server = EmbeddedValkey(data)
    url = server.start()
    try:
        assert os.umask(umask) == umask  # this process's umask is left alone
        password = (data / "password").read_text().strip()
        assert len(password) >= 32
        assert url == f"redis://:{password}@127.0.0.1:{server.port}/0"
        with redis.Redis.from_url(url) as client:
            client.set("k", "v")
        with (
            redis.Redis(port=server.port) as anonymous,
            pytest.raises(redis.exceptions.AuthenticationError),
        ):
            anonymous.get("k")  # NOAUTH
        entries = [data, *data.rglob("*")]
        assert {p.name for p in entries} >= {"password", "lock", "url", "valkey.conf"}
        assert any(p.parent.name == "appendonlydir" for p in entries)
        for path in entries:
            assert mode(path) == (0o700 if path.is_dir() else 0o600), path
        server.stop()
        assert server.start() == url  # the same password (and port) after a restart
        with redis.Redis.from_url(url) as client:
            assert client.get("k") == b"v"
    finally:
        server.stop()


def test_redact_hides_passwords() -> None:
    assert redact("redis://:s3cret@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"
    assert redact("rediss://user:s3cret@host/1") == "rediss://user:***@host/1"
    assert redact("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


async def test_the_hub_runs_on_it_and_never_logs_the_password(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    settings = HubSettings(redis_url=None, data_dir=tmp_path / "data")
    async with open_hub(settings) as hub:
        assert await hub.redis.ping()
        password = (tmp_path / "data" / "valkey" / "password").read_text().strip()
    assert "an embedded Valkey at redis://:***@127.0.0.1:" in caplog.text
    assert f"keeps the data in {tmp_path / 'data' / 'valkey'}" in caplog.text
    assert password not in caplog.text
    assert mode(tmp_path / "data") == 0o700


# -- item: supervision ------------------------------------------------------------------


def test_a_killed_embedded_valkey_is_restarted(embedded_hub: Cluster, tmp_path: Path) -> None:
    data = tmp_path / "data" / "valkey"
    job_id = embedded_hub.submit()
    time.sleep(1.5)  # AOF: fsync every second
    pid = server_pid(data)
    os.kill(pid, signal.SIGKILL)

    def back() -> httpx.Response | None:
        try:
            response = httpx.get(f"{embedded_hub.url}/api/jobs/{job_id}", timeout=10)
        except httpx.TransportError:
            return None
        return response if response.status_code == 200 else None

    response = eventually_sync(back, every_s=0.1, what="the hub back")
    assert response.json()["status"] == "pending"
    assert server_pid(data) != pid
    embedded_hub.submit()
    assert embedded_hub.hub is not None
    log = embedded_hub.hub.text()
    assert "embedded Valkey exited (code -9); restarting" in log
    assert (data / "password").read_text().strip() not in log


# -- item: one server per data directory ------------------------------------------------


def test_a_second_hub_on_the_same_data_dir_is_refused(
    embedded_hub: Cluster, tmp_path: Path
) -> None:
    assert embedded_hub.hub is not None
    second = spawn(
        ["emp_hub.cli", "serve", "--port", "0"],
        {**embedded_hub.hub_env, "EMP_PORT": "0"},
        tmp_path / "second.log",
    )
    assert second.wait(30) != 0
    [line] = second.text().strip().splitlines()
    assert str(tmp_path / "data" / "valkey") in line
    assert f"process {embedded_hub.hub.popen.pid}" in line
    assert "EMP_DATA_DIR" in line and "EMP_REDIS_URL" in line
    embedded_hub.submit()  # the first is untouched


def no_redis_url(monkeypatch: pytest.MonkeyPatch, data_dir: Path, namespace: str) -> None:
    """The environment of `emp-hub token ...` on the embedded server of `data_dir`."""
    monkeypatch.delenv("EMP_REDIS_URL", raising=False)
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("EMP_DATA_DIR", str(data_dir))
    monkeypatch.setenv("EMP_BROKER__NAMESPACE", namespace)


def test_token_commands_use_the_running_hubs_server(
    embedded_hub: Cluster,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    no_redis_url(monkeypatch, tmp_path / "data", embedded_hub.namespace)
    assert main(["token", "create", "--role", "client", "--name", "beside"]) == 0
    token = capsys.readouterr().out.strip()
    assert main(["token", "list"]) == 0
    assert "beside" in capsys.readouterr().out
    eventually_sync(  # the hub notices its first token within 2 s
        lambda: httpx.get(f"{embedded_hub.url}/api/jobs").status_code == 401,
        every_s=0.1,
        what="401 without a token",
    )
    auth = {"Authorization": f"Bearer {token}"}
    assert httpx.get(f"{embedded_hub.url}/api/jobs", headers=auth).status_code == 200


def test_token_commands_without_a_hub_start_the_server_briefly(
    tmp_path: Path,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    no_redis_url(monkeypatch, tmp_path / "data", namespace)
    assert main(["token", "create", "--role", "admin"]) == 0
    token = capsys.readouterr().out.strip()
    assert not (tmp_path / "data" / "valkey" / "url").exists()  # stopped again

    hub = Cluster("", namespace, tmp_path)
    hub.start_hub(EMP_DATA_DIR=str(tmp_path / "data"))  # the lock is free again
    try:
        assert httpx.get(f"{hub.url}/api/jobs").status_code == 401
        auth = {"Authorization": f"Bearer {token}"}
        assert httpx.get(f"{hub.url}/api/jobs", headers=auth).status_code == 200
    finally:
        hub.stop()


def test_a_killed_hubs_orphan_server_is_stopped_by_the_next_hub(
    embedded_hub: Cluster, tmp_path: Path
) -> None:
    """A hub killed with SIGKILL leaves its Valkey running; the next hub on the directory
    shuts that one down (it never runs a second server on the same AOF files)."""
    data = tmp_path / "data" / "valkey"
    job_id = embedded_hub.submit()
    orphan = server_pid(data)
    assert embedded_hub.hub is not None
    embedded_hub.hub.signal(signal.SIGKILL)
    embedded_hub.hub.wait()
    embedded_hub.start_hub(EMP_DATA_DIR=str(tmp_path / "data"))
    assert server_pid(data) != orphan
    eventually_sync(
        lambda: not Path(f"/proc/{orphan}").exists() or "Z" in proc_state(orphan),
        every_s=0.1,
        what="the orphan gone",
    )
    assert embedded_hub.get(f"/api/jobs/{job_id}")["status"] == "pending"


def proc_state(pid: int) -> str:
    """The state letter of a process (Z: exited, not yet reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return "Z"
