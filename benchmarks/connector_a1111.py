"""The a1111 connector's worker-side overhead per job against the fake A1111. Prints JSON.

N txt2img jobs (one step, two 64x64 images), one after another, through a real hub and
worker (`emp_hub.testing.connector_hub`) on the fake of the plugin's tests. Per job: from the
hub handing it out (`claimed_at`) to the hub recording its completion (`finished_at`), minus
the time the fake took to answer the generation request (measured inside the fake): the
HTTP exchange, base64 decoding, storing the images on the hub and the protocol. p50/p99 ms.

Usage: python -m benchmarks.connector_a1111 [--jobs 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.hub import percentiles
from emp_hub.testing import connector_hub

TESTS = Path(__file__).resolve().parent.parent / "plugins" / "emp-connector-a1111" / "tests"


async def overhead(jobs: int) -> dict[str, Any]:
    """Run `jobs` jobs against the fake; p50/p99 worker-side overhead in ms."""
    sys.path.insert(0, str(TESTS))
    from conftest import serve
    from emp_connector_a1111 import A1111Connector, A1111Settings
    from fake_a1111 import FakeA1111

    fake = FakeA1111(step_s=0.001)
    async with serve(fake) as url:
        settings = A1111Settings.model_validate({"url": url, "models_refresh_s": 0})
        async with connector_hub(A1111Connector(settings)) as hub:
            samples = []
            for _ in range(jobs):
                job = await hub.run("a1111", {"prompt": "bench", "steps": 1, "batch_size": 2})
                assert job["status"] == "completed", job
                samples.append(job["finished_at"] - job["claimed_at"] - fake.spent[-1])
    return {"connector": "a1111", "jobs": jobs, "overhead_ms": percentiles(samples)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(overhead(args.jobs)), indent=2))


if __name__ == "__main__":
    main()
