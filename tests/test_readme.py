"""The README's "Run the hub" and "Run a worker" commands, run as written, in order, the way
a newcomer types them: the hub in one terminal, the rest in another."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from emp_hub.embedded import free_port
from tests.processes import eventually_sync

pytestmark = [pytest.mark.slow, pytest.mark.worker]

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"


def blocks_after(heading: str) -> list[str]:
    """The ```sh blocks of one section of the README."""
    text = README.read_text()
    section = text[text.index(heading) :]
    end = section.find("\n## ", len(heading))
    section = section if end < 0 else section[:end]
    return re.findall(r"```sh\n(.*?)```", section, re.S)


@pytest.mark.timeout(180)
def test_the_readme_runs_as_written(tmp_path: Path) -> None:
    assert (ROOT / ".venv/bin/emp-hub").exists(), "scripts/test.sh makes .venv first"
    [serve, tokens_and_submit] = blocks_after("## Run the hub")
    [worker] = blocks_after("## Run a worker")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMP_")}
    env |= {
        "HOME": str(tmp_path),
        "XDG_DATA_HOME": str(tmp_path / "data"),
        "EMP_PORT": str(port),  # where this test's hub listens; the commands are unchanged
        "EMP_HUB_URL": f"http://127.0.0.1:{port}",
    }
    hub = subprocess.Popen(
        ["bash", "-c", f"exec {serve.strip()}"],
        cwd=ROOT,
        env=env,
        stdout=(tmp_path / "hub.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:

        def ready() -> bool:
            assert hub.poll() is None, (tmp_path / "hub.log").read_text()
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health/ready").status_code == 200
            except httpx.TransportError:
                return False

        log = (tmp_path / "hub.log").read_text
        eventually_sync(ready, within_s=60, every_s=0.2, what="the hub ready", log=log)
        script = "\n".join(
            [
                "set -euo pipefail",
                tokens_and_submit,
                worker,
                "echo '--- completed:'",
                "EMP_TOKEN=$CLIENT_TOKEN .venv/bin/emp jobs --status completed",
                "kill -TERM $! && wait $!",  # the worker, run with & above: it drains
            ]
        )
        done = subprocess.run(
            ["bash", "-c", script],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=150,
            check=False,
        )
        out = done.stdout
        assert done.returncode == 0, f"{out}\n{done.stderr}"
        first_job = out.split()[0]
        assert first_job.startswith("job-rest-"), out
        submitted, completed = out.split("--- completed:")
        assert "Traceback" not in done.stderr, done.stderr
        assert "simulation" in submitted and "completed" in submitted  # --wait's answer
        assert first_job in completed and completed.count("job-rest-") == 2, out
    finally:
        hub.send_signal(signal.SIGTERM)
        hub.wait(30)


PACKAGES = {  # a test file of each package, which the fast tests must still cover
    "broker": "tests/test_broker.py",
    "hub": "tests/test_hub_http.py",
    "worker": "tests/test_worker.py",
    "client": "tests/test_client.py",
    **{p.name: f"plugins/{p.name}/tests" for p in (ROOT / "plugins").glob("emp-connector-*")},
}


@pytest.mark.timeout(600)
def test_the_fast_tests_run_as_written_and_cover_every_package() -> None:
    """The README's `scripts/test.sh -m "not slow"`: it passes, leaves the slow tests out
    (this one among them) and still runs tests of every package."""
    [block, *_] = blocks_after("## Try it")
    [fast] = [line for line in block.splitlines() if line.startswith("scripts/test.sh -m")]
    command = fast.split("#")[0].strip()
    done = subprocess.run(
        ["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=540, check=False
    )
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr
    summary = done.stdout.strip().splitlines()[-1]
    assert " passed" in summary and " deselected" in summary and "failed" not in summary, summary
    collected = subprocess.run(
        [".venv/bin/python", "-m", "pytest", "-q", "--collect-only", "-m", "not slow"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    missing = [name for name, path in PACKAGES.items() if f"\n{path}" not in "\n" + collected]
    assert missing == [], collected
