"""Build the hub image (packaging/docker/Dockerfile) without a Docker daemon and run it.

    .venv/bin/python scripts/test_container.py       # as root; needs podman and debootstrap

On machines with no Docker daemon and no registry (see docs/deploy.md, "Testing the image
without Docker"): the base image is a Debian bookworm root made with debootstrap and kept
as localhost/debian-py:bookworm; podman builds the `hub` and `simulation-worker` targets
with chroot isolation; then each image's filesystem is exported and its entry point run
under chroot as the image's user, with the image's environment and working directory:

- the image: a non-root user, the entry point `emp-hub serve --host 0.0.0.0`, a HEALTHCHECK,
  the /data volume, the version label equal to the project's version (and the installed one);
- the default (no EMP_REDIS_URL): the embedded Valkey starts in /data as that user; ready;
- with EMP_REDIS_URL on a Redis (EMP_TEST_REDIS_URL, e.g. the machine's
  redis://127.0.0.1:6379/0; unset: an embedded Valkey started from this .venv), in a key
  namespace of its own: ready; the image's HEALTHCHECK
  command passes against it (and fails once the hub is stopped); `emp-hub token create`
  from the image; a job submitted over HTTP is completed by the worker of the
  simulation-worker image, its output file stored under /data/outputs; SIGTERM stops both
  with status 0; the namespace is deleted afterwards.

Prints one JSON line: the image sizes and how long each part took.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import redis

from emp_hub.embedded import EmbeddedValkey, free_port

ROOT = Path(__file__).resolve().parent.parent
BASE_IMAGE = "localhost/debian-py:bookworm"
HUB_IMAGE = "localhost/emp-hub:test"
WORKER_IMAGE = "localhost/emp-worker-simulation:test"
PODMAN = ["podman", "--cgroup-manager=cgroupfs"]
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")


def log(message: str) -> None:
    """A progress line on stderr."""
    print(f"== {message}", file=sys.stderr, flush=True)


def run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a command; its failure stops the test with its output."""
    done = subprocess.run(args, text=True, capture_output=True, check=False, **kwargs)
    if done.returncode != 0:
        raise SystemExit(
            f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr}"
        )
    return done


