"""The a1111 connector on a real hub and worker, against a fake A1111 (fake_a1111.py)."""

from __future__ import annotations

import asyncio
import base64
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import serve
from emp_connector_a1111 import A1111Connector, A1111Settings, describe_error
from fake_a1111 import FakeA1111, png

from emp_hub.embedded import free_port
from emp_hub.testing import connector_hub
from emp_worker.cli import doctor
from emp_worker.connector import JobFailed
from emp_worker.settings import WorkerSettings
from emp_worker.testing import eventually, fake_context

SD15 = "v1-5-pruned-emaonly.safetensors [6ce0161689]"
SDXL = "sd_xl_base_1.0.safetensors [31e35c80fc]"


def connector(url: str, **values: Any) -> A1111Connector:
    settings = A1111Settings.model_validate(
        {"url": url, "poll_interval_s": 0.01, "models_refresh_s": 0, **values}
    )
    return A1111Connector(settings)


@pytest.mark.slow
async def test_txt2img_stores_images_and_reports_progress() -> None:
    fake = FakeA1111(step_s=0.02)
    async with serve(fake) as url, connector_hub(connector(url), progress_interval_s=0) as hub:
        job_id = await hub.submit("a1111", {"prompt": "a fox", "steps": 20, "batch_size": 2})
        seen: list[float] = []
        while (job := await hub.job(job_id))["status"] not in {"completed", "failed"}:
            seen.append(job["progress"])
            await asyncio.sleep(0.01)
        assert job["status"] == "completed", job
        result = job["result"]
        assert [r["name"] for r in result["images"]] == ["image-0.png", "image-1.png"]
        assert result["outputs"] == result["images"]
        assert (await hub.download(result["images"][0]["url"])).startswith(b"\x89PNG")
        assert result["info"]["steps"] == 20 and result["info"]["sd_model_name"]
        assert result["parameters"]["prompt"] == "a fox"
        assert "base64" not in str(result) and len(str(result)) < 5000  # no image bytes
        assert job["progress"] == 100
        assert seen == sorted(seen) and any(0 < p < 100 for p in seen), seen
        assert fake.progress_polls > 0


async def test_progress_is_monotonic_with_an_eta() -> None:
    fake = FakeA1111(step_s=0.01)
    async with serve(fake) as url:
        ctx = fake_context("a1111", {"prompt": "x", "steps": 30})
        await connector(url).run(ctx.job, ctx)
    percents = [r.percent for r in ctx.reports]
    assert percents == sorted(percents) and percents[-1] == 100
    assert any("ETA" in r.message and "step" in r.message for r in ctx.reports), ctx.reports


@pytest.mark.slow
async def test_img2img_with_the_original_payload() -> None:
    fake = FakeA1111()
    init = "data:image/png;base64," + base64.b64encode(png(8, 8)).decode()
    async with serve(fake) as url, connector_hub(connector(url)) as hub:
        job = await hub.run(
            "a1111",
            {"init_images": [init], "prompt": "a cat", "denoising_strength": 0.5, "steps": 3},
        )
        assert job["status"] == "completed", job
        assert fake.requests[-1]["init_images"] == [init]
        assert job["result"]["endpoint"] == "img2img"
        assert job["result"]["parameters"]["init_images"] == "<1 images>"
        assert len(job["result"]["outputs"]) == 1
        missing = await hub.run("a1111", {"endpoint": "img2img", "prompt": "no image"})
        assert missing["status"] == "failed" and "Init image not found" in missing["error"]
        assert missing["attempt"] == 1  # not retried


