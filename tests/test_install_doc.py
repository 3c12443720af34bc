"""docs/install.md, run as written, section by section, against a release served from
127.0.0.1 and a real hub.

The commands are the page's, with these visible substitutions only: the GitHub release URL
becomes the test's mirror (which holds the same files, signed with a test key), `/opt/emp`
becomes a folder of the test, `/etc/supervisor/conf.d` another, and the release public key
in the allowed-signers line becomes the test key. The installer gets the same through its
documented environment (`EMP_INSTALL_BASE_URL`, `EMP_INSTALL_ALLOWED_SIGNERS`,
`EMP_INSTALL_PREFIX`). Blocks marked `<!-- not runnable offline: needs GitHub -->` (the
`gh attestation` ones) cannot run here: the test checks that they hold nothing else."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.processes import Cluster, cluster, eventually_sync
from tests.shipping import BIN, processes_mentioning
from tests.test_installer import ROOT, make_release, signing_key

pytestmark = [pytest.mark.slow, pytest.mark.worker]

DOC = ROOT / "docs" / "install.md"
OFFLINE = "<!-- not runnable offline: needs GitHub -->"
GITHUB = "https://github.com/emp-ai/emp/releases"


def blocks(heading: str) -> list[str]:
    """The ```sh blocks of one section (not the ones marked as needing GitHub)."""
    text = DOC.read_text()
    section = text[text.index(f"\n{heading}\n") :]
    end = section.find("\n## ", len(heading) + 1)
    section = section if end < 0 else section[:end]
    return [
        block
        for marker, block in re.findall(r"(<!--[^>]*-->\n)?```sh\n(.*?)```", section, re.S)
        if marker.strip() != OFFLINE
    ]


def test_only_gh_attestation_commands_are_marked_not_runnable() -> None:
    text = DOC.read_text()
    marked = re.findall(re.escape(OFFLINE) + r"\n```sh\n(.*?)```", text, re.S)
    assert marked, "the gh attestation commands are shown"
    for block in marked:
        for line in block.strip().splitlines():
            assert line.startswith("gh attestation verify "), line
    assert text.count("```sh") == len(marked) + sum(
        len(blocks(h)) for h in re.findall(r"^## .*$", text, re.M)
    )


def test_the_allowed_signers_line_is_the_release_key() -> None:
    key = (ROOT / "installer" / "release-key.pub").read_text().strip()
    assert f"""'releases@emp namespaces="emp-release" {key}'""" in DOC.read_text()


@pytest.fixture
def hub(redis_url: str, namespace: str, tmp_path: Path) -> Iterator[Cluster]:
    with cluster(redis_url, namespace, tmp_path) as running:
        yield running


def publish(folder: Path, version: str, key: Path) -> None:
    """A release as the release workflow publishes it: the binary and install.sh, signed."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    shutil.copy(ROOT / "installer" / "install.sh", folder / "install.sh")
    make_release(folder, version, key)


@pytest.mark.timeout(300)
def test_the_install_page_runs_as_written(hub: Cluster, tmp_path: Path) -> None:
    key, allowed = signing_key(tmp_path / "keys")
    mirror = tmp_path / "mirror"
    latest = mirror / "latest" / "download"
    publish(latest, "0.1.0", key)
    server = subprocess.Popen(
        [str(BIN / "python"), "-m", "http.server", "0", "--bind", "127.0.0.1"],
        cwd=mirror,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert server.stdout is not None
    port = re.search(r"port (\d+)", server.stdout.readline())
    assert port, "the mirror did not start"
    url = f"http://127.0.0.1:{port[1]}"
    prefix, confd = tmp_path / "opt-emp", tmp_path / "conf.d"
    confd.mkdir()
    release_key = (ROOT / "installer" / "release-key.pub").read_text().strip()
    swaps = {
        GITHUB: url,
        "/opt/emp": str(prefix),
        "/etc/supervisor/conf.d": str(confd),
        release_key: (tmp_path / "keys" / "key.pub").read_text().strip(),
    }
    text = DOC.read_text()
    for old in swaps:
        assert old in text, old
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMP_")}
    env |= {
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "HOME": str(tmp_path / "home"),
        "HUB_URL": f"ws://127.0.0.1:{hub.port}",
        "WORKER_TOKEN": "worker-token",
        "EMP_INSTALL_BASE_URL": f"{url}/latest/download",
        "EMP_INSTALL_ALLOWED_SIGNERS": str(allowed),
        "EMP_INSTALL_PREFIX": str(prefix),
    }

    def run(heading: str, count: int) -> list[str]:
        found = blocks(heading)
        assert len(found) == count, found
        outs = []
        for block in found:
            for old, new in swaps.items():
                block = block.replace(old, new)
            done = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", block],
                cwd=work, env=env, capture_output=True, text=True, timeout=180, check=False,
            )  # fmt: skip
            assert done.returncode == 0, f"{block}\n{done.stdout}\n{done.stderr}"
            outs.append(done.stdout + done.stderr)
        return outs

    try:
        [installed] = run("## Install", 1)
        assert f"installed {prefix}/bin/emp-worker (0.1.0)" in installed
        assert (prefix / "etc" / "worker.env").stat().st_mode & 0o777 == 0o600

        [started, _] = run("## Run the workers", 2)
        assert "worker id" in started and "FAILED" not in started  # doctor: all checks ok
        assert "emp:cpu" in started  # supervisorctl status listed the worker
        # supervisord has started it; it registers once running (seconds on a busy machine)
        [worker] = eventually_sync(
            lambda: hub.get("/api/workers"),
            within_s=60,
            every_s=0.1,
            what="the supervised worker registered",
            log=lambda: "\n".join(p.read_text() for p in (prefix / "log").glob("*")),
        )
        assert worker["capabilities"]["tags"] == ["release-0.1.0"]
        assert hub.wait_job(hub.submit(), timeout=60)["status"] == "completed"
        programs = (confd / "emp.conf").read_text()
        assert "[group:emp]" in programs and f"command={prefix}/bin/emp-worker run" in programs

        publish(latest, "0.2.0", key)  # a new release
        [upgraded] = run("## Upgrade", 1)
        assert f"would replace {prefix}/bin/emp-worker" in upgraded
        assert "upgraded to 0.2.0" in upgraded
        hub.wait_for_workers(worker["worker_id"])
        [worker] = hub.get("/api/workers")
        assert worker["capabilities"]["tags"] == ["release-0.2.0"]
        assert hub.wait_job(hub.submit(), timeout=60)["status"] == "completed"

        [verified] = run("## Verify a release by hand", 1)
        assert 'Good "emp-release" signature for releases@emp' in verified
        assert verified.count("install.sh: OK") == 2  # sha256sum, then shasum

        [removed] = run("## Uninstall", 1)
        assert f"removed the emp worker from {prefix}" in removed
        assert not prefix.exists()
        assert processes_mentioning(str(prefix)) == []
    finally:
        conf = prefix / "etc" / "supervisord.conf"
        if conf.exists():  # a failure left supervisord running
            subprocess.run([str(BIN / "supervisorctl"), "-c", str(conf), "shutdown"], check=False)
        server.terminate()
        server.wait(10)
