"""`emp-worker supervisor-config` and the real supervisord: one program per GPU, a stop
drains the running job and exits 0, a crashed worker is restarted, nothing is left behind.

The programs run a stand-in for the single-file binary that, like PyInstaller's onefile
launcher, runs the worker as a child and forwards signals to it: with `stopasgroup` the
worker gets the TERM twice (from supervisord and from the launcher)."""

from __future__ import annotations

import configparser
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from emp_worker import hardware
from emp_worker.supervisor import load_env_file
from tests.processes import Cluster, cluster, eventually_sync
from tests.shipping import (
    BIN,
    children,
    fake_worker_binary,
    processes_mentioning,
    supervisord,
)

pytestmark = [pytest.mark.slow, pytest.mark.worker]


def supervisor_config(*args: str, env: dict[str, str] | None = None) -> str:
    """`emp-worker supervisor-config ARGS`: what it printed."""
    done = subprocess.run(
        [str(BIN / "emp-worker"), "supervisor-config", *args],
        capture_output=True,
        text=True,
        env=env or clean_env(),
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without EMP_* settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith("EMP_")} | extra


def parse(text: str) -> configparser.RawConfigParser:
    config = configparser.RawConfigParser()
    config.read_string(text)
    return config


def environment(value: str) -> dict[str, str]:
    """supervisord's `environment=K="v",K2="v2"`."""
    pairs = [item.split("=", 1) for item in value.split('",')]
    return {k: v.strip('"') for k, v in pairs}


def test_one_program_per_gpu_with_its_own_gpu_and_id(tmp_path: Path) -> None:
    env_file = tmp_path / "worker.env"
    env_file.write_text("# shared settings\nEMP_HUB_URL=ws://hub:8001\nEMP_DRAIN_TIMEOUT='100'\n")
    text = supervisor_config(
        "--gpus", "0,1", "--env-file", str(env_file), "--binary", "/opt/emp/bin/emp-worker",
        "--log-dir", str(tmp_path / "log"), "--run-dir", str(tmp_path / "run"), "--id-prefix", "m1",
    )  # fmt: skip
    config = parse(text)
    assert config.get("group:emp", "programs") == "gpu0,gpu1"
    for index in (0, 1):
        program = config[f"program:gpu{index}"]
        assert program["command"] == "/opt/emp/bin/emp-worker run"
        assert environment(program["environment"]) == {
            "EMP_ENV_FILE": str(env_file),
            "EMP_GPU_INDEX": str(index),
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            "CUDA_VISIBLE_DEVICES": str(index),
            "EMP_WORKER_ID": f"m1-gpu{index}",
        }
        assert int(program["stopwaitsecs"]) > 100  # the env file's drain timeout, and more
        assert (program["stopsignal"], program["stopasgroup"], program["killasgroup"]) == (
            "TERM", "true", "true",
        )  # fmt: skip
        # A crash is restarted; exit 0 (a shutdown asked through the hub) is not.
        assert (program["autorestart"], program["exitcodes"]) == ("unexpected", "0")
        assert int(program["startretries"]) == 10
        assert program["stdout_logfile"] == str(tmp_path / "log" / f"gpu{index}.log")
        assert program["stdout_logfile_maxbytes"] == "50MB"
        assert int(program["stdout_logfile_backups"]) == 5
    assert config.get("unix_http_server", "file") == str(tmp_path / "run" / "supervisor.sock")
    # The environment beats the env file, as it beats the TOML file.
    later = parse(
        supervisor_config(
            "--gpus", "3", "--env-file", str(env_file), env=clean_env(EMP_DRAIN_TIMEOUT_S="500")
        )
    )  # fmt: skip
    assert int(later.get("program:gpu3", "stopwaitsecs")) > 500
    assert not later.has_section("program:gpu0")


def test_without_a_gpu_one_cpu_worker_and_nvml_decides_by_default() -> None:
    config = parse(supervisor_config("--gpus", "none", "--programs-only", "--id-prefix", "box"))
    assert config.sections() == ["group:emp", "program:cpu"]
    env = environment(config.get("program:cpu", "environment"))
    assert env == {"EMP_WORKER_ID": "box-cpu"}
    assert int(config.get("program:cpu", "stopwaitsecs")) > 60  # the default drain timeout
    found = len(hardware.gpus())  # none here; a GPU machine gets one program per GPU
    programs = parse(supervisor_config()).get("group:emp", "programs")
    assert programs == (",".join(f"gpu{i}" for i in range(found)) if found else "cpu")