@pytest.mark.slow
async def test_an_earlier_jobs_output_as_init_image_and_controlnet_image() -> None:
    """A reference to job A's output (or its URL) stands for a base64 image in img2img's
    `init_images`, `mask` and a ControlNet unit's image: A1111 gets exactly A's bytes."""
    fake = FakeA1111()
    async with serve(fake) as url, connector_hub(connector(url)) as hub:
        first = await hub.run("a1111", {"prompt": "a fox", "steps": 2}, customer="acme")
        [ref] = first["result"]["images"]
        b64 = base64.b64encode(await hub.download(ref["url"])).decode()
        unit = {"module": "canny", "image": {"image": ref["url"], "mask": None}}
        payload = {
            "init_images": [ref, "data:image/png;base64,AAAA"],
            "mask": ref["url"],
            "prompt": "a cat",
            "steps": 2,
            "alwayson_scripts": {"controlnet": {"args": [unit, {"input_image": ref}]}},
        }
        job = await hub.run("a1111", payload, customer="acme")
        assert job["status"] == "completed", job
        sent = fake.requests[-1]
        assert sent["init_images"] == [b64, "data:image/png;base64,AAAA"]
        assert sent["mask"] == b64
        assert sent["alwayson_scripts"]["controlnet"]["args"] == [
            {"module": "canny", "image": {"image": b64, "mask": None}},
            {"input_image": b64},
        ]
        requests = len(fake.requests)
        theirs = await hub.run("a1111", payload, customer="globex", max_attempts=3)
        assert (theirs["status"], theirs["attempt"]) == ("failed", 1), theirs
        assert "HTTP 404" in theirs["error"] and "may read" in theirs["error"]
        assert len(fake.requests) == requests  # nothing reached A1111


async def test_model_switch_one_at_a_time_and_visible_in_progress() -> None:
    fake = FakeA1111(load_s=0.1)
    async with serve(fake) as url:
        a1111 = connector(url)
        await a1111.start()
        ctxs = [
            fake_context("a1111", {"prompt": "x", "steps": 2, "model": m})
            for m in ("sd_xl_base_1.0", "sd_xl_base_1.0.safetensors", "6ce0161689")
        ]
        await asyncio.gather(*(a1111.run(c.job, c) for c in ctxs[:2]))
        assert fake.switches == [SDXL]  # the second job found it loaded
        assert any("loading model " + SDXL in r.message for r in ctxs[0].reports + ctxs[1].reports)
        result = await a1111.run(ctxs[2].job, ctxs[2])
        assert fake.switches == [SDXL, SD15] and result["model"] == SD15
        assert any(r.stage == "loading_model" for r in ctxs[2].reports)
        unknown = fake_context("a1111", {"prompt": "x", "model": "nope"})
        with pytest.raises(JobFailed) as failed:
            await a1111.run(unknown.job, unknown)
        assert "no checkpoint 'nope'" in str(failed.value) and not failed.value.retryable
        await a1111.stop()


@pytest.mark.slow
async def test_models_are_capabilities_and_health() -> None:
    fake = FakeA1111()
    async with serve(fake) as url:
        a1111 = connector(url)
        async with connector_hub(a1111) as hub:
            caps = a1111.capabilities()
            assert {"v1-5-pruned-emaonly", "sd_xl_base_1.0.safetensors"} <= caps.models["a1111"]
            health = await a1111.health()
            assert health.ok and "2 checkpoints" in health.detail and SD15 in health.detail
            [worker] = (await hub.http.get("/api/workers")).json()
            assert "sd_xl_base_1.0" in str(worker)


@pytest.mark.slow
async def test_cancel_interrupts_a1111() -> None:
    fake = FakeA1111(step_s=0.05)
    async with serve(fake) as url, connector_hub(connector(url)) as hub:
        job_id = await hub.submit("a1111", {"prompt": "slow", "steps": 200})
        await eventually(lambda: fake.sampling_step > 2, what="sampling under way")
        await hub.cancel(job_id)
        job = await hub.wait(job_id, within_s=10)
        assert job["status"] == "cancelled", job
        await eventually(lambda: fake.job_count == 0, within_s=5, what="nothing left running")
        assert fake.interrupts >= 1 and fake.sampling_step < 200
        after = await hub.run("a1111", {"prompt": "next", "steps": 3})
        assert after["status"] == "completed" and after["result"]["info"]["steps"] == 3


async def test_basic_auth_as_api_auth() -> None:
    fake = FakeA1111(auth=("emp", "s3cret"))
    async with serve(fake) as url:
        ok = connector(url, username="emp", password="s3cret")
        ctx = fake_context("a1111", {"prompt": "x", "steps": 1})
        assert (await ok.run(ctx.job, ctx))["status"] == "success"
        wrong = connector(url, username="emp", password="nope")
        health = await wrong.health()
        assert not health.ok and "Incorrect username or password" in health.detail
        anonymous = await connector(url).health()
        assert not anonymous.ok and "Not authenticated" in anonymous.detail


