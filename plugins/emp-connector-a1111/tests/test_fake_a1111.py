"""The fake A1111 answers as the real one does (comfyui-a1111.md, section 4)."""

from __future__ import annotations

import asyncio

import httpx
from conftest import serve
from fake_a1111 import FakeA1111

from emp_worker.testing import eventually


async def test_idle_progress_options_models_and_errors() -> None:
    fake = FakeA1111()
    async with serve(fake) as url, httpx.AsyncClient(base_url=url) as http:
        idle = (await http.get("/sdapi/v1/progress")).json()
        assert (idle["progress"], idle["eta_relative"], idle["current_image"]) == (0, 0, None)
        assert set(idle["state"]) >= {"interrupted", "job_count", "sampling_step"}
        assert (await http.post("/sdapi/v1/interrupt")).json() == {}
        assert fake.interrupted is False  # no effect while idle
        [item, _] = (await http.get("/sdapi/v1/sd-models")).json()
        assert set(item) == {"title", "model_name", "hash", "sha256", "filename", "config"}
        assert item["title"] == f"{item['filename'].rsplit('/', 1)[-1]} [{item['hash']}]"
        assert (await http.get("/sdapi/v1/options")).json()["sd_model_checkpoint"] == item["title"]
        unknown = await http.post("/sdapi/v1/options", json={"sd_model_checkpoint": "x"})
        assert unknown.status_code == 500
        assert unknown.json() == {
            "error": "RuntimeError",
            "detail": "",
            "body": "",
            "errors": "model 'x' not found",
        }
        assert (
            await http.post("/sdapi/v1/options", json={"sd_model_checkpoint": "31e35c80fc"})
        ).json() is None
        missing = await http.post("/sdapi/v1/img2img", json={"prompt": "x"})
        assert (missing.status_code, missing.json()["detail"]) == (404, "Init image not found")
        invalid = await http.post("/sdapi/v1/txt2img", json={"steps": "x"})
        assert invalid.status_code == 422
        assert invalid.json()["detail"][0]["type"] == "type_error.integer"


async def test_api_auth_and_interrupt_with_partial_images() -> None:
    fake = FakeA1111(auth=("u", "p"), step_s=0.02)
    async with serve(fake) as url, httpx.AsyncClient(base_url=url) as http:
        anonymous = await http.get("/sdapi/v1/progress")
        assert anonymous.status_code == 401 and "www-authenticate" not in anonymous.headers
        assert anonymous.json()["detail"] == "Not authenticated"
        wrong = await http.get("/sdapi/v1/progress", auth=("u", "no"))
        assert wrong.json()["detail"] == "Incorrect username or password"
        assert (await http.get("/internal/ping")).json() == {}  # not behind --api-auth
        running = asyncio.create_task(
            http.post("/sdapi/v1/txt2img", json={"steps": 100}, auth=("u", "p"))
        )
        await eventually(lambda: fake.sampling_step >= 3, what="step 3")
        await http.post("/sdapi/v1/interrupt", auth=("u", "p"))
        answer = await running
        assert answer.status_code == 200 and len(answer.json()["images"]) == 1
        after = (await http.get("/sdapi/v1/progress", auth=("u", "p"))).json()
        assert after["state"]["interrupted"] is True and after["state"]["job_count"] == 0
