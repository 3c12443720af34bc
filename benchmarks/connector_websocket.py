"""Worker-side overhead of the websocket connector per job, against its fake service.

Runs N jobs one after another through a real hub and worker (`connector_hub`) and the fake
WebSocket service of the plugin's tests. Per job, overhead = the time the connector's `run`
took minus the fake's own time (from the job frame's arrival to its result frame): the
connection, the frames' encoding and decoding, progress reports. The hub, its Valkey client
and the worker share the benchmark's event loop with the connector, so their work between
the connector's steps counts too; `alone_*` is the same measure without a hub
(`fake_context`), the connector's own share. Prints JSON.
Usage: python benchmarks/connector_websocket.py [jobs]
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent.parent / "plugins/emp-connector-websocket/tests"))

from emp_connector_websocket import WebSocketConnector, WebSocketSettings
from fake_ws_service import fake_ws_service

from emp_hub.testing import connector_hub
from emp_worker.connector import Job, JobContext
from emp_worker.testing import fake_context


class TimedConnector(WebSocketConnector):
    """The connector, timing each `run`."""

    def __init__(self, settings: WebSocketSettings) -> None:
        super().__init__(settings)
        self.run_s: dict[str, float] = {}

    async def run(self, job: Job, ctx: JobContext) -> Any:
        began = time.perf_counter()
        try:
            return await super().run(job, ctx)
        finally:
            self.run_s[job.id] = time.perf_counter() - began


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


async def overhead(jobs: int) -> dict[str, Any]:
    """p50/p99 of the connector's per-job overhead in ms beyond the fake's own time."""
    async with fake_ws_service() as fake:
        connector = TimedConnector(WebSocketSettings.model_validate({"url": fake.url}))
        async with connector_hub(connector) as hub:
            for _ in range(jobs):
                job = await hub.run("websocket", {"steps": 3, "step_s": 0.001})
                assert job["status"] == "completed", job
        extra = [1000 * (connector.run_s[j] - fake.durations[j]) for j in fake.durations]
        alone = []
        for n in range(jobs):
            ctx = fake_context("websocket", job=Job(id=f"alone-{n}", service="websocket"))
            ctx.job.payload.update(steps=3, step_s=0.001)
            began = time.perf_counter()
            await connector.run(ctx.job, ctx)
            alone.append(1000 * (time.perf_counter() - began - fake.durations[ctx.job.id]))
    return {
        "connector": "websocket",
        "jobs": jobs,
        "overhead_ms_p50": round(statistics.median(extra), 3),
        "overhead_ms_p99": round(_percentile(extra, 0.99), 3),
        "alone_overhead_ms_p50": round(statistics.median(alone), 3),
        "alone_overhead_ms_p99": round(_percentile(alone, 0.99), 3),
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(overhead(int(sys.argv[1]) if len(sys.argv) > 1 else 200))))