def test_original_environment_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_A1111_URL", "http://gpu-box:7861")
    monkeypatch.setenv("A1111_USERNAME", "emp")
    monkeypatch.setenv("A1111_PASSWORD", "pw")
    monkeypatch.setenv("EMP_A1111_SERVICES", "a1111,sd15")
    a1111 = A1111Connector()
    assert (a1111.settings.url, a1111.settings.username, a1111.settings.password) == (
        "http://gpu-box:7861",
        "emp",
        "pw",
    )
    assert a1111.capabilities().services == {"a1111", "sd15"}


@pytest.mark.slow
async def test_errors_from_a1111_bodies() -> None:
    fake = FakeA1111()
    async with serve(fake) as url, connector_hub(connector(url)) as hub:
        sampler = await hub.run("a1111", {"prompt": "x", "sampler_name": "Nope"})
        assert (
            sampler["status"] == "failed"
            and "HTTP 400 HTTPException: Sampler not found" in (sampler["error"])
        )
        invalid = await hub.run("a1111", {"prompt": "x", "steps": "many"})
        assert "invalid request: steps: value is not a valid integer" in invalid["error"]
        assert invalid["attempt"] == 1
        fake.loaded = None  # no checkpoint: a 500 FileNotFoundError, retryable
        none = await hub.run("a1111", {"prompt": "x"}, max_attempts=1)
        assert none["status"] == "failed" and "FileNotFoundError" in none["error"]
        bad = await hub.run("a1111", {"endpoint": "upscale"})
        assert "unknown endpoint 'upscale'" in bad["error"]


def test_describe_error_shapes() -> None:
    def response(status: int, **kwargs: Any) -> httpx.Response:
        return httpx.Response(status, request=httpx.Request("GET", "http://x/"), **kwargs)

    options = response(
        500,
        json={"error": "RuntimeError", "detail": "", "body": "", "errors": "model 'x' not found"},
    )
    assert describe_error(options) == "HTTP 500 RuntimeError: model 'x' not found"
    assert describe_error(response(502, text="<html>Bad Gateway</html>")) == (
        "HTTP 502: <html>Bad Gateway</html>"
    )


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["json", "images", "base64"])
async def test_malformed_answers_fail_clearly(kind: str) -> None:
    fake = FakeA1111(malformed=kind)
    async with serve(fake) as url, connector_hub(connector(url)) as hub:
        job = await hub.run("a1111", {"prompt": "x", "steps": 2}, max_attempts=1)
        assert job["status"] == "failed", job
        expected = {"json": "not JSON", "images": "without images", "base64": "not valid base64"}
        assert expected[kind] in job["error"]


@pytest.mark.slow
async def test_down_at_start_the_job_waits_until_a1111_is_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A1111 down: health and doctor say so, the worker does not offer `a1111` (the job
    stays pending, the hub says why); once A1111 answers, the job runs."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    a1111 = connector(url, connect_timeout_s=1)
    health = await a1111.health()
    assert not health.ok and "unreachable" in health.detail
    monkeypatch.setenv("EMP_A1111_URL", url)
    report, healthy = await doctor(
        WorkerSettings(hub_url="ws://127.0.0.1:9", connectors=["a1111"], worker_id="doc")
    )
    entry = report["connectors"]["a1111"]
    assert not healthy and not entry["ok"] and "unreachable" in entry["detail"]
    assert "its services (a1111) are not offered" in entry["detail"]
    assert "a1111" not in report["capabilities"]["services"]
    async with connector_hub(a1111, health_interval_s=0.1) as hub:
        job_id = await hub.submit("a1111", {"prompt": "x", "steps": 2})
        pending = await hub.wait(job_id, within_s=0.5)
        assert pending["status"] == "pending", pending
        assert "no live worker offers service 'a1111'" in pending["unschedulable"]
        async with serve(FakeA1111(), port=port):
            job = await hub.wait(job_id, within_s=20)
            assert job["status"] == "completed" and job["attempt"] == 1, job
            assert (await a1111.health()).ok
            report, _ = await doctor(
                WorkerSettings(hub_url="ws://127.0.0.1:9", connectors=["a1111"], worker_id="doc")
            )
            assert report["connectors"]["a1111"]["ok"]
            assert "a1111" in report["capabilities"]["services"]


