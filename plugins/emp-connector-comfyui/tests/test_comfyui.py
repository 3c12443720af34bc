"""The ComfyUI connector against a fake ComfyUI (fake_comfyui.py, replaying the recorded
traffic in transcripts/), on a real hub and worker and on its own."""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from emp_connector_comfyui import ComfyUIConnector, ComfyUISettings
from fake_comfyui import FakeComfyUI, fake_comfyui, png, png_facts

from emp_hub.testing import connector_hub, running_hub  # noqa: F401
from emp_worker.cli import doctor
from emp_worker.connector import JobFailed
from emp_worker.settings import WorkerSettings
from emp_worker.testing import eventually, fake_context

TRANSCRIPTS = Path(__file__).parent / "transcripts"


def recorded(name: str) -> list[dict[str, Any]]:
    """A transcript's lines."""
    lines = (TRANSCRIPTS / f"{name}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def recorded_workflow(name: str = "success", color: int | None = None) -> dict[str, Any]:
    """The workflow the transcript's POST /prompt sent (with another colour: not cached)."""
    [first] = [
        m
        for m in recorded(name)
        if m["msg"].get("path") == "/prompt" and "body" in m["msg"] and m["dir"] == "request"
    ]
    graph: dict[str, Any] = copy.deepcopy(first["msg"]["body"]["prompt"])
    if color is not None:
        graph["1"]["inputs"]["color"] = color
    return graph


def settings(url: str, **values: Any) -> ComfyUISettings:
    return ComfyUISettings.model_validate({"url": url, "reconnect_s": 1, "poll_s": 0.05, **values})


Served = tuple[FakeComfyUI, str, Any]


@pytest.fixture
async def comfy() -> AsyncIterator[Served]:
    async with fake_comfyui() as served:
        yield served


# -- the fake is faithful --------------------------------------------------------------------


async def test_fake_replays_the_recorded_success(comfy: Served) -> None:
    _, url, _ = comfy
    [request] = [m["msg"]["body"] for m in recorded("success") if m["dir"] == "request"]
    wanted = [m["msg"]["type"] for m in recorded("success") if m["conn"] == "ws"]
    ws_url = f"{url.replace('http', 'ws')}/ws?clientId={request['client_id']}"
    async with websockets.connect(ws_url) as ws, httpx.AsyncClient(base_url=url) as http:
        answer = await http.post("/prompt", json=request)
        assert answer.json() == {
            "prompt_id": request["prompt_id"],
            "number": 0,
            "node_errors": {},
        }
        seen: list[tuple[str, Any]] = []
        while not seen or seen[-1] != ("executing", None):
            message = json.loads(await ws.recv())
            seen.append((message["type"], message["data"].get("node", "")))
        history = (await http.get(f"/history/{request['prompt_id']}")).json()
        entry = history[request["prompt_id"]]
        recorded_entry = next(
            m["msg"]["body"]
            for m in recorded("success")
            if m["msg"].get("path", "").startswith("/history")
        )[request["prompt_id"]]
        assert entry["outputs"] == recorded_entry["outputs"]
        assert [k for k, _ in entry["status"]["messages"]] == [
            k for k, _ in recorded_entry["status"]["messages"]
        ]
        image = await http.get(
            "/view",
            params={"filename": "emp_fixture_00001_.png", "type": "output", "subfolder": ""},
        )
        assert image.content.startswith(b"\x89PNG")
    assert [kind for kind, _ in seen] == wanted


@pytest.mark.parametrize("name", ["validation_error", "no_outputs"])
async def test_fake_refuses_what_the_real_one_refuses(comfy: Served, name: str) -> None:
    fake, url, _ = comfy
    [request] = [m["msg"]["body"] for m in recorded(name) if m["dir"] == "request"]
    [response] = [m["msg"] for m in recorded(name) if m["dir"] == "response"]
    async with httpx.AsyncClient(base_url=url) as http:
        answer = await http.post("/api/prompt", json=request)
    assert (answer.status_code, answer.json()) == (response["status"], response["body"])
    assert fake.history == {} and fake.pending == []


async def test_fake_get_endpoints_have_the_recorded_shapes(comfy: Served) -> None:
    _, url, _ = comfy
    async with httpx.AsyncClient(base_url=url) as http:
        for line in recorded("get_endpoints"):
            answer = await http.get(line["path"])
            assert answer.status_code == line["status"]
            body, want = answer.json(), line["body"]
            assert type(body) is type(want)
            if isinstance(want, dict):
                assert set(body) == set(want), line["path"]


@pytest.mark.parametrize("case", [0, 1])
async def test_fake_refuses_bad_inputs_as_recorded(comfy: Served, case: int) -> None:
    """A missing LoadImage file, an INT that is no number, one under its minimum: the
    real server's words (recorded from it, input_errors)."""
    fake, url, _ = comfy
    requests = [m["msg"] for m in recorded("input_errors") if m["dir"] == "request"]
    responses = [m["msg"] for m in recorded("input_errors") if m["dir"] == "response"]
    async with httpx.AsyncClient(base_url=url) as http:
        answer = await http.post("/prompt", json=requests[case]["body"])
    want = responses[case]
    assert (answer.status_code, answer.json()) == (want["status"], want["body"])
    assert fake.history == {} and fake.pending == []


async def test_fake_takes_ints_as_the_real_one_converts_them(comfy: Served) -> None:
    """The real server runs `int(value)`: "8" and 8.7 are 8."""
    _, url, _ = comfy
    graph = recorded_workflow()
    graph["1"]["inputs"].update(width="8", height=8.7)
    graph["3"]["inputs"].update(width=0, height=4)  # 0: keep the aspect
    ctx = fake_context("comfyui", {"workflow": graph})
    await ComfyUIConnector(settings(url)).run(ctx.job, ctx)
    [data] = ctx.files.values()
    assert png_facts(data)[:2] == (4, 4)


async def test_fake_system_stats_on_the_cpu_have_the_recorded_shape(comfy: Served) -> None:
    fake, url, _ = comfy
    fake.cpu = True
    [want] = [m["msg"]["body"] for m in recorded("system_stats_cpu") if m["dir"] == "response"]
    async with httpx.AsyncClient(base_url=url) as http:
        body = (await http.get("/system_stats")).json()
    assert set(body["system"]) == set(want["system"])
    [device], [wanted] = body["devices"], want["devices"]
    assert set(device) == set(wanted)
    assert (device["name"], device["type"], device["index"]) == ("cpu", "cpu", None)
    assert device["vram_total"] == body["system"]["ram_total"]


# -- the connector on a real hub ---------------------------------------------------------------


@pytest.mark.slow
async def test_runs_the_recorded_workflow_outputs_on_the_hub(comfy: Served) -> None:
    fake, url, _ = comfy
    async with connector_hub(ComfyUIConnector(settings(url)), progress_interval_s=0) as hub:
        job = await hub.run("comfyui", {"workflow": recorded_workflow()})
        assert job["status"] == "completed", job
        assert job["progress"] == 100
        result = job["result"]
        [image] = result["nodes"]["4"]["images"]
        assert image["name"] == "emp_fixture_00001_.png"
        data = await hub.download(image["url"])
        assert data == fake.files[("output", "", "emp_fixture_00001_.png")]
        assert "base64" not in json.dumps(result) and len(json.dumps(result)) < 2000
        assert fake.prompts_run == [result["prompt_id"]]


@pytest.mark.slow
async def test_outputs_are_the_workflows_images(comfy: Served) -> None:
    """What the graph makes lands on the hub: its size, its colour, one file per image of
    the batch (as a real ComfyUI writes them)."""
    _, url, _ = comfy
    graph = recorded_workflow(color=0x123456)
    graph["1"]["inputs"]["batch_size"] = 2
    graph["3"]["inputs"].update(width=40, height=30)
    async with connector_hub(ComfyUIConnector(settings(url))) as hub:
        job = await hub.run("comfyui", {"workflow": graph})
        assert job["status"] == "completed", job
        images = job["result"]["nodes"]["4"]["images"]
        assert [i["name"] for i in images] == ["emp_fixture_00001_.png", "emp_fixture_00002_.png"]
        for image in images:
            data = await hub.download(image["url"])
            assert png_facts(data) == (40, 30, (0xED, 0xCB, 0xA9))


async def test_original_payload_shape_and_progress_over_the_whole_workflow(comfy: Served) -> None:
    _, url, _ = comfy
    graph = recorded_workflow()
    graph["5"] = {"class_type": "EmpSteps", "inputs": {"image": ["3", 0], "steps": 4}}
    graph["4"]["inputs"]["images"] = ["5", 0]
    ctx = fake_context("comfyui", {"prompt": graph})
    connector = ComfyUIConnector(settings(url))
    result = await connector.run(ctx.job, ctx)
    percents = [r.percent for r in ctx.reports]
    assert percents == sorted(percents) and percents[-1] == 100
    assert len(set(percents)) >= 8  # nodes and the steps of node 5
    assert any("node 5 (EmpSteps)" in r.message for r in ctx.reports)
    assert list(result["nodes"]) == ["4"] and list(ctx.files) == ["emp_fixture_00001_.png"]


@pytest.mark.slow
async def test_only_our_prompt_completes_the_job(comfy: Served) -> None:
    """Another client's prompt on the same server does not end ours."""
    fake, url, _ = comfy
    fake.node_s = 0.05
    other = {"prompt": recorded_workflow(), "client_id": "someone-else", "prompt_id": "theirs"}
    async with httpx.AsyncClient(base_url=url) as http:
        await http.post("/prompt", json=other)
    ctx = fake_context("comfyui", {"workflow": recorded_workflow(color=1)})
    result = await ComfyUIConnector(settings(url)).run(ctx.job, ctx)
    assert fake.prompts_run == ["theirs", result["prompt_id"]]
    assert list(ctx.files) == ["emp_fixture_00002_.png"]


@pytest.mark.slow
async def test_refused_workflow_fails_not_retryable_with_every_node_error(comfy: Served) -> None:
    fake, url, _ = comfy
    graph = recorded_workflow()
    graph["3"]["inputs"]["upscale_method"] = "no-such-method"
    graph["1"]["inputs"]["width"] = 99999
    async with connector_hub(ComfyUIConnector(settings(url))) as hub:
        job = await hub.run("comfyui", {"workflow": graph}, max_attempts=3)
        assert job["status"] == "failed" and job["attempt"] == 1, job
        assert "no-such-method" in job["error"] and "node 1 (EmptyImage)" in job["error"]
        graph["1"]["class_type"] = "NoSuchNode"
        job = await hub.run("comfyui", {"workflow": graph}, max_attempts=3)
        assert job["status"] == "failed" and "NoSuchNode does not exist" in job["error"]
    assert fake.prompts_run == []


async def test_execution_errors_retryable_only_when_transient(comfy: Served) -> None:
    fake, url, _ = comfy
    connector = ComfyUIConnector(settings(url))
    fake.fail["ImageInvert"] = (
        "torch.OutOfMemoryError",
        "CUDA out of memory. Tried to allocate 2 GiB",
    )
    ctx = fake_context("comfyui", {"workflow": recorded_workflow()})
    with pytest.raises(JobFailed) as oom:
        await connector.run(ctx.job, ctx)
    assert oom.value.retryable and "node 2 (ImageInvert)" in str(oom.value)
    fake.fail["ImageInvert"] = ("builtins.ValueError", "bad image")
    with pytest.raises(JobFailed) as bad:
        await connector.run(ctx.job, ctx)
    assert not bad.value.retryable and str(bad.value).endswith("builtins.ValueError: bad image")


@pytest.mark.slow
async def test_load_image_of_a_file_that_is_no_image_fails_not_retryable(comfy: Served) -> None:
    """An input URL that answers no image: uploaded, then LoadImage fails in ComfyUI (PIL
    cannot read it), an `execution_error` as the real server sends it."""
    _, url, _ = comfy
    graph = recorded_workflow()
    graph["1"] = {"class_type": "LoadImage", "inputs": {"image": f"{url}/object_info/EmptyImage"}}
    async with connector_hub(ComfyUIConnector(settings(url))) as hub:
        job = await hub.run("comfyui", {"workflow": graph}, max_attempts=3)
    assert job["status"] == "failed" and job["attempt"] == 1, job
    assert job["error"] == (
        "ComfyUI failed at node 1 (LoadImage): PIL.UnidentifiedImageError: cannot identify"
        " image file 'COMFY_DATA/in/EmptyImage'"
    ), job["error"]


@pytest.mark.slow
async def test_cancel_running_interrupts_it_in_comfyui(comfy: Served) -> None:
    fake, url, _ = comfy
    fake.node_s = 0.5
    async with connector_hub(ComfyUIConnector(settings(url))) as hub:
        job_id = await hub.submit("comfyui", {"workflow": recorded_workflow()})
        await eventually(lambda: fake.running is not None, what="a prompt running")
        assert fake.running is not None
        prompt_id = fake.running[1]
        await hub.cancel(job_id)
        job = await hub.wait(job_id)
        assert job["status"] == "cancelled"
        await eventually(lambda: prompt_id in fake.history, within_s=5, what="its history")
    assert fake.history[prompt_id]["status"]["status_str"] == "error"
    assert f'POST /interrupt {{"prompt_id": "{prompt_id}"}}' in fake.requests
    assert fake.running is None and fake.pending == []


@pytest.mark.slow
async def test_cancel_queued_deletes_it_from_the_queue(comfy: Served) -> None:
    fake, url, _ = comfy
    fake.hold.clear()  # nothing leaves ComfyUI's queue
    async with connector_hub(ComfyUIConnector(settings(url))) as hub:
        job_id = await hub.submit("comfyui", {"workflow": recorded_workflow()})
        await eventually(lambda: fake.pending, what="a prompt queued")
        await hub.cancel(job_id)
        assert (await hub.wait(job_id))["status"] == "cancelled"
        await eventually(lambda: not fake.pending, within_s=5, what="the queue empty")
    assert fake.pending == [] and fake.prompts_run == []
    assert any(r.startswith('POST /queue {"delete"') for r in fake.requests)


async def test_websocket_dropped_mid_job_recovers_from_history(comfy: Served) -> None:
    fake, url, _ = comfy
    fake.drop_ws_at = "2"
    ctx = fake_context("comfyui", {"workflow": recorded_workflow()})
    result = await ComfyUIConnector(settings(url)).run(ctx.job, ctx)
    assert list(result["nodes"]) == ["4"] and len(fake.prompts_run) == 1
    assert ctx.reports[-1].percent == 100


@pytest.mark.slow
async def test_websocket_back_but_http_not_yet_is_waited_for(comfy: Served) -> None:
    """ComfyUI restarting behind a proxy: the WebSocket reconnects before /history
    answers; the connector keeps asking within `reconnect_s`."""
    fake, url, _ = comfy
    fake.drop_ws_at, fake.down_s = "2", 0.5
    ctx = fake_context("comfyui", {"workflow": recorded_workflow()})
    result = await ComfyUIConnector(settings(url, reconnect_s=5)).run(ctx.job, ctx)
    assert list(result["nodes"]) == ["4"] and len(fake.prompts_run) == 1


@pytest.mark.slow
async def test_http_away_past_reconnect_s_is_lost_comfyui(comfy: Served) -> None:
    fake, url, _ = comfy
    fake.drop_ws_at, fake.down_s = "2", 3
    ctx = fake_context("comfyui", {"workflow": recorded_workflow()})
    with pytest.raises(JobFailed) as failed:
        await ComfyUIConnector(settings(url, reconnect_s=0.3)).run(ctx.job, ctx)
    assert failed.value.retryable and "lost ComfyUI" in str(failed.value), failed.value


@pytest.mark.slow
async def test_history_lag_after_success_is_waited_for(comfy: Served) -> None:
    fake, url, _ = comfy
    fake.history_lag_s = 0.3
    ctx = fake_context("comfyui", {"workflow": recorded_workflow()})
    result = await ComfyUIConnector(settings(url)).run(ctx.job, ctx)
    assert result["nodes"]["4"]["images"][0]["name"] == "emp_fixture_00001_.png"


@pytest.mark.slow
async def test_comfyui_dying_mid_job_fails_retryable() -> None:
    async with fake_comfyui(node_s=0.3) as (fake, url, server):
        ctx = fake_context("comfyui", {"workflow": recorded_workflow()})
        run = asyncio.create_task(
            ComfyUIConnector(settings(url, reconnect_s=0.5)).run(ctx.job, ctx)
        )
        await eventually(lambda: fake.running is not None, what="a prompt running")
        server.should_exit = True
        await fake.drop_sockets()
        with pytest.raises(JobFailed) as failed:
            await asyncio.wait_for(run, 10)
    assert failed.value.retryable


async def test_down_at_start_health_says_so_and_no_jobs_taken() -> None:
    from emp_hub.embedded import free_port

    url = f"http://127.0.0.1:{free_port()}"
    connector = ComfyUIConnector(settings(url))
    health = await connector.health()
    assert not health.ok and "unreachable" in health.detail
    ctx = fake_context("comfyui", {"workflow": recorded_workflow()})
    with pytest.raises(JobFailed) as failed:
        await connector.run(ctx.job, ctx)
    assert failed.value.retryable


async def test_health_and_capabilities(comfy: Served) -> None:
    _, url, _ = comfy
    connector = ComfyUIConnector(settings(url))
    health = await connector.health()
    assert health.ok and "0.3.64" in health.detail and "H200" in health.detail
    assert "checkpoints 1, loras 1, vae 0" in health.detail, health.detail
    caps = connector.capabilities()
    assert caps.models == {
        "comfyui": frozenset({"sd_xl_base_1.0.safetensors", "detail.safetensors"})
    }


async def test_health_on_a_cpu_comfyui_shows_ram_not_vram(comfy: Served) -> None:
    """With --cpu, ComfyUI's device is "cpu" and its "VRAM" figures are the system RAM:
    health says RAM (the machine's, and what is free)."""
    fake, url, _ = comfy
    fake.cpu = True
    health = await ComfyUIConnector(settings(url)).health()
    assert health.ok and "VRAM" not in health.detail, health.detail
    assert "ComfyUI 0.3.64" in health.detail and "device cpu" in health.detail, health.detail
    assert "RAM 23.5 GiB (11.8 GiB free)" in health.detail, health.detail


async def test_health_on_a_gpu_comfyui_shows_vram_and_ram(comfy: Served) -> None:
    _, url, _ = comfy
    health = await ComfyUIConnector(settings(url)).health()
    device = "device cuda:0 NVIDIA H200 : cudaMallocAsync, VRAM 139.7 GiB (130.4 GiB free)"
    assert device in health.detail, health.detail
    assert "RAM 23.5 GiB (11.8 GiB free)" in health.detail, health.detail


async def test_progress_names_the_running_node_and_says_each_thing_once(comfy: Served) -> None:
    """ComfyUI announces a node (`progress_state` running) before `executing` it: the
    report names that node, and no report repeats the one before it."""
    _, url, _ = comfy
    ctx = fake_context("comfyui", {"workflow": recorded_workflow()})
    await ComfyUIConnector(settings(url)).run(ctx.job, ctx)
    reports = [(r.percent, r.message) for r in ctx.reports]
    assert reports[0] == (0, "queued in ComfyUI") and reports[-1] == (100, "done"), reports
    assert all(m.startswith("node ") for _, m in reports[1:-1]), reports
    assert all(a != b for a, b in itertools.pairwise(reports)), reports
    assert reports[1] == (0, "node 1 (EmptyImage)"), reports


async def test_input_image_url_is_uploaded_and_the_workflow_rewritten(comfy: Served) -> None:
    fake, url, _ = comfy
    fake.files[("output", "", "source.png")] = png(7)
    graph = recorded_workflow()
    graph["1"] = {"class_type": "LoadImage", "inputs": {"image": f"{url}/view?filename=source.png"}}
    ctx = fake_context("comfyui", {"workflow": graph})
    await ComfyUIConnector(settings(url)).run(ctx.job, ctx)
    assert fake.files[("input", "", "view")] == png(7)
    assert "POST /upload/image view" in fake.requests


def load_image(image: Any) -> dict[str, Any]:
    """The recorded workflow starting from a LoadImage of `image` instead of EmptyImage."""
    graph = recorded_workflow()
    graph["1"] = {"class_type": "LoadImage", "inputs": {"image": image}}
    return {"workflow": graph}


@pytest.mark.slow
async def test_an_earlier_jobs_output_is_uploaded_as_an_input(comfy: Served) -> None:
    """Job A's output, given to job B as its reference (from A's result) or its URL, reaches
    ComfyUI with exactly A's bytes, and B's workflow loads it."""
    fake, url, _ = comfy
    async with connector_hub(ComfyUIConnector(settings(url))) as hub:
        first = await hub.run("comfyui", {"workflow": recorded_workflow(color=3)}, customer="acme")
        assert first["status"] == "completed", first
        [ref] = first["result"]["outputs"]
        produced = await hub.download(ref["url"])
        for n, given in enumerate((ref, ref["url"], hub.url + ref["url"]), 1):
            job = await hub.run("comfyui", load_image(given), customer="acme")
            assert job["status"] == "completed", job
            assert fake.files[("input", "", ref["name"])] == produced
            assert fake.requests.count(f"POST /upload/image {ref['name']}") == n
            graph = fake.history[job["result"]["prompt_id"]]["prompt"][2]
            assert graph["1"] == {"class_type": "LoadImage", "inputs": {"image": ref["name"]}}


@pytest.mark.slow
async def test_the_documented_example_jobs(comfy: Served) -> None:
    """docs/connectors/comfyui.md's two example jobs, as written: the second loads the
    first's image by its URL."""
    _, url, _ = comfy
    page = Path(__file__).parents[3] / "docs" / "connectors" / "comfyui.md"
    bodies = re.findall(r"-d '(.*?)'\n```", page.read_text(), re.S)
    assert len(bodies) == 2
    async with connector_hub(ComfyUIConnector(settings(url))) as hub:
        first_id = (await hub.http.post("/api/jobs", json=json.loads(bodies[0]))).json()["job_id"]
        first = await hub.wait(first_id)
        assert first["status"] == "completed", first
        [ref] = first["result"]["outputs"]
        second_body = bodies[1].replace("'\"$FIRST\"'", first_id)
        assert ref["url"] in second_body
        second_id = (await hub.http.post("/api/jobs", json=json.loads(second_body))).json()[
            "job_id"
        ]
        second = await hub.wait(second_id)
        assert second["status"] == "completed", second
        assert await hub.download(second["result"]["outputs"][0]["url"]) != await hub.download(
            ref["url"]
        )


@pytest.mark.slow
async def test_another_customers_output_or_a_missing_one_fails_not_retryable(
    comfy: Served,
) -> None:
    fake, url, _ = comfy
    async with connector_hub(ComfyUIConnector(settings(url))) as hub:
        first = await hub.run("comfyui", {"workflow": recorded_workflow(color=5)}, customer="acme")
        [ref] = first["result"]["outputs"]
        fake.requests.clear()
        theirs = await hub.run("comfyui", load_image(ref), customer="globex", max_attempts=3)
        missing = ref["url"].replace(ref["name"], "nope.png")
        gone = await hub.run("comfyui", load_image(missing), customer="acme", max_attempts=3)
        for job in (theirs, gone):
            assert (job["status"], job["attempt"]) == ("failed", 1), job
        assert theirs["error"] == (
            f"input {hub.url}{ref['url']}: HTTP 404 job {first['job_id']} has no output "
            f"{ref['name']} that job {theirs['job_id']} may read (only the outputs of its own "
            "customer's jobs)"
        )
        assert "HTTP 404" in gone["error"] and "has no output nope.png" in gone["error"]
        assert not any(r.startswith(("POST /upload", "POST /prompt")) for r in fake.requests)


@pytest.mark.parametrize(
    "payload", [{}, {"workflow": "not json"}, {"workflow": {"1": {"inputs": {}}}}, {"workflow": []}]
)
async def test_malformed_payloads_fail_not_retryable(payload: dict[str, Any]) -> None:
    ctx = fake_context("comfyui", payload)
    with pytest.raises(JobFailed) as failed:
        await ComfyUIConnector(settings("http://127.0.0.1:9")).run(ctx.job, ctx)
    assert not failed.value.retryable


async def test_malformed_history_fails_the_job(comfy: Served) -> None:
    fake, url, _ = comfy
    original = fake.get_history

    async def broken(request: Any) -> Any:
        from starlette.responses import Response

        return Response(b"<html>oops</html>", media_type="text/html")

    fake.app.router.routes = [
        r for r in fake.app.router.routes if getattr(r, "path", "") != "/history/{prompt_id}"
    ]
    from starlette.routing import Route

    fake.app.router.routes.insert(0, Route("/history/{prompt_id}", broken))
    ctx = fake_context("comfyui", {"workflow": recorded_workflow()})
    with pytest.raises(JobFailed) as failed:
        await ComfyUIConnector(settings(url)).run(ctx.job, ctx)
    assert failed.value.retryable and "/history" in str(failed.value)
    assert original is not None


def test_original_environment_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMFYUI_HOST", "gpu-box")
    monkeypatch.setenv("COMFYUI_PORT", "8190")
    monkeypatch.setenv("COMFYUI_USE_SSL", "true")
    monkeypatch.setenv("COMFYUI_USERNAME", "me")
    monkeypatch.setenv("COMFYUI_PASSWORD", "secret")
    connector = ComfyUIConnector()
    assert connector.settings.url == "https://gpu-box:8190"
    assert connector._ws_url("me") == "wss://gpu-box:8190/ws?clientId=me"
    assert connector._ws_headers()["Authorization"].startswith("Basic ")


@pytest.mark.slow
async def test_through_the_hub_down_at_start_then_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """Down at start: doctor says so, no `comfyui` service (the job waits, the hub says
    why); back: models advertised, the job runs."""
    from emp_hub.embedded import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("EMP_COMFYUI_URL", url)
    doctor_settings = WorkerSettings(hub_url="ws://127.0.0.1:9", connectors=["comfyui"])
    report, healthy = await doctor(doctor_settings)
    entry = report["connectors"]["comfyui"]
    assert not healthy and not entry["ok"] and "unreachable" in entry["detail"]
    assert "its services (comfyui) are not offered" in entry["detail"]
    assert "comfyui" not in report["capabilities"]["services"]
    connector = ComfyUIConnector(settings(url, models_refresh_s=0.1))
    async with connector_hub(connector, health_interval_s=0.1) as hub:
        [worker] = (await hub.http.get("/api/workers")).json()
        assert "comfyui" not in worker["capabilities"]["services"], worker
        job_id = await hub.submit("comfyui", {"workflow": recorded_workflow()})
        pending = await hub.wait(job_id, within_s=0.5)
        assert pending["status"] == "pending", pending
        assert "no live worker offers service 'comfyui'" in pending["unschedulable"]
        async with fake_comfyui(port=port):
            job = await hub.wait(job_id, within_s=20)
            assert job["status"] == "completed" and job["attempt"] == 1, job
            [worker] = (await hub.http.get("/api/workers")).json()
            assert "sd_xl_base_1.0.safetensors" in worker["capabilities"]["models"]["comfyui"]
            report, _ = await doctor(doctor_settings)
            assert report["connectors"]["comfyui"]["ok"]
            assert "comfyui" in report["capabilities"]["services"]


@pytest.mark.slow
async def test_through_the_hub_comfyui_dying_mid_job_fails_retryable() -> None:
    async with fake_comfyui(node_s=0.3) as (fake, url, server):
        connector = ComfyUIConnector(settings(url, reconnect_s=0.3))
        async with connector_hub(connector, broker={"retry_base_s": 60}) as hub:
            job_id = await hub.submit("comfyui", {"workflow": recorded_workflow()}, max_attempts=2)
            await eventually(lambda: fake.running is not None, what="a prompt running")
            server.should_exit = True
            await fake.drop_sockets()

            async def failed_once() -> dict[str, Any] | None:
                job = await hub.job(job_id)
                return job if job["failures"] else None

            # the retryable failure recorded; the retry waits 60 s
            job = await eventually(failed_once, every_s=0.05, what="a failure recorded")
            assert (job["failures"], job["status"]) == (1, "delayed"), job
            assert "lost ComfyUI" in job["error"], job


@pytest.mark.slow
async def test_two_jobs_at_once(comfy: Served) -> None:
    fake, url, _ = comfy
    connector = ComfyUIConnector(settings(url, concurrency=2))
    async with connector_hub(connector) as hub:
        ids = [
            await hub.submit("comfyui", {"workflow": recorded_workflow(color=c)}) for c in (1, 2)
        ]
        jobs = [await hub.wait(job_id) for job_id in ids]
    assert [j["status"] for j in jobs] == ["completed", "completed"]
    names = {j["result"]["nodes"]["4"]["images"][0]["name"] for j in jobs}
    assert names == {"emp_fixture_00001_.png", "emp_fixture_00002_.png"}
    assert len(fake.prompts_run) == 2


async def test_fake_replays_the_recorded_interrupt(comfy: Served) -> None:
    fake, url, _ = comfy
    fake.node_s = 0.2
    [request, interrupt] = [m["msg"] for m in recorded("interrupt") if m["dir"] == "request"]
    wanted = [m["msg"]["type"] for m in recorded("interrupt") if m["conn"] == "ws"]
    ws_url = f"{url.replace('http', 'ws')}/ws?clientId={request['body']['client_id']}"
    async with websockets.connect(ws_url) as ws, httpx.AsyncClient(base_url=url) as http:
        await http.post("/prompt", json=request["body"])
        seen: list[str] = []
        message: dict[str, Any] = {}
        while message.get("type") != "executing" or message["data"]["node"] is not None:
            message = json.loads(await ws.recv())
            seen.append(message["type"])
            if message["type"] == "execution_cached":
                answer = await http.post("/interrupt", json=interrupt["body"])
                assert (answer.status_code, answer.text) == (200, "")
        entry = (await http.get(f"/history/{request['body']['prompt_id']}")).json()
    assert seen == wanted
    status = entry[request["body"]["prompt_id"]]["status"]
    assert (status["status_str"], status["completed"]) == ("error", False)


async def test_cached_resubmission_returns_the_old_outputs(comfy: Served) -> None:
    """The identical workflow again is served from ComfyUI's cache (no new file, the old
    name re-emitted, as recorded in cached_resubmit); the job still completes with it."""
    fake, url, _ = comfy
    wanted = [m["msg"]["type"] for m in recorded("cached_resubmit") if m["conn"] == "ws"]
    connector = ComfyUIConnector(settings(url))
    first = fake_context("comfyui", {"workflow": recorded_workflow()})
    await connector.run(first.job, first)
    seen: list[str] = []
    original = fake.send

    async def spy(kind: str, data: dict[str, Any], sid: str | None) -> None:
        seen.append(kind)
        await original(kind, data, sid)

    fake.send = spy  # type: ignore[method-assign]
    again = fake_context("comfyui", {"workflow": recorded_workflow()})
    result = await connector.run(again.job, again)
    assert result["nodes"]["4"]["images"][0]["name"] == "emp_fixture_00001_.png"
    assert again.files == first.files and again.reports[-1].percent == 100
    assert seen == wanted[1:]  # all but the status on connect


async def test_loaded_models_are_the_checkpoints_of_the_last_workflow_run(comfy: Served) -> None:
    """ComfyUI has no "loaded models" endpoint: the connector reports the checkpoints the
    last workflow it ran loaded (its loader nodes' files), and keeps them over a workflow
    that loads none (ComfyUI keeps its models loaded)."""
    _, url, _ = comfy
    connector = ComfyUIConnector(settings(url))
    assert connector.loaded_models() is None  # nothing run yet: it cannot tell
    graph = recorded_workflow(color=0x010203)
    graph["5"] = {
        "class_type": "CheckpointLoaderSimple",
        "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"},
    }
    graph["3"]["inputs"]["model"] = ["5", 0]  # linked: ComfyUI runs it
    ctx = fake_context("comfyui", {"workflow": graph})
    await connector.run(ctx.job, ctx)
    assert connector.loaded_models() == ["sd_xl_base_1.0.safetensors"]
    plain = fake_context("comfyui", {"workflow": recorded_workflow(color=0x040506)})
    await connector.run(plain.job, plain)
    assert connector.loaded_models() == ["sd_xl_base_1.0.safetensors"]
    await connector.stop()


def test_loaded_models_of_a_workflow_are_its_linked_loaders_files() -> None:
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "a.safetensors"}},
        "2": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux.safetensors"}},
        "3": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "unused.ckpt"}},
        "4": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "m2": ["2", 0]}},
    }
    assert ComfyUIConnector.workflow_models(graph) == ["a.safetensors", "flux.safetensors"]
