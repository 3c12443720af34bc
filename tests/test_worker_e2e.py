"""The worker end to end: a real hub process, real `emp-worker run` processes with the
simulation plugin installed as a package, on the test's Redis-protocol server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.processes import Cluster, cluster, eventually_sync

pytestmark = [pytest.mark.slow, pytest.mark.worker]


@pytest.fixture
def hub(redis_url: str, namespace: str, tmp_path: Path) -> Iterator[Cluster]:
    """A hub process in the test's namespace (removed afterwards)."""
    with cluster(redis_url, namespace, tmp_path) as running:
        yield running


def test_one_worker_runs_jobs_in_priority_then_fifo_order(hub: Cluster) -> None:
    priorities = [0, 5, 0, 9, 5, -3, 9]
    ids = [
        hub.submit(priority=p, payload={"duration": 0.05, "n": i}) for i, p in enumerate(priorities)
    ]
    hub.start_worker("w-order")
    jobs = [hub.wait_job(job_id) for job_id in ids]
    assert {j["status"] for j in jobs} == {"completed"}
    ran = [j["job_id"] for j in sorted(jobs, key=lambda j: j["started_at"])]
    expected = [ids[i] for i in sorted(range(len(ids)), key=lambda i: (-priorities[i], i))]
    assert ran == expected
    assert jobs[0]["result"]["output"]["job_id"] == ids[0]


def test_jobs_go_only_to_matching_workers_and_customers_stay_apart(hub: Cluster) -> None:
    hub.start_worker("w-gpu", EMP_SIMULATION_MODELS="sdxl", EMP_SIMULATION_CONCURRENCY="2")
    hub.start_worker("w-plain", EMP_SIMULATION_CONCURRENCY="2")
    hub.start_worker(
        "w-acme",
        EMP_CUSTOMER_ISOLATION="strict",
        EMP_CUSTOMERS_ALLOWED="acme",
        EMP_SIMULATION_CONCURRENCY="2",
    )
    hub.wait_for_workers("w-gpu", "w-plain", "w-acme")
    fast = {"duration": 0.1}
    sdxl = [hub.submit(payload=fast, requirements={"models": ["sdxl"]}) for _ in range(4)]
    acme = [
        hub.submit(payload=fast, customer="acme", requirements={"isolation": "strict"})
        for _ in range(4)
    ]
    other = [hub.submit(payload=fast, customer="globex") for _ in range(6)]
    for job_id in sdxl:
        assert hub.wait_job(job_id)["worker_id"] == "w-gpu"
    for job_id in acme:
        assert hub.wait_job(job_id)["worker_id"] == "w-acme"
    for job_id in other:
        assert hub.wait_job(job_id)["worker_id"] in {"w-gpu", "w-plain"}


def test_kill_9_mid_job_another_worker_finishes_it_once(hub: Cluster) -> None:
    doomed = hub.start_worker("w-doomed", EMP_SIMULATION_DURATION="30")
    hub.wait_for_workers("w-doomed")
    job_id = hub.submit()
    assert hub.wait_job(job_id, {"active"})["worker_id"] == "w-doomed"
    doomed.signal(signal.SIGKILL)
    doomed.wait()
    hub.start_worker("w-rescue")
    job = hub.wait_job(job_id, timeout=30)  # after the 2 s lease ran out
    assert (job["status"], job["worker_id"], job["orphans"], job["attempt"]) == (
        "completed",
        "w-rescue",
        1,
        2,
    )
    statuses = [e["status"] for e in hub.events(job_id) if e["type"] == "status"]
    assert statuses == ["pending", "active", "pending", "active", "completed"]
    metrics = httpx.get(hub.url + "/metrics", timeout=10).text
    assert 'emp_job_attempts_finished_total{outcome="completed",service="simulation"} 1.0' in (
        metrics
    )


