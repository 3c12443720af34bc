"""installer/install.sh and scripts/sign-release.sh against a release directory signed with
a test key and served over HTTP from 127.0.0.1: a verified install runs a job on a real hub;
an upgrade drains the running worker under supervisord; every kind of bad download is
refused with one line, exit status 1 and the prefix unchanged, byte for byte."""

from __future__ import annotations

import http.server
import os
import platform
import shutil
import stat
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

from tests.processes import Cluster, cluster
from tests.shipping import BIN, fake_worker_binary, processes_mentioning, supervisord

pytestmark = [pytest.mark.slow, pytest.mark.worker]

ROOT = Path(__file__).parent.parent
INSTALLER = ROOT / "installer" / "install.sh"
SIGN = ROOT / "scripts" / "sign-release.sh"
OS = {"Linux": "linux", "Darwin": "macos"}[platform.system()]
ARCH = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}[
    platform.machine()
]


def signing_key(folder: Path) -> tuple[Path, Path]:
    """A new ed25519 key pair; (private key, allowed-signers file for releases@emp)."""
    folder.mkdir(parents=True, exist_ok=True)
    key = folder / "key"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "test", "-f", str(key)], check=True
    )
    allowed = folder / "allowed_signers"
    public = (folder / "key.pub").read_text().strip()
    allowed.write_text(f'releases@emp namespaces="emp-release" {public}\n')
    return key, allowed


def make_release(folder: Path, version: str, key: Path) -> Path:
    """A signed release directory holding a stand-in worker binary of `version`."""
    binary = folder / f"emp-worker-{version}-{OS}-{ARCH}"
    fake_worker_binary(binary, f"release-{version}")
    (folder / "emp-worker-0.0.0-plan9-mips").write_text("another platform's binary\n")
    subprocess.run([str(SIGN), str(folder), str(key)], check=True, capture_output=True)
    return binary


class Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the release root; a path in `cut` is sent half, with its full length
    announced (a connection that broke off)."""

    cut: ClassVar[set[str]] = set()

    def do_GET(self) -> None:
        if self.path in self.cut:
            data = Path(self.translate_path(self.path)).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:
        pass


@dataclass
class Releases:
    """Release directories under `root`, served at `url`, signed with `key`."""

    root: Path
    url: str
    key: Path
    allowed: Path
    handler: type[Handler]

    def release(self, name: str, version: str) -> Path:
        """A signed release at URL/name; its binary."""
        return make_release(self.root / name, version, self.key)


@pytest.fixture
def releases(tmp_path: Path) -> Iterator[Releases]:
    root = tmp_path / "releases"
    root.mkdir()
    key, allowed = signing_key(tmp_path / "keys")
    handler = type("H", (Handler,), {"cut": set()})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a: handler(*a, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Releases(root, f"http://127.0.0.1:{server.server_address[1]}", key, allowed, handler)
    finally:
        server.shutdown()
        server.server_close()


def install_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A clean environment: no EMP_* settings, this venv's supervisorctl on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMP_")}
    env |= {"PATH": f"{BIN}:{os.environ['PATH']}", "HOME": str(tmp_path / "home"), **extra}
    return env


def run_installer(
    *args: str, env: dict[str, str], shell: str = "sh", timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """`shell installer/install.sh ARGS`."""
    return subprocess.run(
        [shell, str(INSTALLER), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )


def snapshot(prefix: Path) -> dict[str, tuple[int, bytes]]:
    """Every path under prefix: its mode and (for files) content."""
    if not prefix.exists():
        return {}
    found = {}
    for path in sorted(prefix.rglob("*")):
        info = path.lstat()
        content = path.read_bytes() if stat.S_ISREG(info.st_mode) else b""
        found[str(path.relative_to(prefix))] = (info.st_mode, content)
    return found


@pytest.fixture
def hub(redis_url: str, namespace: str, tmp_path: Path) -> Iterator[Cluster]:
    with cluster(redis_url, namespace, tmp_path) as running:
        yield running


def worker_env_lines(hub: Cluster, tmp_path: Path) -> list[str]:
    """Settings the tests add to the installed env file (short jobs, quick reconnects)."""
    return [
        f"EMP_PLUGIN_DIR={tmp_path / 'plugins'}",
        "EMP_SIMULATION_DURATION=4",
        "EMP_SIMULATION_STEPS=4",
        "EMP_HEARTBEAT_S=0.5",
        "EMP_RECONNECT_MAX_S=1",
        "EMP_DRAIN_TIMEOUT_S=30",
    ]


@pytest.mark.timeout(300)
def test_install_then_upgrade_while_a_worker_runs_a_job(
    hub: Cluster, releases: Releases, tmp_path: Path
) -> None:
    releases.release("v1", "0.1.0")
    releases.release("v2", "0.2.0")
    prefix = tmp_path / "emp"
    env = install_env(tmp_path)
    first = run_installer(
        "--base-url", f"{releases.url}/v1", "--allowed-signers", str(releases.allowed),
        "--prefix", str(prefix), "--hub-url", f"ws://127.0.0.1:{hub.port}",
        "--token", "t0ken", "--connectors", "simulation", "--gpus", "none",
        env=env, shell="dash",
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    assert f"installed {prefix}/bin/emp-worker (0.1.0)" in first.stdout
    env_file = prefix / "etc" / "worker.env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert env_file.stat().st_uid == os.getuid()
    settings = env_file.read_text().splitlines()
    assert {f"EMP_HUB_URL=ws://127.0.0.1:{hub.port}", "EMP_TOKEN=t0ken"} <= set(settings)
    assert "EMP_CONNECTORS=simulation" in settings
    env_file.write_text("\n".join([*settings, *worker_env_lines(hub, tmp_path)]) + "\n")
    assert [p.name for p in (prefix / "bin").iterdir()] == ["emp-worker"]  # no temp file
    conf = prefix / "etc" / "supervisord.conf"
    assert f"command={prefix}/bin/emp-worker run" in conf.read_text()

    out = tmp_path / "supervisord.out"
    with supervisord(conf, prefix / "log", install_env(tmp_path), out) as sv:
        sv.wait_states({"emp:cpu": "RUNNING"})
        [worker] = hub.get("/api/workers")
        assert worker["capabilities"]["tags"] == ["release-0.1.0"]
        worker_id = worker["worker_id"]
        job_id = hub.submit()
        hub.wait_job(job_id, {"active"})

        upgrade = run_installer(
            "--base-url", f"{releases.url}/v2", "--allowed-signers", str(releases.allowed),
            "--prefix", str(prefix), env=env,
        )  # fmt: skip
        assert upgrade.returncode == 0, f"{upgrade.stdout}\n{upgrade.stderr}\n{sv.log()}"
        assert "draining the running workers" in upgrade.stdout
        assert "upgraded to 0.2.0" in upgrade.stdout
        job = hub.get(f"/api/jobs/{job_id}")  # the drain let it finish before the swap
        assert (job["status"], job["worker_id"]) == ("completed", worker_id)
        assert "stopped: cpu (exit status 0)" in (prefix / "log" / "supervisord.log").read_text()
        # The settings survived the upgrade; the new version runs and takes jobs.
        assert env_file.read_text().splitlines()[2:5] == settings[2:5]
        sv.wait_states({"emp:cpu": "RUNNING"})
        hub.wait_for_workers(worker_id)
        [worker] = hub.get("/api/workers")
        assert worker["capabilities"]["tags"] == ["release-0.2.0"]
        assert hub.wait_job(hub.submit())["status"] == "completed"

        # Removing it drains the worker, stops supervisord and leaves nothing behind.
        gone = run_installer("--uninstall", "--prefix", str(prefix), env=env)
        assert gone.returncode == 0, gone.stderr
        sv.popen.wait(60)
    assert not prefix.exists()
    assert processes_mentioning(str(env_file)) == []


BAD = [
    "tampered binary",
    "tampered sums",
    "wrong key",
    "missing signature",
    "truncated file",
    "truncated download",
    "unknown arch",
    "unknown os",
    "no ssh-keygen",
    "no curl or wget",
    "no sha256 tool",
]


def toolbox(folder: Path, without: set[str]) -> str:
    """A PATH of links to the tools the installer uses, less `without`."""
    folder.mkdir()
    tools = (
        "sh uname id mktemp rm cp chmod mkdir mv cut grep head tail cat sleep env ls rmdir kill"
        " curl wget ssh-keygen sha256sum shasum"
    )
    for tool in tools.split():
        found = shutil.which(tool)
        if found and tool not in without:
            (folder / tool).symlink_to(found)
    return str(folder)


@pytest.mark.parametrize("case", BAD)
def test_a_bad_release_or_platform_is_refused_and_nothing_changes(
    releases: Releases, tmp_path: Path, case: str
) -> None:
    releases.release("good", "0.1.0")
    binary = releases.release("bad", "0.2.0")
    sums = releases.root / "bad" / "SHA256SUMS"
    prefix, fresh = tmp_path / "emp", tmp_path / "fresh"
    env = install_env(tmp_path)
    good = ["--allowed-signers", str(releases.allowed), "--gpus", "none"]
    done = run_installer(
        "--base-url", f"{releases.url}/good", "--prefix", str(prefix), *good, env=env
    )
    assert done.returncode == 0, done.stderr
    before = snapshot(prefix)
    args = ["--base-url", f"{releases.url}/bad", *good]
    expected = {
        "tampered binary": f"{binary.name} does not match SHA256SUMS",
        "tampered sums": "the signature of SHA256SUMS does not verify",
        "wrong key": "the signature of SHA256SUMS does not verify",
        "missing signature": "cannot download",
        "truncated file": f"{binary.name} does not match SHA256SUMS",
        "truncated download": f"cannot download {releases.url}/bad/{binary.name}",
        "unknown arch": "unsupported architecture: riscv64",
        "unknown os": "unsupported operating system: SunOS",
        "no ssh-keygen": "ssh-keygen not found",
        "no curl or wget": "neither curl nor wget found",
        "no sha256 tool": "neither sha256sum nor shasum found",
    }[case]
    if case == "tampered binary":
        with binary.open("a") as f:
            f.write("# one more line\n")
    elif case == "tampered sums":
        sums.write_text(sums.read_text().replace("0.0.0-plan9", "0.0.1-plan9"))
    elif case == "wrong key":
        args = args[:1] + args[1:2] + ["--gpus", "none"]  # the pinned release key
        expected = "the signature of SHA256SUMS does not verify"
    elif case == "missing signature":
        (releases.root / "bad" / "SHA256SUMS.sig").unlink()
        expected = f"cannot download {releases.url}/bad/SHA256SUMS.sig"
    elif case == "truncated file":
        data = binary.read_bytes()
        binary.write_bytes(data[: len(data) // 2])
    elif case == "truncated download":
        releases.handler.cut.add(f"/bad/{binary.name}")
    elif case == "unknown arch":
        env["EMP_INSTALL_UNAME_M"] = "riscv64"
    elif case == "unknown os":
        env["EMP_INSTALL_UNAME_S"] = "SunOS"
    else:
        without = {
            "no ssh-keygen": {"ssh-keygen"},
            "no curl or wget": {"curl", "wget"},
            "no sha256 tool": {"sha256sum", "shasum"},
        }[case]
        env["PATH"] = toolbox(tmp_path / "tools", without)
    for target in (prefix, fresh):  # an installed worker, and none yet
        refused = run_installer(*args, "--prefix", str(target), env=env)
        assert refused.returncode == 1, refused.stdout
        assert refused.stderr.count("\n") == 1, refused.stderr  # one line
        assert refused.stderr.startswith("install.sh: ") and expected in refused.stderr
    assert snapshot(prefix) == before
    assert not fresh.exists()


def test_wget_and_shasum_do_when_curl_and_sha256sum_are_missing(
    releases: Releases, tmp_path: Path
) -> None:
    releases.release("v1", "0.1.0")
    prefix = tmp_path / "emp"
    env = install_env(tmp_path, PATH=toolbox(tmp_path / "tools", {"curl", "sha256sum"}))
    assert not (tmp_path / "tools" / "curl").exists()
    done = run_installer(
        "--base-url", f"{releases.url}/v1", "--allowed-signers", str(releases.allowed),
        "--prefix", str(prefix), "--gpus", "none", env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (prefix / "bin" / "emp-worker").read_bytes() == (
        releases.root / "v1" / f"emp-worker-0.1.0-{OS}-{ARCH}"
    ).read_bytes()


def test_dry_run_changes_nothing_and_uninstall_removes_only_its_files(
    releases: Releases, tmp_path: Path
) -> None:
    releases.release("v1", "0.1.0")
    prefix = tmp_path / "emp"
    env = install_env(tmp_path)
    common = ["--base-url", f"{releases.url}/v1", "--allowed-signers", str(releases.allowed)]
    dry = run_installer(*common, "--prefix", str(prefix), "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert f"would install {prefix}/bin/emp-worker" in dry.stdout
    assert not prefix.exists()
    other = run_installer(*common, "--prefix", str(prefix), "--version", "0.2.0", env=env)
    assert other.returncode == 1
    assert other.stderr == (
        f"install.sh: no emp-worker-0.2.0-{OS}-{ARCH} in {releases.url}/v1/SHA256SUMS: "
        f"no release for {OS} {ARCH}\n"
    )
    same = run_installer(
        *common, "--prefix", str(prefix), "--version", "v0.1.0", "--dry-run", env=env
    )
    assert f"verified emp-worker-0.1.0-{OS}-{ARCH} (release 0.1.0" in same.stdout, same.stderr
    assert not prefix.exists()
    assert run_installer(*common, "--prefix", str(prefix), env=env).returncode == 0
    (prefix / "mine.txt").write_text("not the installer's\n")
    before = snapshot(prefix)
    dry = run_installer(*common, "--prefix", str(prefix), "--dry-run", "--token", "x", env=env)
    assert f"would replace {prefix}/bin/emp-worker" in dry.stdout
    dry = run_installer("--uninstall", "--dry-run", "--prefix", str(prefix), env=env)
    assert f"would remove {prefix}/etc/worker.env" in dry.stdout
    assert snapshot(prefix) == before
    gone = run_installer("--uninstall", "--prefix", str(prefix), env=env)
    assert gone.returncode == 0, gone.stderr
    assert [p.name for p in prefix.iterdir()] == ["mine.txt"]


def test_the_installer_pins_the_release_key_and_passes_shellcheck() -> None:
    key = (ROOT / "installer" / "release-key.pub").read_text().strip()
    assert key.startswith("ssh-ed25519 ") and key.endswith(" releases@emp")
    assert f"RELEASE_KEY='{key}'\n" in INSTALLER.read_text()
    for script in (INSTALLER, SIGN):
        assert script.read_text().startswith("#!/bin/sh\n")
        lint = subprocess.run(
            [str(BIN / "shellcheck"), "--shell=sh", str(script)], capture_output=True, text=True
        )
        assert lint.returncode == 0, lint.stdout
        assert subprocess.run(["dash", "-n", str(script)], check=False).returncode == 0
    usage = subprocess.run(["dash", str(INSTALLER), "--help"], capture_output=True, text=True)
    assert usage.returncode == 0
    for option in ("--version", "--uninstall", "--dry-run", "--base-url", "--allowed-signers"):
        assert option in usage.stdout


def test_sign_release_output_checks_with_standard_tools(releases: Releases) -> None:
    releases.release("r", "0.1.0")
    folder = releases.root / "r"
    lines = (folder / "SHA256SUMS").read_text().splitlines()
    assert sorted(line.split()[1] for line in lines) == [
        "emp-worker-0.0.0-plan9-mips",
        f"emp-worker-0.1.0-{OS}-{ARCH}",
    ]
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=folder, capture_output=True)
    assert check.returncode == 0, check.stdout
    with (folder / "SHA256SUMS").open("rb") as sums:
        verify = subprocess.run(
            [
                "ssh-keygen", "-Y", "verify", "-f", str(releases.allowed), "-I", "releases@emp",
                "-n", "emp-release", "-s", str(folder / "SHA256SUMS.sig"),
            ],
            stdin=sums, capture_output=True, text=True,
        )  # fmt: skip
    assert verify.returncode == 0 and "Good" in verify.stdout, verify
