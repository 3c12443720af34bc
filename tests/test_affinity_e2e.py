"""Model-warm affinity end to end: a real hub and a worker whose (simulation) connector
reports the model it has loaded; the worker gets the job preferring that model first."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import httpx
import pytest
from emp_connector_simulation import SimulationConnector, SimulationSettings

from emp_hub.broker import BrokerSettings
from emp_hub.broker.settings import AffinitySettings
from emp_hub.embedded import EmbeddedValkey
from emp_hub.scheduling import SchedulingSettings
from emp_hub.settings import HubSettings
from emp_hub.testing import running_hub, running_worker
from emp_protocol.jobs import TERMINAL
from emp_worker.testing import eventually

pytestmark = [pytest.mark.slow, pytest.mark.hub]


async def submit(http: httpx.AsyncClient, model: str) -> str:
    body = {
        "job_type": "simulation",
        "payload": {"model": model, "duration": 0},
        "requirements": {"prefer_model": model},
    }
    response = await http.post("/api/jobs", json=body)
    response.raise_for_status()
    job_id: str = response.json()["job_id"]
    return job_id


async def finished(http: httpx.AsyncClient, job_id: str) -> dict[str, Any] | None:
    job: dict[str, Any] = (await http.get(f"/api/jobs/{job_id}")).json()
    return job if job["status"] in TERMINAL else None


async def ended(http: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    return await eventually(lambda: finished(http, job_id), what=f"{job_id} ended")


@pytest.mark.parametrize("enabled", [True, False])
async def test_a_warm_worker_gets_the_job_preferring_its_model_first(enabled: bool) -> None:
    connector = SimulationConnector(SimulationSettings(duration=0, steps=1, loaded=["sdxl"]))
    with tempfile.TemporaryDirectory() as tmp, EmbeddedValkey(Path(tmp) / "valkey") as valkey:
        settings = HubSettings(
            redis_url=valkey.url,
            output_dir=Path(tmp) / "outputs",
            broker=BrokerSettings(namespace="affinity-e2e"),
            scheduling=SchedulingSettings(affinity=AffinitySettings(enabled=enabled)),
        )
        async with running_hub(settings) as url, httpx.AsyncClient(base_url=url) as http:
            cold = await submit(http, "flux")  # older, same priority
            warm = await submit(http, "sdxl")
            async with running_worker(url, [connector]):
                jobs = [await ended(http, job_id) for job_id in (cold, warm)]
    assert [j["status"] for j in jobs] == ["completed", "completed"]
    first = warm if enabled else cold
    assert min(jobs, key=lambda j: j["claimed_at"])["job_id"] == first
    assert connector.loaded_models() == ["flux" if enabled else "sdxl"]  # the last job's