def project_version() -> str:
    """The version in the root pyproject.toml (the one source of it)."""
    return str(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"])


def ensure_base_image() -> None:
    """localhost/debian-py:bookworm: a Debian root with Python 3.11, made once and kept."""
    if subprocess.run([*PODMAN, "image", "exists", BASE_IMAGE], check=False).returncode == 0:
        return
    log(f"making {BASE_IMAGE} with debootstrap (once; a few minutes)")
    with tempfile.TemporaryDirectory(prefix="debian-py-") as rootfs:
        run(
            [
                "debootstrap",
                "--variant=minbase",
                "--include=python3,python3-venv,ca-certificates",
                "bookworm",
                rootfs,
            ]
        )
        tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
        run([*PODMAN, "import", "-", BASE_IMAGE], stdin=tar.stdout)
        if tar.wait() != 0:
            raise SystemExit("tar of the debootstrap root failed")


def build(target: str, tag: str, version: str) -> None:
    """podman build of one target of the Dockerfile, on the local base image."""
    args = [
        *PODMAN,
        "build",
        "--isolation=chroot",
        "--network=host",
        "--format=docker",  # keeps HEALTHCHECK (the OCI format has none)
        "--build-arg",
        f"BASE={BASE_IMAGE}",
        "--build-arg",
        f"VERSION={version}",
        "--target",
        target,
        "-f",
        "packaging/docker/Dockerfile",
        "-t",
        tag,
    ]
    if HOST_CA.exists():  # pip in the build reaches the index only with the host's CA bundle
        args += ["-v", f"{HOST_CA}:/etc/ssl/host-ca.crt:ro", "--build-arg"]
        args += ["PIP_CERT=/etc/ssl/host-ca.crt"]
    run([*args, "."], cwd=ROOT)


def inspect(tag: str) -> dict[str, Any]:
    """`podman image inspect` of one image."""
    info: list[dict[str, Any]] = json.loads(run([*PODMAN, "image", "inspect", tag]).stdout)
    return info[0]


@dataclass
class Image:
    """An image's filesystem, exported, and what its config says about running it."""

    root: Path
    config: dict[str, Any]
    healthcheck: dict[str, Any]  # HEALTHCHECK (podman shows it beside the config)
    uid: int
    gid: int

    @property
    def env(self) -> dict[str, str]:
        """The image's environment."""
        return dict(e.split("=", 1) for e in self.config.get("Env") or [])

    def command(self, args: list[str], env: dict[str, str] | None = None) -> list[str]:
        """`args` run in the image as its user, with its environment and working dir."""
        variables = [f"{k}={v}" for k, v in (self.env | (env or {})).items()]
        workdir = self.config.get("WorkingDir") or "/"
        return [
            "chroot",
            f"--userspec={self.uid}:{self.gid}",
            str(self.root),
            "/usr/bin/env",
            "-i",
            *variables,
            "/bin/sh",
            "-c",
            'cd "$1" && shift && exec "$@"',
            "sh",
            workdir,
            *args,
        ]

    def entry_point(self, env: dict[str, str] | None = None) -> list[str]:
        """The image's ENTRYPOINT + CMD, as `docker run IMAGE` runs them."""
        return self.command([*self.config["Entrypoint"], *self.config["Cmd"]], env)


def mounted_under(path: Path) -> list[str]:
    """Mount points at or below `path`."""
    points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    return [p for p in points if p == str(path) or p.startswith(f"{path}/")]


@contextmanager
def exported(tag: str, workdir: Path) -> Iterator[Image]:
    """The image's filesystem under `workdir`, with /proc and device nodes, removed after."""
    info = inspect(tag)
    cid = run([*PODMAN, "create", tag]).stdout.strip()
    root = workdir / tag.rsplit("/", 1)[-1].replace(":", "-")
    root.mkdir()
    try:
        export = subprocess.Popen([*PODMAN, "export", cid], stdout=subprocess.PIPE)
        run(["tar", "-x", "-C", str(root)], stdin=export.stdout)
        if export.wait() != 0:
            raise SystemExit(f"podman export {tag} failed")
    finally:
        run([*PODMAN, "rm", cid])
    # Device nodes of our own (never a bind of the host's /dev, which a cleanup could harm).
    (root / "dev").mkdir(exist_ok=True)
    for name, minor in [("null", 3), ("zero", 5), ("full", 7), ("random", 8), ("urandom", 9)]:
        node = root / "dev" / name
        with suppress(FileNotFoundError):
            node.unlink()
        os.mknod(node, 0o666 | 0o020000, os.makedev(1, minor))
        node.chmod(0o666)
    (root / "proc").mkdir(exist_ok=True)
    run(["mount", "--bind", "/proc", str(root / "proc")])
    try:
        user = info["Config"]["User"].split(":")[0]
        passwd = [line.split(":") for line in (root / "etc/passwd").read_text().splitlines()]
        [(uid, gid)] = [(int(f[2]), int(f[3])) for f in passwd if user in (f[0], f[2])]
        yield Image(root, info["Config"], info.get("Healthcheck") or {}, uid, gid)
    finally:
        run(["umount", "--lazy", str(root / "proc")])
        assert not mounted_under(root), mounted_under(root)
        shutil.rmtree(root)


@contextmanager
def started(args: list[str], log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A process logging to `log_path`; terminated (then killed) when the block ends."""
    with log_path.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def wait_ready(port: int, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    """Until the hub answers /health/ready with 200 (its log if it exits or takes 90 s)."""
    deadline = time.monotonic() + 90
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the hub exited ({proc.returncode}):\n{log_path.read_text()}")
        with suppress(httpx.TransportError):
            if httpx.get(f"http://127.0.0.1:{port}/health/ready").status_code == 200:
                return
        if time.monotonic() > deadline:
            raise SystemExit(f"the hub was not ready within 90 s:\n{log_path.read_text()}")
        time.sleep(0.3)


def stop(proc: subprocess.Popen[bytes], what: str, log_path: Path, *, hub: bool = False) -> None:
    """SIGTERM: the process must exit within 60 s with status 0. uvicorn (the hub) shuts
    down gracefully, then ends by the signal it got, as `docker stop` expects."""
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(60)
    text = log_path.read_text()
    ok = code == 0 or (hub and code == -signal.SIGTERM and "shutdown complete" in text)
    if not ok:
        raise SystemExit(f"{what} exited with {code} on SIGTERM:\n{text}")


def healthcheck(image: Image, env: dict[str, str]) -> int:
    """The exit status of the image's HEALTHCHECK command, run in the image."""
    test = image.healthcheck["Test"]
    args = test[1:] if test[0] == "CMD" else ["/bin/sh", "-c", test[1]]
    return subprocess.run(image.command(args, env), capture_output=True, check=False).returncode


def check_config(hub: Image, worker: Image, version: str) -> None:
    """What the images' configs promise: non-root, entry points, health check, labels."""
    config = hub.config
    assert hub.uid != 0 and worker.uid != 0, "the images run as root"
    assert config["Entrypoint"] + config["Cmd"] == ["emp-hub", "serve", "--host", "0.0.0.0"]
    assert worker.config["Entrypoint"] + worker.config["Cmd"] == ["emp-worker", "run"]
    assert "/data" in config["Volumes"], config.get("Volumes")
    assert hub.healthcheck["Test"][0] in ("CMD", "CMD-SHELL"), hub.healthcheck
    assert "/health/ready" in " ".join(hub.healthcheck["Test"])
    for image in (hub, worker):
        assert image.config["Labels"]["org.opencontainers.image.version"] == version
        installed = run(
            image.command(
                ["python", "-c", "from importlib.metadata import version as v; print(v('emp'))"]
            )
        ).stdout.strip()
        assert installed == version, (installed, version)
    data = hub.root / "data"
    assert (data.stat().st_uid, (data / "outputs").stat().st_uid) == (hub.uid, hub.uid)
    for image in (hub, worker):  # no installer tools left in the images' environments
        site = next(image.root.glob("opt/emp/lib/python3*/site-packages"))
        assert not [p for p in ("pip", "setuptools") if (site / p).exists()], site
    plugins = run(worker.command(["emp-worker", "plugins", "list"])).stdout
    assert "simulation" in plugins, plugins


def check_embedded(hub: Image, work: Path) -> None:
    """The default: no EMP_REDIS_URL, the embedded Valkey in /data, as the image's user."""
    port = free_port()
    log_path = work / "hub-embedded.log"
    with started(hub.entry_point({"EMP_PORT": str(port)}), log_path) as proc:
        wait_ready(port, proc, log_path)
        assert healthcheck(hub, {"EMP_PORT": str(port)}) == 0, "HEALTHCHECK failed"
        check_dashboard(port)
        stop(proc, "the hub (embedded Valkey)", log_path, hub=True)
    aof = hub.root / "data/valkey/appendonlydir"
    assert aof.is_dir() and aof.stat().st_uid == hub.uid, log_path.read_text()
    assert (hub.root / "data/valkey").stat().st_mode & 0o077 == 0


def check_dashboard(port: int) -> None:
    """The image ships the dashboard's files (package data): the page and its modules."""
    for name in ("", "app.js", "pages.js", "style.css"):
        answer = httpx.get(f"http://127.0.0.1:{port}/dashboard/{name}")
        assert answer.status_code == 200 and len(answer.content) > 100, (name, answer.text)


def check_with_redis(hub: Image, worker: Image, redis_url: str, work: Path) -> None:
    """The hub on the machine's Redis, a job run by the image's simulation worker."""
    namespace = f"ci-container-{uuid.uuid4().hex[:12]}"
    client = redis.Redis.from_url(redis_url)
    client.ping()
    port = free_port()
    env = {"EMP_PORT": str(port), "EMP_REDIS_URL": redis_url, "EMP_BROKER__NAMESPACE": namespace}
    hub_log = work / "hub.log"
    try:
        with started(hub.entry_point(env), hub_log) as hub_proc:
            wait_ready(port, hub_proc, hub_log)
            assert healthcheck(hub, env) == 0, "HEALTHCHECK failed against the running hub"

            def token(role: str) -> str:
                create = ["emp-hub", "token", "create", "--role", role, "--name", "ci"]
                return run(hub.command(create, env)).stdout.strip()

            client_token, worker_token = token("client"), token("worker")
            worker_env = {
                "EMP_HUB_URL": f"ws://127.0.0.1:{port}",
                "EMP_TOKEN": worker_token,
                "EMP_WORKER_ID": f"{namespace}-worker",
                "EMP_SIMULATION_DURATION": "1",
                "EMP_SIMULATION_OUTPUT_IMAGE": "true",
            }
            worker_log = work / "worker.log"
            with started(worker.entry_point(worker_env), worker_log) as worker_proc:
                answer = httpx.post(
                    f"http://127.0.0.1:{port}/api/jobs",
                    headers={"Authorization": f"Bearer {client_token}"},
                    json={
                        "service": "simulation",
                        "payload": {"prompt": "a fox"},
                        "wait": True,
                        "timeout": 60,
                    },
                    timeout=90,
                )
                job = answer.json()
                assert job.get("status") == "completed", (job, worker_log.read_text())
                outputs = httpx.get(
                    f"http://127.0.0.1:{port}/api/jobs/{job['job_id']}/outputs",
                    headers={"Authorization": f"Bearer {client_token}"},
                ).json()
                assert outputs, job
                stored = list((hub.root / "data/outputs").rglob(outputs[0]["name"]))
                assert stored and stored[0].stat().st_uid == hub.uid, outputs
                stop(worker_proc, "the worker", worker_log)
            stop(hub_proc, "the hub", hub_log, hub=True)
        assert healthcheck(hub, env) != 0, "HEALTHCHECK passes with no hub running"
    finally:
        keys = list(client.scan_iter(match="{" + namespace + "}:*", count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i : i + 500])
        left = list(client.scan_iter(match=f"*{namespace}*", count=1000))
        assert not left, f"keys left in Redis: {left[:5]}"


@contextmanager
def redis_server(work: Path) -> Iterator[str]:
    """EMP_TEST_REDIS_URL, or an embedded Valkey for the moment."""
    url = os.environ.get("EMP_TEST_REDIS_URL")
    if url:
        yield url
        return
    with EmbeddedValkey(work / "valkey") as server:
        yield server.url


def redact(url: str) -> str:
    """A Redis URL without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(
        netloc=f"{parts.username or ''}:***@{parts.hostname}:{parts.port}"
    ).geturl()


def main() -> None:
    """Build both images, check them, print the figures."""
    if os.geteuid() != 0:
        raise SystemExit("run as root (podman, chroot and mount need it)")
    for tool in ("podman", "debootstrap", "chroot", "mount"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (apt-get install podman debootstrap)")
    version = project_version()
    figures: dict[str, Any] = {"version": version}
    started_at = time.monotonic()
    ensure_base_image()
    figures["base_image_s"] = round(time.monotonic() - started_at, 1)
    mark = time.monotonic()
    log(f"podman build --target hub -> {HUB_IMAGE}")
    build("hub", HUB_IMAGE, version)
    log(f"podman build --target simulation-worker -> {WORKER_IMAGE}")
    build("simulation-worker", WORKER_IMAGE, version)
    figures["build_s"] = round(time.monotonic() - mark, 1)
    figures["hub_image_bytes"] = inspect(HUB_IMAGE)["Size"]
    figures["worker_image_bytes"] = inspect(WORKER_IMAGE)["Size"]
    figures["base_image_bytes"] = inspect(BASE_IMAGE)["Size"]
    mark = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="emp-image-") as tmp:
        work = Path(tmp)
        with exported(HUB_IMAGE, work) as hub, exported(WORKER_IMAGE, work) as worker:
            log("the images' users, entry points, health check, labels")
            check_config(hub, worker, version)
            log("the hub on its embedded Valkey")
            check_embedded(hub, work)
            with redis_server(work) as redis_url:
                log(f"the hub on {redact(redis_url)}, a job run by the simulation worker image")
                check_with_redis(hub, worker, redis_url, work)
    figures["run_s"] = round(time.monotonic() - mark, 1)
    figures["total_s"] = round(time.monotonic() - started_at, 1)
    figures["conditions"] = (
        f"base {BASE_IMAGE} (Debian bookworm, Python 3.11), {os.cpu_count()} cores"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