def test_bad_gpu_lists_and_env_files_are_refused(tmp_path: Path) -> None:
    for spec in ("0,x", "1,1", "-1"):
        done = subprocess.run(
            [str(BIN / "emp-worker"), "supervisor-config", f"--gpus={spec}"],
            capture_output=True, text=True, env=clean_env(), check=False,
        )  # fmt: skip
        assert done.returncode == 2 and "--gpus" in done.stderr, done.stderr
    bad = tmp_path / "bad.env"
    bad.write_text("EMP_HUB_URL ws://x\n")
    done = subprocess.run(
        [str(BIN / "emp-worker"), "doctor"],
        capture_output=True, text=True, env=clean_env(EMP_ENV_FILE=str(bad)), check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert f"EMP_ENV_FILE: {bad}:1: expected KEY=VALUE" in done.stderr


@pytest.fixture
def hub(redis_url: str, namespace: str, tmp_path: Path) -> Iterator[Cluster]:
    with cluster(redis_url, namespace, tmp_path) as running:
        yield running


def test_stop_signals_that_keep_coming_while_it_exits_leave_the_exit_status_0(
    hub: Cluster,
) -> None:
    """A launcher's copy of the TERM can arrive after the worker's drain is over, while it
    exits: that copy must not kill it."""
    worker = hub.start_worker("w-terms")
    hub.wait_for_workers("w-terms")
    while worker.popen.poll() is None:
        worker.signal(signal.SIGTERM)
        time.sleep(0.01)
    assert worker.wait() == 0, worker.text()


@pytest.mark.timeout(240)
def test_under_supervisord_stop_drains_a_crash_restarts_nothing_is_left(
    hub: Cluster, tmp_path: Path
) -> None:
    binary = fake_worker_binary(tmp_path / "bin" / "emp-worker", "release-1")
    env_file = tmp_path / "worker.env"
    env_file.write_text(
        f"EMP_HUB_URL=ws://127.0.0.1:{hub.port}\n"
        "EMP_CONNECTORS=simulation\n"
        f"EMP_PLUGIN_DIR={tmp_path / 'plugins'}\n"
        "EMP_SIMULATION_DURATION=3\nEMP_SIMULATION_STEPS=3\n"
        "EMP_HEARTBEAT_S=0.5\nEMP_RECONNECT_MAX=1\nEMP_DRAIN_TIMEOUT=30\n"
    )
    config, log_dir = tmp_path / "supervisord.conf", tmp_path / "log"
    supervisor_config(
        "--gpus", "0,1", "--binary", str(binary), "--env-file", str(env_file),
        "--log-dir", str(log_dir), "--run-dir", str(tmp_path / "run"), "--id-prefix", "sv",
        "-o", str(config),
    )  # fmt: skip
    with supervisord(config, log_dir, clean_env()) as sv:
        sv.wait_states({"emp:gpu0": "RUNNING", "emp:gpu1": "RUNNING"})
        hub.wait_for_workers("sv-gpu0", "sv-gpu1")
        tags = {w["worker_id"]: w["capabilities"]["tags"] for w in hub.get("/api/workers")}
        assert tags == {"sv-gpu0": ["release-1"], "sv-gpu1": ["release-1"]}

        job_id = hub.submit()
        busy = hub.wait_job(job_id, {"active"})["worker_id"]
        program = "emp:gpu0" if busy == "sv-gpu0" else "emp:gpu1"
        other = "emp:gpu1" if program == "emp:gpu0" else "emp:gpu0"
        stopped = sv.ctl("stop", program)  # returns once the worker has exited
        assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped
        job = hub.get(f"/api/jobs/{job_id}")
        assert (job["status"], job["worker_id"]) == ("completed", busy)
        name = program.split(":")[1]
        assert f"stopped: {name} (exit status 0)" in (log_dir / "supervisord.log").read_text()
        assert (
            "stopping: no new jobs; 1 running may finish" in (log_dir / f"{name}.log").read_text()
        )

        # A crash: the worker process (the launcher's child) killed; supervisord restarts it.
        launcher = sv.pid(other)
        [worker] = children(launcher)
        os.kill(worker, signal.SIGKILL)
        eventually_sync(
            lambda: sv.ctl("pid", other).stdout.strip() not in {str(launcher), "0"},
            within_s=60,
            every_s=0.2,
            what="a new launcher",
            log=sv.log,
        )
        sv.wait_states({program: "STOPPED", other: "RUNNING"})
        assert "not expected" in (log_dir / "supervisord.log").read_text()
        job_id = hub.submit()
        assert hub.wait_job(job_id)["status"] == "completed", sv.log()
        # A shutdown through the hub (emp workers shutdown): the worker exits 0, and
        # supervisord leaves it stopped; started again, it is active.
        other_name = other.split(":")[1]
        hub.wait_for_workers(f"sv-{other_name}")
        assert hub.post(f"/api/workers/sv-{other_name}/shutdown")["state"] == "stopping"
        sv.wait_states({program: "STOPPED", other: "EXITED"})
        exited = f"exited: {other_name} (exit status 0; expected)"
        assert exited in (log_dir / "supervisord.log").read_text()
        sv.ctl("start", program)
        sv.ctl("start", other)
        sv.wait_states({"emp:gpu0": "RUNNING", "emp:gpu1": "RUNNING"})
        hub.wait_for_workers("sv-gpu0", "sv-gpu1")
        assert {w["state"] for w in hub.get("/api/workers")} == {"active"}
        # Idle workers stop at once; the launcher's late copy of the TERM arrives while the
        # worker exits, and must not turn its exit 0 into "terminated by SIGTERM".
        log = (log_dir / "supervisord.log").read_text()
        assert sv.ctl("stop", "emp:*").returncode == 0
        stops = (log_dir / "supervisord.log").read_text()[len(log) :]
        stopped_lines = [line for line in stops.splitlines() if "stopped: " in line]
        assert sorted(line.split("stopped: ")[1] for line in stopped_lines) == [
            "gpu0 (exit status 0)",
            "gpu1 (exit status 0)",
        ]
    # supervisord stopped: every worker drained and exited, none left behind.
    assert sv.popen.returncode == 0, sv.log()
    assert processes_mentioning(str(env_file)) == []  # in the workers' environment
    assert processes_mentioning(str(binary)) == []  # the launchers' command line


def test_the_sample_config_is_what_its_readme_command_prints() -> None:
    root = Path(__file__).parent.parent
    readme = (root / "packaging" / "supervisor" / "README.md").read_text()
    [command] = re.findall(r"```sh\n(.*?)```", readme, re.S)
    done = subprocess.run(
        ["sh", "-c", command],
        capture_output=True,
        text=True,
        env=clean_env(PATH=f"{BIN}:{os.environ['PATH']}"),
        cwd=root,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == (root / "packaging" / "supervisor" / "supervisord.conf").read_text()


def test_the_env_file_sets_what_the_environment_does_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env_file = tmp_path / "worker.env"
    env_file.write_text(
        "# a comment\n\nexport EMP_REGION=eu\nEMP_TAGS='a, b'\nEMP_WORKER_ID=\"from-file\"\n"
        "EMP_TEST_LITERAL=x=$HOME #z\n"
    )
    monkeypatch.setenv("EMP_WORKER_ID", "from-env")
    for key in ("EMP_REGION", "EMP_TAGS", "EMP_TEST_LITERAL"):  # unset, and unset afterwards
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    added = load_env_file(env_file)
    assert added == {"EMP_REGION": "eu", "EMP_TAGS": "a, b", "EMP_TEST_LITERAL": "x=$HOME #z"}
    assert os.environ["EMP_WORKER_ID"] == "from-env"  # the environment wins
    # And the worker sees it: doctor reads EMP_ENV_FILE before its settings.
    done = subprocess.run(
        [str(BIN / "emp-worker"), "doctor", "--json"],
        capture_output=True,
        text=True,
        env=clean_env(
            EMP_ENV_FILE=str(env_file),
            EMP_WORKER_ID="from-env",
            EMP_HUB_URL="ws://127.0.0.1:9",
            EMP_CONNECTORS="simulation",
        ),
        check=False,
    )
    report = json.loads(done.stdout)
    assert report["worker_id"] == "from-env"
    caps = report["capabilities"]
    assert (caps["region"], sorted(caps["tags"])) == ("eu", ["a", "b"])