def test_kill_9_the_job_runs_elsewhere_after_the_grace_not_the_lease(hub: Cluster) -> None:
    assert hub.hub is not None
    hub.hub.stop()
    hub.start_hub(EMP_BROKER__LEASE_S="60", EMP_BROKER__RECONNECT_GRACE_S="1")
    doomed = hub.start_worker("w-killed", EMP_SIMULATION_DURATION="60")
    hub.wait_for_workers("w-killed")
    job_id = hub.submit()
    assert hub.wait_job(job_id, {"active"})["worker_id"] == "w-killed"
    hub.start_worker("w-spare", EMP_SIMULATION_DURATION="0.2")
    hub.wait_for_workers("w-spare")
    doomed.signal(signal.SIGKILL)
    killed_at = time.monotonic()
    job = hub.wait_job(job_id, timeout=20)
    assert (job["status"], job["worker_id"], job["orphans"]) == ("completed", "w-spare", 1)
    assert job["claimed_at"] - job["created_at"] < 20  # not the 60 s lease
    assert time.monotonic() - killed_at < 20
    assert [w["worker_id"] for w in hub.get("/api/workers")] == ["w-spare"]


def test_a_second_worker_process_with_the_same_id_exits_with_a_clear_error(
    hub: Cluster,
) -> None:
    first = hub.start_worker("w-same")
    hub.wait_for_workers("w-same")
    second = hub.start_worker("w-same-2", EMP_WORKER_ID="w-same")
    assert second.wait(30) == 2
    assert "worker id w-same is already connected" in second.text()
    assert "EMP_WORKER_ID" in second.text()
    assert first.popen.poll() is None
    job = hub.wait_job(hub.submit(payload={"duration": 0.1}))
    assert (job["status"], job["worker_id"]) == ("completed", "w-same")


def test_sigterm_idle_worker_leaves_the_worker_list_at_once(hub: Cluster) -> None:
    worker = hub.start_worker("w-leaving")
    hub.wait_for_workers("w-leaving")
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    assert hub.get("/api/workers") == []


def test_the_start_is_recorded_when_the_job_starts_and_the_end_says_completed(
    hub: Cluster,
) -> None:
    hub.start_worker(
        "w-start",
        EMP_SIMULATION_DURATION="1",
        EMP_SIMULATION_STEPS="2",
        EMP_PROGRESS_INTERVAL_S="0.3",  # the connector's own report at its start is dropped
    )
    job = hub.wait_job(hub.submit())
    progress = [e for e in hub.events(job["job_id"]) if e["type"] == "progress"]
    first = progress[0]
    assert (first["stage"], float(first["progress"]), first["message"]) == ("started", 0, "started")
    assert job["started_at"] == float(first["ts"])  # not the connector's first report
    assert (job["status"], job["message"], job["progress"]) == ("completed", "completed", 100)


def test_sigterm_mid_job_lets_it_finish_and_exits_0(hub: Cluster) -> None:
    worker = hub.start_worker("w-term", EMP_SIMULATION_DURATION="2")
    hub.wait_for_workers("w-term")
    job_id = hub.submit()
    hub.wait_job(job_id, {"active"})
    worker.signal(signal.SIGTERM)
    worker.signal(signal.SIGTERM)  # twice at once, as supervisor may: one stop
    later = hub.submit()  # while it drains: it must ask for no more work
    assert worker.popen.poll() is None, "the worker exited before its job was done"
    assert worker.wait(30) == 0
    job = hub.wait_job(job_id)
    assert (job["status"], job["worker_id"]) == ("completed", "w-term")
    assert hub.get("/api/workers") == []  # it stopped: no longer live
    untouched = hub.get(f"/api/jobs/{later}")
    assert (untouched["status"], untouched["attempt"]) == ("pending", 0), untouched


