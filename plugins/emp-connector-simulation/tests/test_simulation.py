"""The simulation connector on a real hub (emp_hub.testing), and on its own."""

from __future__ import annotations

import pytest
from emp_connector_simulation import SimulationConnector, SimulationSettings, png

from emp_hub.testing import connector_hub
from emp_worker.connector import Job, JobFailed
from emp_worker.testing import fake_context


def settings(**values: object) -> SimulationSettings:
    return SimulationSettings.model_validate({"duration": 0.05, "steps": 2, **values})


@pytest.mark.slow
async def test_runs_a_job_with_progress_and_an_image() -> None:
    connector = SimulationConnector(settings(output_image=True, models=["sdxl"]))
    async with connector_hub(connector) as hub:
        job = await hub.run("simulation", {"prompt": "a fox"}, requirements={"models": ["sdxl"]})
        assert job["status"] == "completed", job
        assert job["result"]["status"] == "success"
        [image] = job["result"]["outputs"]
        assert (await hub.download(image["url"])).startswith(b"\x89PNG")
        assert job["progress"] == 100


@pytest.mark.slow
async def test_failures_are_retryable_or_fatal() -> None:
    # No backoff before the retry: the test does not wait out the real one.
    async with connector_hub(SimulationConnector(settings()), broker={"retry_base_s": 0}) as hub:
        retried = await hub.run("simulation", {"fail_attempts": 1}, max_attempts=3)
        assert (retried["status"], retried["attempt"], retried["failures"]) == ("completed", 2, 1)
        fatal = await hub.run("simulation", {"fail": "fatal"})
        assert fatal["status"] == "failed" and "fatal" in fatal["error"]


def test_original_environment_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIMULATION_PROCESSING_TIME", "3.5")
    monkeypatch.setenv("SIMULATION_STEPS", "7")
    monkeypatch.setenv("EMP_SIMULATION_SERVICES", "simulation,comfyui")
    connector = SimulationConnector()
    assert (connector.settings.duration, connector.settings.steps) == (3.5, 7)
    assert connector.capabilities().services == {"simulation", "comfyui"}


async def test_random_durations_are_seeded_and_bounded() -> None:
    def durations() -> list[float]:
        connector = SimulationConnector(settings(duration=1, duration_max=2, seed=7))
        return [connector._duration(Job(id=str(i), service="simulation")) for i in range(20)]

    first = durations()
    assert first == durations() and all(1 <= d <= 2 for d in first) and len(set(first)) > 1


async def test_failure_rate() -> None:
    connector = SimulationConnector(settings(failure_rate=1.0, failure_kind="fatal", steps=1))
    ctx = fake_context("simulation")
    with pytest.raises(JobFailed) as failed:
        await connector.run(ctx.job, ctx)
    assert failed.value.retryable is False
    assert [r.percent for r in ctx.reports] == [0] and ctx.outputs == []


def test_png_is_a_png() -> None:
    data = png(8, 4)
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and b"IHDR" in data and data.endswith(b"IEND\xaeB`\x82")