@pytest.mark.slow
async def test_dying_mid_job_fails_retryable() -> None:
    port = free_port()
    fake = Path(__file__).with_name("fake_a1111.py")
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(fake), "--port", str(port), "--step-s", "0.05"
    )
    try:
        url = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient() as http:

            async def answers() -> bool:
                try:
                    await http.get(f"{url}/sdapi/v1/progress")
                except httpx.TransportError:
                    return False
                return True

            await eventually(answers, within_s=20, every_s=0.05, what="the fake A1111 up")
        async with connector_hub(connector(url), broker={"retry_base_s": 0}) as hub:
            job_id = await hub.submit("a1111", {"prompt": "x", "steps": 400}, max_attempts=2)

            async def progressed() -> bool:
                return bool((await hub.job(job_id))["progress"] > 0)

            await eventually(progressed, within_s=20, what="progress reported")
            process.kill()
            job = await hub.wait(job_id, within_s=20)
            assert job["status"] == "failed", job
            assert job["attempt"] == 2 and "unreachable" in job["error"], job
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


@pytest.mark.slow
async def test_interrupted_by_someone_else_fails_retryable() -> None:
    fake = FakeA1111(step_s=0.02)
    async with serve(fake) as url, connector_hub(connector(url)) as hub:
        job_id = await hub.submit("a1111", {"prompt": "x", "steps": 200}, max_attempts=1)
        await eventually(lambda: fake.sampling_step > 2, what="sampling under way")
        async with httpx.AsyncClient() as http:  # another client of the same A1111
            await http.post(f"{url}/sdapi/v1/interrupt")
        job = await hub.wait(job_id, within_s=10)
        assert job["status"] == "failed" and "interrupted outside emp" in job["error"], job
        assert job["result"] is None or not job["result"].get("images")


@pytest.mark.slow
async def test_a_timed_out_job_interrupts_a1111() -> None:
    fake = FakeA1111(step_s=0.05)
    async with serve(fake) as url, connector_hub(connector(url)) as hub:
        job = await hub.run(
            "a1111", {"prompt": "slow", "steps": 400}, job_timeout=1, max_attempts=1
        )
        assert job["status"] == "failed", job
        await eventually(lambda: fake.job_count == 0, within_s=5, what="no job left")
        assert fake.interrupts >= 1 and fake.sampling_step < 400


@pytest.mark.slow
async def test_two_jobs_wanting_different_models_each_get_theirs() -> None:
    fake = FakeA1111(step_s=0.02, load_s=0.1)
    async with serve(fake) as url, connector_hub(connector(url, concurrency=2)) as hub:
        first = await hub.submit("a1111", {"prompt": "a", "steps": 10, "model": "sd_xl_base_1.0"})
        second = await hub.submit("a1111", {"prompt": "b", "steps": 10, "model": "6ce0161689"})
        jobs = [await hub.wait(first), await hub.wait(second)]
        assert [j["status"] for j in jobs] == ["completed", "completed"], jobs
        assert [j["result"]["info"]["sd_model_name"] for j in jobs] == [
            "sd_xl_base_1.0",
            "v1-5-pruned-emaonly",
        ]
        assert fake.switches == [SDXL, SD15]  # one at a time, each before its generation


def test_installed_as_an_emp_worker_plugin() -> None:
    from importlib.metadata import entry_points

    import emp_connector_a1111

    [entry] = [e for e in entry_points(group="emp_worker") if e.name == "a1111"]
    assert entry.load() is emp_connector_a1111
    registered: list[type] = []
    emp_connector_a1111.register_connectors(registered.append)
    assert registered == [A1111Connector]


async def test_loaded_models_are_the_checkpoint_a1111_has_loaded() -> None:
    fake = FakeA1111(step_s=0.001, loaded=SDXL)
    async with serve(fake) as url:
        a1111 = connector(url)
        assert a1111.loaded_models() is None  # not asked yet: it cannot tell
        await a1111.start()
        try:
            # The names a job's requirements give: model name and file name (as capabilities).
            assert a1111.loaded_models() == ["sd_xl_base_1.0", "sd_xl_base_1.0.safetensors"]
            ctx = fake_context("a1111", {"prompt": "x", "steps": 1, "model": "v1-5-pruned-emaonly"})
            await a1111.run(ctx.job, ctx)
            assert fake.loaded == SD15
            assert a1111.loaded_models() == [
                "v1-5-pruned-emaonly",
                "v1-5-pruned-emaonly.safetensors",
            ]
            fake.loaded = SDXL  # switched behind its back (the web UI): health reads it again
            assert (await a1111.health()).ok
            assert a1111.loaded_models() == ["sd_xl_base_1.0", "sd_xl_base_1.0.safetensors"]
        finally:
            await a1111.stop()
