"""The REST connector's worker-side overhead per job against its fake service. Prints JSON.

N sync jobs, one at a time, through a real hub and worker (`emp_hub.testing.connector_hub`)
to the fake REST service of the plugin's tests (POST /echo, answering at once). Overhead per
job: from the hub handing the job out (`claimed_at`) to the hub recording its completion
(`finished_at`), minus the fake's own time in its handler (`elapsed_s` in its answer): the
HTTP call to the service, the connector, the worker's runtime and the hub's handling;
`baseline` is the same for a connector that calls no service.

Usage: python -m benchmarks.connector_rest [--jobs 200]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.hub import percentiles

TESTS = Path(__file__).resolve().parents[1] / "plugins" / "emp-connector-rest" / "tests"


def fake_module() -> Any:
    """The plugin tests' fake REST service module."""
    spec = importlib.util.spec_from_file_location("fake_rest", TESTS / "fake_rest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("fake_rest", module)
    spec.loader.exec_module(module)
    return module


async def overhead(jobs: int) -> dict[str, Any]:
    """p50/p99 worker-side overhead (ms) of `jobs` sync REST jobs beyond the fake's time."""
    from emp_connector_rest import Instance, RestConnector, RestInstance, RestSettings

    from emp_hub.testing import connector_hub

    async with fake_module().fake_rest() as fake:
        settings = RestInstance.model_validate({"base_url": fake.url, "endpoint": "/echo"})
        rest = RestConnector(RestSettings(), [Instance(name="rest", settings=settings)])
        async with connector_hub(rest) as hub:
            await hub.run("rest", {"warm": True})
            done = [await hub.run("rest", {"n": n}) for n in range(jobs)]
    failed = [j for j in done if j["status"] != "completed"]
    if failed:
        raise RuntimeError(f"{len(failed)} job(s) did not complete: {failed[0]}")
    samples = [j["finished_at"] - j["claimed_at"] - j["result"]["elapsed_s"] for j in done]
    return {
        "connector": "rest",
        "jobs": jobs,
        "overhead": percentiles(samples),
        "baseline": await baseline(jobs),
        "service_time": percentiles([j["result"]["elapsed_s"] for j in done]),
    }


async def baseline(jobs: int) -> dict[str, float]:
    """The same measure for a connector that answers at once without any service: what the
    hub and worker take alone on this machine (the REST connector's own part is the rest)."""
    from emp_hub.testing import connector_hub
    from emp_worker.connector import Connector, Job, JobContext

    class Instant(Connector):
        name = "instant"

        async def run(self, job: Job, ctx: JobContext) -> Any:
            return {"ok": True}

    async with connector_hub(Instant()) as hub:
        await hub.run("instant", {})
        done = [await hub.run("instant", {"n": n}) for n in range(jobs)]
    return percentiles([j["finished_at"] - j["claimed_at"] for j in done])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(overhead(args.jobs)), indent=2))


if __name__ == "__main__":
    main()