def test_a_worker_prefetches_short_jobs_and_hands_them_back_when_stopped(hub: Cluster) -> None:
    """Once its jobs prove short, a worker holds the next ones beyond its slot (at most
    EMP_PREFETCH, as many as it starts within EMP_PREFETCH_WAIT_S); on SIGTERM it finishes
    the running one and hands back those it had not started, untouched."""
    worker = hub.start_worker(
        "w-pre", EMP_SIMULATION_DURATION="0.4", EMP_PREFETCH="3", EMP_PREFETCH_WAIT_S="60"
    )
    hub.wait_job(hub.submit())  # its pace: 0.4 s a job
    ids = [hub.submit() for _ in range(6)]

    def holding() -> list[dict[str, Any]]:
        jobs = [hub.get(f"/api/jobs/{job_id}") for job_id in ids]
        held = [j for j in jobs if j["status"] == "active"]
        return held if len(held) == 4 else []  # 1 running, 3 prefetched

    held = eventually_sync(holding, what="4 jobs held", log=worker.text)
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    jobs = [hub.get(f"/api/jobs/{j['job_id']}") for j in held]
    statuses = sorted(j["status"] for j in jobs)
    assert statuses in (["completed"] + ["pending"] * 3, ["completed"] * 2 + ["pending"] * 2)
    assert all(j["failures"] == 0 and j["orphans"] == 0 for j in jobs)


def test_sigterm_hands_back_what_does_not_finish_in_time(hub: Cluster) -> None:
    worker = hub.start_worker("w-slow", EMP_SIMULATION_DURATION="60", EMP_DRAIN_TIMEOUT_S="0.5")
    hub.wait_for_workers("w-slow")
    job_id = hub.submit()
    hub.wait_job(job_id, {"active"})
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    job = hub.get(f"/api/jobs/{job_id}")
    assert (job["status"], job["failures"], job["orphans"]) == ("pending", 0, 0)


def test_cancel_mid_job_reaches_the_connector(hub: Cluster) -> None:
    worker = hub.start_worker("w-cancel", EMP_SIMULATION_DURATION="30")
    hub.wait_for_workers("w-cancel")
    job_id = hub.submit()
    hub.wait_job(job_id, {"active"})
    hub.post(f"/api/jobs/{job_id}/cancel", {"reason": "changed my mind"})
    assert hub.wait_job(job_id)["status"] == "cancelled"
    eventually_sync(
        lambda: f"job {job_id}: cancelled" in worker.text(),
        every_s=0.1,
        what="the cancel in the worker's log",
        log=worker.text,
    )
    follow_up = hub.submit(payload={"duration": 0.1})  # its slot is free again
    assert hub.wait_job(follow_up)["worker_id"] == "w-cancel"


def test_hub_restart_mid_job_the_worker_reconnects_and_completes(hub: Cluster) -> None:
    assert hub.hub is not None
    hub.hub.stop()  # a lease longer than a restart on a busy machine: the job stays held
    hub.start_hub(EMP_BROKER__LEASE_S="30")
    hub.start_worker("w-survivor", EMP_SIMULATION_DURATION="3")
    hub.wait_for_workers("w-survivor")
    job_id = hub.submit()
    hub.wait_job(job_id, {"active"})
    assert hub.hub is not None
    hub.hub.signal(signal.SIGKILL)
    hub.hub.wait()
    time.sleep(0.5)
    hub.start_hub(EMP_BROKER__LEASE_S="30")
    job = hub.wait_job(job_id, timeout=30)
    assert (job["status"], job["worker_id"], job["attempt"]) == ("completed", "w-survivor", 1)
    assert "connected to" in hub.workers["w-survivor"].text().split("hub connection:", 1)[-1]


def test_a_worker_restarted_while_the_hub_was_down_gets_its_id_back(hub: Cluster) -> None:
    """A hub killed with kill -9 never sees its workers' sockets end. A worker process that
    dies while the hub is down, started again once the hub is back, must get its id (a
    new process: after the reconnect grace at most), not be refused as a duplicate of a
    process that no longer exists (benchmarks/faults.py --hub-kills found it)."""
    first = hub.start_worker("w-phoenix")
    hub.wait_for_workers("w-phoenix")
    assert hub.hub is not None
    hub.hub.signal(signal.SIGKILL)
    hub.hub.wait()
    first.signal(signal.SIGKILL)
    first.wait()
    hub.start_hub()
    second = hub.start_worker("w-phoenix-2", EMP_WORKER_ID="w-phoenix")
    job = hub.wait_job(hub.submit(payload={"duration": 0.1}), timeout=20)
    assert (job["status"], job["worker_id"]) == ("completed", "w-phoenix"), second.text()
    assert second.popen.poll() is None, second.text()


