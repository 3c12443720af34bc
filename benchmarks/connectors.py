"""The worker-side overhead each connector adds per job, against its fake service. Prints
JSON.

For each connector (comfyui, a1111, rest, websocket), `benchmarks/connector_<name>.py`
runs N jobs through a real hub and worker (`emp_hub.testing.connector_hub`, in one
process) against that connector's fake service, and measures per job the time the worker
spent beyond the fake service's own time (p50 and p99, in ms; each module says what it
counts). Each runs in a process of its own: they load their plugin's test fakes. The
issue's aim is under 5 ms p50.

Usage: python -m benchmarks.connectors [--jobs 50] [--only comfyui,rest]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from typing import Any

import emp_hub

CONNECTORS = ("comfyui", "a1111", "rest", "websocket")


def overhead(name: str, jobs: int) -> dict[str, Any]:
    """One connector's figures, measured in a child process."""
    code = (
        "import asyncio, json\n"
        f"from benchmarks.connector_{name} import overhead\n"
        f"print(json.dumps(asyncio.run(overhead({jobs}))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"benchmarks.connector_{name} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> None:
    """Measure each connector and print the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--only", default=",".join(CONNECTORS), help="comma-separated")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = set(names) - set(CONNECTORS)
    if unknown:
        parser.error(f"unknown connectors: {', '.join(sorted(unknown))}")
    report = {
        "benchmark": "connectors",
        "conditions": {
            "jobs": args.jobs,
            "setup": "hub, worker and fake service in one process (connector_hub), "
            "embedded Valkey; one connector at a time",
            "emp": emp_hub.__version__,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        },
        "results": {name: overhead(name, args.jobs) for name in names},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
