"""The comfyui connector's worker-side overhead per job, against the fake ComfyUI. Prints JSON.

N jobs (the recorded four-node workflow, one PNG output each) run one after another through
`connector_hub` (a real hub and worker) against `plugins/emp-connector-comfyui/tests/
fake_comfyui.py`. Per job: the time `ComfyUIConnector.run` took, minus the fake's own time
for that prompt (from receiving POST /prompt to sending the final `executing {node:
null}`): the WebSocket connect, the submission, following the messages, /history, /view and
storing the output on the hub. p50 and p99 in ms, in all and without the output's upload
to the hub (the worker's default output store, the same for every connector).

Usage: python -m benchmarks.connector_comfyui [--jobs 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.hub import percentiles
from emp_hub.testing import connector_hub
from emp_worker.connector import Job, JobContext

TESTS = Path(__file__).resolve().parent.parent / "plugins" / "emp-connector-comfyui" / "tests"
sys.path.insert(0, str(TESTS))

from emp_connector_comfyui import ComfyUIConnector, ComfyUISettings  # noqa: E402
from fake_comfyui import fake_comfyui  # noqa: E402

WORKFLOW: dict[str, Any] = {
    "1": {
        "class_type": "EmptyImage",
        "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 193865},
    },
    "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
    "3": {
        "class_type": "ImageScale",
        "inputs": {
            "image": ["2", 0],
            "upscale_method": "nearest-exact",
            "width": 32,
            "height": 32,
            "crop": "disabled",
        },
    },
    "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "bench"}},
}


class Timed(ComfyUIConnector):
    """Records how long each run took, and how long of it storing outputs, by prompt id."""

    runs: dict[str, tuple[float, float]]

    async def run(self, job: Job, ctx: JobContext) -> dict[str, Any]:
        began, storing = time.perf_counter(), 0.0
        store = ctx.output

        async def timed_output(*args: Any, **kwargs: Any) -> Any:
            nonlocal storing
            start = time.perf_counter()
            try:
                return await store(*args, **kwargs)
            finally:
                storing += time.perf_counter() - start

        setattr(ctx, "output", timed_output)  # noqa: B010
        result = await super().run(job, ctx)
        self.runs[result["prompt_id"]] = (time.perf_counter() - began, storing)
        return result


async def overhead(jobs: int) -> dict[str, Any]:
    """Run `jobs` jobs; the connector's p50/p99 overhead beyond the fake's own time."""
    async with fake_comfyui(node_s=0) as (fake, url, _):
        connector = Timed(ComfyUISettings.model_validate({"url": url}))
        connector.runs = {}
        async with connector_hub(connector) as hub:
            for n in range(jobs):  # another colour each time: nothing served from the cache
                workflow = json.loads(json.dumps(WORKFLOW))
                workflow["1"]["inputs"]["color"] = n
                job = await hub.run("comfyui", {"workflow": workflow})
                assert job["status"] == "completed", job
        samples = [
            (took - (fake.timings[pid][1] - fake.timings[pid][0]), storing)
            for pid, (took, storing) in connector.runs.items()
        ]
    return {
        "connector": "comfyui",
        "jobs": jobs,
        "overhead": percentiles([total for total, _ in samples]),
        "overhead_without_output_upload": percentiles([total - up for total, up in samples]),
        "output_upload_to_hub": percentiles([up for _, up in samples]),
    }


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(overhead(args.jobs)), indent=2))


if __name__ == "__main__":
    main()
