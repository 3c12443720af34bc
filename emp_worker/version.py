"""The worker's version, and the commit and date it was built from.

The version has one source: the `version` of the root pyproject.toml, read here from the
installed distribution's metadata (`emp`). The single-file worker carries `build_info.json`
next to this module, written by scripts/build-worker.sh (the commit and the build date,
from SOURCE_DATE_EPOCH); a normal install asks git for the commit of the checkout it runs
from, if there is one.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import subprocess
from pathlib import Path

DISTRIBUTION = "emp"
BUILD_INFO = Path(__file__).with_name("build_info.json")


def version() -> str:
    """The version of the `emp` distribution (the root pyproject.toml's)."""
    return importlib.metadata.version(DISTRIBUTION)


@functools.cache
def build_info() -> dict[str, str]:
    """`commit` and `built`: from build_info.json in a binary, else git, else "unknown"."""
    try:
        info = json.loads(BUILD_INFO.read_text())
        return {"commit": str(info["commit"]), "built": str(info["built"])}
    except (OSError, ValueError, KeyError):
        return {"commit": _git_commit() or "unknown", "built": "unknown"}


def _git_commit() -> str | None:
    """The commit of the git checkout this package runs from (an editable install)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        done = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def version_line(program: str = "emp-worker") -> str:
    """`emp-worker <version> (commit <sha>, built <date>)`."""
    info = build_info()
    return f"{program} {version()} (commit {info['commit']}, built {info['built']})"