def _plugin_project(root: Path, name: str, body: str) -> Path:
    """A plugin project folder with one module registered in the emp_worker group."""
    package = name.replace("-", "_")
    folder = root / name
    (folder / package).mkdir(parents=True)
    (folder / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""
            [build-system]
            requires = ["setuptools>=68"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "{name}"
            version = "1.2.3"

            [project.entry-points.emp_worker]
            {package} = "{package}"

            [tool.setuptools]
            packages = ["{package}"]
            """
        )
    )
    (folder / package / "__init__.py").write_text(textwrap.dedent(body))
    return folder


def _worker_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "emp_worker.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_broken_plugin_is_reported_and_the_worker_runs(hub: Cluster, tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    broken = _plugin_project(
        tmp_path / "src", "emp-broken-plugin", "raise ImportError('no GPU SDK')\n"
    )
    env = {"EMP_PLUGIN_DIR": str(plugins)}
    assert _worker_cli(env, "plugins", "install", str(broken)).returncode == 0
    listed = json.loads(_worker_cli(env, "plugins", "list", "--json").stdout)
    states = {p["name"]: (p["status"], p["error"]) for p in listed["plugins"]}
    assert states["emp-broken-plugin"] == ("error", "ImportError: no GPU SDK")
    assert states["emp-connector-simulation"][0] == "loaded"
    strict = _worker_cli({**env, "EMP_STRICT_PLUGINS": "1"}, "doctor")
    assert strict.returncode == 2 and "emp-broken-plugin failed to load" in strict.stderr
    worker = hub.start_worker("w-broken-neighbour")
    job = hub.wait_job(hub.submit(payload={"duration": 0.1}))
    assert (job["status"], job["worker_id"]) == ("completed", "w-broken-neighbour")
    assert "emp-broken-plugin failed to load" in worker.text()


def test_an_external_plugin_wheel_installed_by_the_cli_runs_a_job(
    hub: Cluster, tmp_path: Path
) -> None:
    project = _plugin_project(
        tmp_path / "src",
        "emp-connector-echo",
        """
        from emp_worker import hookimpl
        from emp_worker.connector import Connector


        class Echo(Connector):
            name = "echo"

            async def run(self, job, ctx):
                await ctx.progress(50, "echoing")
                return {"echo": job.payload}


        @hookimpl
        def register_connectors(register):
            register(Echo)
        """,
    )
    wheels = tmp_path / "wheels"
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            str(project),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    [wheel] = wheels.glob("*.whl")
    env = {"EMP_PLUGIN_DIR": str(tmp_path / "plugins")}
    installed = _worker_cli(env, "plugins", "install", str(wheel))
    assert installed.returncode == 0, installed.stderr
    listed = json.loads(_worker_cli(env, "plugins", "list", "--json").stdout)
    echo = next(p for p in listed["plugins"] if p["name"] == "emp-connector-echo")
    assert (echo["status"], echo["version"], echo["connectors"]) == ("loaded", "1.2.3", ["echo"])
    simulation = next(p for p in listed["plugins"] if p["name"] == "emp-connector-simulation")
    assert (echo["origin"], simulation["origin"]) == ("installed", "environment")
    hub.start_worker("w-echo", EMP_CONNECTORS="echo")
    job = hub.wait_job(hub.submit(job_type="echo", payload={"say": "hi"}))
    assert (job["status"], job["result"]) == ("completed", {"echo": {"say": "hi"}})
    removed = _worker_cli(env, "plugins", "uninstall", "emp-connector-echo")
    assert removed.returncode == 0, removed.stderr
    listed = json.loads(_worker_cli(env, "plugins", "list", "--json").stdout)
    assert "emp-connector-echo" not in {p["name"] for p in listed["plugins"]}


def test_outputs_are_uploaded_and_listed_in_the_result(hub: Cluster) -> None:
    hub.start_worker("w-png", EMP_SIMULATION_OUTPUT_IMAGE="1")
    job = hub.wait_job(hub.submit(payload={"duration": 0.1}))
    [ref] = job["result"]["outputs"]
    assert (ref["name"], ref["content_type"]) == ("image.png", "image/png")
    data = httpx.get(hub.url + ref["url"], timeout=10).content
    assert data.startswith(b"\x89PNG") and len(data) == ref["size"]


def test_doctor_and_version(hub: Cluster) -> None:
    # Only the simulation: other installed connectors' services do not run here.
    env = {"EMP_HUB_URL": hub.url, "EMP_PLUGIN_DIR": str(hub.tmp / "plugins")}
    env["EMP_CONNECTORS"] = "simulation"  # not other installed connectors: no service here
    healthy = _worker_cli(env, "doctor", "--json")
    assert healthy.returncode == 0, healthy.stderr
    report = json.loads(healthy.stdout)
    assert report["hub"]["ok"] and report["connectors"]["simulation"]["ok"]
    assert report["capabilities"]["services"] == ["simulation"]
    assert report["capabilities"]["cpu_cores"] >= 1
    down = _worker_cli({**env, "EMP_HUB_URL": "ws://127.0.0.1:9"}, "doctor")
    assert down.returncode == 1 and "FAILED" in down.stdout and "Traceback" not in down.stderr
    version = _worker_cli(env, "--version")
    assert version.stdout.strip().startswith("emp-worker ")


def _token(hub: Cluster, role: str) -> str:
    """A token of `role`, made with `emp-hub token create` (the hub is closed from then)."""
    env = {**os.environ, "EMP_REDIS_URL": hub.redis_url, "EMP_BROKER__NAMESPACE": hub.namespace}
    made = subprocess.run(
        [sys.executable, "-m", "emp_hub.cli", "token", "create", "--role", role],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return made.stdout.strip()


def test_doctor_checks_the_token_its_role_and_the_worker_id(hub: Cluster) -> None:
    worker_token, client_token = _token(hub, "worker"), _token(hub, "client")
    time.sleep(2.1)  # the hub notices it is no longer open
    env = {
        "EMP_HUB_URL": hub.url,
        "EMP_PLUGIN_DIR": str(hub.tmp / "plugins"),
        "EMP_CONNECTORS": "simulation",
    }
    env["EMP_WORKER_ID"] = "w-doc"
    env["EMP_CONNECTORS"] = "simulation"  # not other installed connectors: no service here

    def doctor(**more: str) -> tuple[int, str]:
        done = _worker_cli({**env, **more}, "doctor")
        assert "Traceback" not in done.stderr, done.stderr
        return done.returncode, " ".join(done.stdout.split())

    code, out = doctor()
    assert code == 1 and "token FAILED the hub needs a token" in out
    code, out = doctor(EMP_TOKEN="emp_nonsense")
    assert code == 1 and "does not know this token" in out
    code, out = doctor(EMP_TOKEN=client_token)
    assert code == 1 and "this token has role client; this route needs role" in out
    code, out = doctor(EMP_TOKEN=worker_token)
    assert code == 0, out
    assert "token ok" in out and "protocol ok" in out and "worker id ok w-doc: free" in out
    running = hub.start_worker("w-doc", EMP_TOKEN=worker_token)
    eventually_sync(
        lambda: "connected to" in running.text(), within_s=30, every_s=0.1, what="connected"
    )
    code, out = doctor(EMP_TOKEN=worker_token)
    assert code == 1 and "worker id FAILED w-doc: worker id w-doc is already connected" in out


def test_a_refused_token_is_explained_once_and_retried_slowly(hub: Cluster) -> None:
    client_token = _token(hub, "client")
    time.sleep(2.1)
    worker = hub.start_worker("w-wrong", EMP_TOKEN=client_token, EMP_AUTH_RETRY_S="60")
    eventually_sync(
        lambda: "role client" in worker.text(), within_s=20, every_s=0.1, what="the refusal"
    )
    time.sleep(1.5)  # long enough for a few quick reconnects, were there any
    log = worker.text()
    assert log.count("role client") == 1, log
    assert "set EMP_TOKEN to a token with role worker" in log
    assert "trying again in 60 s" in log and "1008" not in log
