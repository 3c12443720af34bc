"""The ComfyUI connector against a ComfyUI already running at --url: each check's outcome
and per-job timings. Prints JSON.

A real hub and worker (`emp_hub.testing.connector_hub`: embedded Valkey, the hub under
uvicorn, a Worker running `ComfyUIConnector`) in this process; jobs go in and are followed
through the hub's HTTP API (`emp_client.Client`: submit, the job's server-sent events,
downloads), as an application would. Only model-free nodes are used (EmptyImage,
ImageInvert, ImageScale, LoadImage, SaveImage), so a ComfyUI with no model files, on the
CPU, is enough. The checks:

* `workflow_shape`, `prompt_shape`, `bare_graph_shape`: EmptyImage -> ImageInvert ->
  ImageScale -> SaveImage in our payload shape (`{"workflow": graph}`) and the original
  emp-redis shapes (`{"prompt": graph}`, the graph itself): completed, the PNG downloadable
  from the hub, the same bytes as ComfyUI's /view, of the scaled size and the inverted
  colour; progress over the hub's events monotonic, ending at 100.
* `cached_resubmit`: the identical graph again: ComfyUI serves it from its cache (no new
  file; run anew when it was started with --cache-none): completed with that output.
* `refused_unknown_node`, `refused_bad_input`: ComfyUI's 400 fails the job at once (not
  retried, though 3 attempts were allowed) with the node errors in the job's error;
  nothing queued in ComfyUI.
* `execution_error`: LoadImage of a URL that answers no image: ComfyUI accepts the graph,
  then PIL fails in LoadImage; the job fails at once (not retried) with the node, its type
  and the exception.
* `cancel_running`: a slow graph (a chain of 40 lanczos ImageScales, 1024 to 2048 pixels
  square and back) cancelled on the hub while it runs: cancelled, ComfyUI idle soon after,
  the prompt interrupted (its history `error` with `execution_interrupted`), no output.
* `cancel_queued`: a job whose prompt waits in ComfyUI's queue behind another client's
  slow prompt, cancelled: deleted from ComfyUI's queue, never run; the other prompt is not
  touched (then interrupted by this script, to leave ComfyUI idle).
* `input_image_url`: a job whose LoadImage input is the hub URL of an earlier job's output:
  uploaded to ComfyUI and used (the output is that image, inverted).
* `timed_jobs`: --jobs (20) more jobs of the four-node graph, each checked as above.
* `doctor`: `emp-worker doctor --json` (a process of its own, EMP_CONNECTORS=comfyui)
  shows ComfyUI's version, device and memory; the worker offers service `comfyui` on the
  hub.

Timings per completed job, in seconds: `comfyui_run_s` (ComfyUI's own time: its
`execution_start` to `execution_success` timestamps in the history, ms resolution),
`comfyui_queue_s` (from the job's "queued in ComfyUI" event, sent once POST /prompt
answered, to `execution_start`: ComfyUI taking the prompt up), `connector_s` (the
connector's `run`: the WebSocket, the submission, following the prompt, /history, /view and
storing the output on the hub, ComfyUI's time included), `end_to_end_s` (from just before
the submit to the hub until the job's final event reached this client) and `overhead_s`
(end to end less ComfyUI's two: everything of ours, the hub's part included). `summary`:
their p50 and p99 in ms over `timed_jobs` (--jobs more jobs of the four-node graph, run
last, when everything is warm). The script leaves ComfyUI idle; it writes a few
PNGs to ComfyUI's output and input folders.

Usage: python -m benchmarks.real_comfyui --url http://127.0.0.1:8188
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
from emp_connector_comfyui import ComfyUIConnector, ComfyUISettings

import emp_hub
from benchmarks.hub import percentiles
from emp_client import Client
from emp_hub.testing import TestHub, connector_hub
from emp_worker.connector import Job, JobContext

#: ImageScales in the slow graphs: seconds of work on a CPU, each node short (an interrupt
#: lands between nodes); both slow prompts are interrupted long before their end.
SCALES = 40


class Timed(ComfyUIConnector):
    """The connector, noting how long each run took (by prompt id)."""

    def __init__(self, settings: ComfyUISettings) -> None:
        super().__init__(settings)
        self.runs: dict[str, float] = {}

    async def run(self, job: Job, ctx: JobContext) -> dict[str, Any]:
        began = time.perf_counter()
        result = await super().run(job, ctx)
        self.runs[str(result["prompt_id"])] = time.perf_counter() - began
        return result


class CheckFailed(Exception):
    """A check saw something other than what it expects."""


def expect(condition: object, message: str) -> None:
    """Raise CheckFailed(message) unless `condition` holds."""
    if not condition:
        raise CheckFailed(message)


def graph(color: int, prefix: str, size: tuple[int, int] = (32, 24)) -> dict[str, Any]:
    """EmptyImage 64x64 of `color` -> ImageInvert -> ImageScale to `size` -> SaveImage."""
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": color},
        },
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {
            "class_type": "ImageScale",
            "inputs": {
                "image": ["2", 0],
                "upscale_method": "nearest-exact",
                "width": size[0],
                "height": size[1],
                "crop": "disabled",
            },
        },
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": prefix}},
    }


def slow_graph(color: int, prefix: str, side: int, scales: int) -> dict[str, Any]:
    """EmptyImage side x side -> `scales` lanczos ImageScales (to 2*side and back) ->
    SaveImage: seconds of work on a CPU, a node boundary (where an interrupt lands) at
    each scale."""
    nodes: dict[str, Any] = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": side, "height": side, "batch_size": 1, "color": color},
        }
    }
    for n in range(scales):
        size = side * 2 if n % 2 == 0 else side
        nodes[str(n + 2)] = {
            "class_type": "ImageScale",
            "inputs": {
                "image": [str(n + 1), 0],
                "upscale_method": "lanczos",
                "width": size,
                "height": size,
                "crop": "disabled",
            },
        }
    nodes[str(scales + 2)] = {
        "class_type": "SaveImage",
        "inputs": {"images": [str(scales + 1), 0], "filename_prefix": prefix},
    }
    return nodes


def png_facts(data: bytes) -> dict[str, Any]:
    """Width, height and the first pixel's RGB of an 8-bit RGB(A) PNG (the first pixel
    needs no unfiltering: every PNG filter leaves it as stored)."""
    expect(data.startswith(b"\x89PNG\r\n\x1a\n"), "not a PNG")
    pos, width, height, kind, idat = 8, 0, 0, -1, b""
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        chunk, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if chunk == b"IHDR":
            width, height = int.from_bytes(body[:4], "big"), int.from_bytes(body[4:8], "big")
            expect(body[8] == 8 and body[9] in (2, 6), f"PNG depth {body[8]}, type {body[9]}")
            kind = body[9]
        elif chunk == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    return {"width": width, "height": height, "rgb": list(raw[1:4]), "rgba": kind == 6}


def rgb(color: int) -> list[int]:
    """0xRRGGBB as [r, g, b]."""
    return [(color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF]


def inverted(color: int) -> list[int]:
    """What ImageInvert makes of `color`, as [r, g, b]."""
    return [255 - c for c in rgb(color)]


def near(got: list[int], want: list[int]) -> bool:
    """Equal within 1 per channel (float to uint8 truncation in SaveImage)."""
    return len(got) == len(want) and all(abs(a - b) <= 1 for a, b in zip(got, want, strict=True))


class Checks:
    """The checks, sharing one hub (with its worker) and one ComfyUI."""

    def __init__(self, hub: TestHub, client: Client, comfy: httpx.AsyncClient, jobs: int) -> None:
        self.hub, self.client, self.comfy, self.jobs = hub, client, comfy, jobs
        self.connector: Timed = hub.worker.connectors[0]  # type: ignore[assignment]
        self.run_id = uuid.uuid4().hex[:8]  # in each colour and prefix: nothing cached from before
        self.colors = random.Random(self.run_id).sample(range(1, 0xFFFFFF), 64 + jobs)
        self.timings: list[dict[str, Any]] = []

    def color(self) -> int:
        """A colour not used before in this run."""
        return self.colors.pop()

    def prefix(self, check: str) -> str:
        return f"emp_check_{self.run_id}_{check}"

    # -- helpers ---------------------------------------------------------------------------

    async def job(
        self, payload: dict[str, Any], check: str, **fields: Any
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Submit a job, follow its events to its end: (the job, its events); its timings
        recorded when it completed."""
        began = time.perf_counter()
        job_id = await self.client.submit("comfyui", payload, **fields)
        events = [event async for event in self.client.events(job_id)]
        end_to_end = time.perf_counter() - began
        job = await self.client.get(job_id)
        if job["status"] == "completed":
            entry = await self.history(str(job["result"]["prompt_id"]))
            expect(entry is not None, "no history for a completed job")
            assert entry is not None
            stamps = {kind: data.get("timestamp") for kind, data in entry["status"]["messages"]}
            start, success = stamps.get("execution_start"), stamps.get("execution_success")
            if not isinstance(start, int) or not isinstance(success, int):
                raise CheckFailed(f"no timestamps in the history: {stamps}")
            queued = next(e["ts"] for e in events if e.get("message") == "queued in ComfyUI")
            run_s, queue_s = (success - start) / 1000, max(0.0, start / 1000 - queued)
            connector_s = self.connector.runs[str(job["result"]["prompt_id"])]
            self.timings.append(
                {
                    "check": check,
                    "comfyui_run_s": round(run_s, 3),
                    "comfyui_queue_s": round(queue_s, 3),
                    "connector_s": round(connector_s, 3),
                    "end_to_end_s": round(end_to_end, 3),
                    "overhead_s": round(end_to_end - run_s - queue_s, 3),
                }
            )
        return job, events

    async def history(self, prompt_id: str) -> dict[str, Any] | None:
        """The prompt's history entry in ComfyUI, None while it has none."""
        answer = (await self.comfy.get(f"/history/{prompt_id}")).json()
        entry: dict[str, Any] | None = answer.get(prompt_id)
        return entry

    async def queue(self) -> tuple[list[str], list[str]]:
        """ComfyUI's queue: (running prompt ids, pending prompt ids)."""
        answer = (await self.comfy.get("/queue")).json()
        return (
            [item[1] for item in answer["queue_running"]],
            [item[1] for item in answer["queue_pending"]],
        )

    async def until(self, what: str, check: Callable[[], Awaitable[Any]], within_s: float) -> Any:
        """Poll `check` until it returns something true; CheckFailed after `within_s`."""
        deadline = time.monotonic() + within_s
        while True:
            value = await check()
            if value:
                return value
            expect(time.monotonic() < deadline, f"{what}: not within {within_s} s")
            await asyncio.sleep(0.05)

    async def idle(self, within_s: float = 30) -> None:
        async def empty() -> bool:
            running, pending = await self.queue()
            return not running and not pending

        await self.until("ComfyUI idle", empty, within_s)

    async def prompt_of(self, job_id: str, within_s: float = 30) -> str:
        """The prompt id the connector gave the job, once it has one."""

        async def known() -> str | None:
            return self.connector.prompts.get(job_id)

        prompt: str = await self.until(f"job {job_id} submitted to ComfyUI", known, within_s)
        return prompt

    def progress_of(self, events: list[dict[str, Any]]) -> list[float]:
        return [float(e["progress"]) for e in events if e["type"] == "progress"]

    async def completed_image(
        self, job: dict[str, Any], events: list[dict[str, Any]], node: str = "4"
    ) -> dict[str, Any]:
        """A completed job's one image: downloaded from the hub, compared with /view."""
        expect(job["status"] == "completed", f"job {job['status']}: {job.get('error')}")
        percents = self.progress_of(events)
        expect(percents == sorted(percents), f"progress went back: {percents}")
        expect(percents and percents[-1] == 100, f"progress did not reach 100: {percents}")
        expect(job["progress"] == 100, f"job progress {job['progress']}")
        [image] = job["result"]["nodes"][node]["images"]
        data = await self.hub.download(image["url"])
        history = await self.history(job["result"]["prompt_id"])
        expect(history is not None, "no history")
        assert history is not None
        [item] = history["outputs"][node]["images"]
        view = await self.comfy.get("/view", params=item)
        expect(view.status_code == 200 and view.content == data, "hub copy differs from /view")
        expect(image["name"] == item["filename"], f"{image['name']} != {item['filename']}")
        return {
            "output": image["name"],
            "bytes": len(data),
            "png": png_facts(data),
            "progress": percents,
            "messages": [e["message"] for e in events if e["type"] == "progress"],
        }

    # -- the checks ------------------------------------------------------------------------

    async def shape(self, check: str, wrap: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
        color = self.color()
        job, events = await self.job(wrap(graph(color, self.prefix(check))), check)
        facts = await self.completed_image(job, events)
        png = facts["png"]
        expect((png["width"], png["height"]) == (32, 24), f"size {png['width']}x{png['height']}")
        expect(near(png["rgb"], inverted(color)), f"colour {png['rgb']} != {inverted(color)}")
        return facts

    async def workflow_shape(self) -> dict[str, Any]:
        return await self.shape("workflow_shape", lambda g: {"workflow": g})

    async def prompt_shape(self) -> dict[str, Any]:
        return await self.shape("prompt_shape", lambda g: {"prompt": g})

    async def bare_graph_shape(self) -> dict[str, Any]:
        return await self.shape("bare_graph_shape", lambda g: g)

    async def cached_resubmit(self) -> dict[str, Any]:
        """The identical graph twice: the second served from ComfyUI's cache (the first
        run's file again), or run anew (a new file) by a ComfyUI started --cache-none."""
        payload = {"workflow": graph(self.color(), self.prefix("cached_resubmit"))}
        first, events = await self.job(payload, "cached_resubmit")
        before = await self.completed_image(first, events)
        again, events = await self.job(payload, "cached_resubmit")
        after = await self.completed_image(again, events)
        history = await self.history(again["result"]["prompt_id"])
        assert history is not None
        cached = [d["nodes"] for k, d in history["status"]["messages"] if k == "execution_cached"]
        stats = (await self.comfy.get("/system_stats")).json()
        if "--cache-none" in stats["system"].get("argv", []):
            expect(after["output"] != before["output"], "--cache-none, yet the same file")
        else:
            expect(after["output"] == before["output"], "the cached run named another file")
            expect(cached and len(cached[0]) == 4, f"ComfyUI cached {cached}, not all 4 nodes")
        return {
            "outputs": [before["output"], after["output"]],
            "cached_nodes": cached[0] if cached else [],
            "progress": after["progress"],
        }

    async def refused(self, check: str, broken: dict[str, Any], words: list[str]) -> dict[str, Any]:
        before = (await self.comfy.get("/history", params={"max_items": 1})).json()
        job, _ = await self.job({"workflow": broken}, check, max_attempts=3)
        expect(job["status"] == "failed", f"job {job['status']}, not failed")
        expect(job["attempt"] == 1 and job["failures"] == 1, f"retried: {job['attempt']}")
        missing = [w for w in words if w not in (job["error"] or "")]
        expect(not missing, f"{missing} not in the error: {job['error']}")
        after = (await self.comfy.get("/history", params={"max_items": 1})).json()
        expect(before == after, "ComfyUI ran something")
        running, pending = await self.queue()
        expect(not running and not pending, "ComfyUI has something queued")
        return {"error": job["error"]}

    async def refused_unknown_node(self) -> dict[str, Any]:
        broken = graph(self.color(), self.prefix("refused_unknown_node"))
        broken["2"]["class_type"] = "NoSuchNode"
        words = ["NoSuchNode does not exist"]
        return await self.refused("refused_unknown_node", broken, words)

    async def refused_bad_input(self) -> dict[str, Any]:
        broken = graph(self.color(), self.prefix("refused_bad_input"))
        broken["3"]["inputs"]["upscale_method"] = "no-such-method"
        broken["1"]["inputs"]["width"] = 99999
        words = ["node 1 (EmptyImage)", "99999", "node 3 (ImageScale)", "no-such-method"]
        return await self.refused("refused_bad_input", broken, words)

    async def execution_error(self) -> dict[str, Any]:
        """LoadImage of a file that is no image (the hub's /health/live, JSON): accepted,
        then failed in ComfyUI; the job fails at once with node, type and exception."""
        loaded = {
            "1": {"class_type": "LoadImage", "inputs": {"image": self.hub.url + "/health/live"}},
            "2": {
                "class_type": "SaveImage",
                "inputs": {"images": ["1", 0], "filename_prefix": self.prefix("execution_error")},
            },
        }
        job, _ = await self.job({"workflow": loaded}, "execution_error", max_attempts=3)
        expect(job["status"] == "failed", f"job {job['status']}, not failed")
        expect(job["attempt"] == 1 and job["failures"] == 1, f"retried: {job['attempt']}")
        words = ["ComfyUI failed at node 1 (LoadImage)", "UnidentifiedImageError", "live'"]
        missing = [w for w in words if w not in (job["error"] or "")]
        expect(not missing, f"{missing} not in the error: {job['error']!r}")
        expect(job["error"] == job["error"].strip(), f"untrimmed: {job['error']!r}")
        await self.idle()
        return {"error": job["error"]}

    async def cancel_running(self) -> dict[str, Any]:
        slow = slow_graph(self.color(), self.prefix("cancel_running"), 1024, SCALES)
        job_id = await self.client.submit("comfyui", {"workflow": slow})
        prompt = await self.prompt_of(job_id)

        async def three_nodes_done() -> bool:  # running, with many nodes still to go
            job = await self.client.get(job_id)
            return bool(job["progress"]) and job["progress"] >= 100 * 3 / len(slow)

        await self.until("the slow prompt running", three_nodes_done, 60)
        running, _ = await self.queue()
        expect(running == [prompt], f"ComfyUI runs {running}, not {prompt}")
        asked = time.perf_counter()
        await self.client.cancel(job_id)
        await self.idle()
        idle_after = time.perf_counter() - asked
        job = await self.client.get(job_id)
        expect(job["status"] == "cancelled", f"job {job['status']}")
        entry = await self.until(
            "the interrupted prompt's history", lambda: self.history(prompt), 10
        )
        kinds = [kind for kind, _ in entry["status"]["messages"]]
        expect(entry["status"]["status_str"] == "error", f"status {entry['status']}")
        expect("execution_interrupted" in kinds, f"messages {kinds}")
        expect(not entry["outputs"], f"outputs written: {entry['outputs']}")
        return {"comfyui_idle_after_cancel_s": round(idle_after, 3), "messages": kinds}

    async def cancel_queued(self) -> dict[str, Any]:
        blocker = str(uuid.uuid4())
        slow = slow_graph(self.color(), self.prefix("cancel_queued_blocker"), 1024, SCALES)
        body = {"prompt": slow, "client_id": "someone-else", "prompt_id": blocker}
        answer = await self.comfy.post("/prompt", json=body)
        expect(answer.status_code == 200, f"blocker refused: {answer.text}")
        try:
            payload = {"workflow": graph(self.color(), self.prefix("cancel_queued"))}
            job_id = await self.client.submit("comfyui", payload)
            prompt = await self.prompt_of(job_id)

            async def queued() -> bool:
                running, pending = await self.queue()
                return running == [blocker] and prompt in pending

            await self.until("the job's prompt queued behind the blocker", queued, 30)
            await self.client.cancel(job_id)

            async def gone() -> bool:
                _, pending = await self.queue()
                return prompt not in pending

            await self.until("the prompt deleted from ComfyUI's queue", gone, 10)
            job = await self.until(
                "the job cancelled",
                lambda: self._status_is(job_id, "cancelled"),
                10,
            )
            running, _ = await self.queue()
            expect(running == [blocker], f"the blocker was touched: running {running}")
        finally:
            await self.comfy.post("/interrupt", json={"prompt_id": blocker})
            await self.idle()
        expect(await self.history(prompt) is None, "the cancelled prompt ran")
        return {"job": job["status"], "prompt_ran": False}

    async def _status_is(self, job_id: str, status: str) -> dict[str, Any] | None:
        job = await self.client.get(job_id)
        return job if job["status"] == status else None

    async def input_image_url(self) -> dict[str, Any]:
        color = self.color()
        source = {"workflow": graph(color, self.prefix("input_source"), size=(40, 30))}
        first, events = await self.job(source, "input_image_url")
        first_facts = await self.completed_image(first, events)
        [image] = first["result"]["nodes"]["4"]["images"]
        url = self.hub.url + image["url"]
        loaded = {
            "1": {"class_type": "LoadImage", "inputs": {"image": url}},
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
            "3": {
                "class_type": "SaveImage",
                "inputs": {"images": ["2", 0], "filename_prefix": self.prefix("input_image_url")},
            },
        }
        job, events = await self.job({"workflow": loaded}, "input_image_url")
        facts = await self.completed_image(job, events, node="3")
        png = facts["png"]
        expect((png["width"], png["height"]) == (40, 30), f"size {png['width']}x{png['height']}")
        expect(near(png["rgb"], rgb(color)), f"colour {png['rgb']} != {rgb(color)}")
        history = await self.history(job["result"]["prompt_id"])
        assert history is not None
        uploaded = history["prompt"][2]["1"]["inputs"]["image"]
        view = await self.comfy.get("/view", params={"filename": uploaded, "type": "input"})
        data = await self.hub.download(image["url"])
        expect(view.content == data, "ComfyUI's input file differs from the hub's output")
        return {"input_url": url, "uploaded_as": uploaded, "source": first_facts["output"]}

    async def timed_jobs(self) -> dict[str, Any]:
        """`jobs` more jobs of the four-node graph, one after another, for the timings."""
        for _ in range(self.jobs):
            payload = {"workflow": graph(self.color(), self.prefix("timed_jobs"))}
            job, events = await self.job(payload, "timed_jobs")
            await self.completed_image(job, events)
        return {"jobs": self.jobs}

    async def doctor(self) -> dict[str, Any]:
        stats = (await self.comfy.get("/system_stats")).json()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("EMP_", "COMFYUI_"))}
        env |= {
            "EMP_HUB_URL": self.hub.url,
            "EMP_CONNECTORS": "comfyui",
            "EMP_COMFYUI_URL": self.connector.settings.url,
            "EMP_WORKER_ID": f"doctor-{self.run_id}",
        }
        command = [str(Path(sys.executable).parent / "emp-worker"), "doctor", "--json"]
        done = await asyncio.to_thread(
            subprocess.run, command, env=env, capture_output=True, text=True, timeout=120
        )
        expect(done.stdout.strip(), f"doctor printed nothing: {done.stderr[-2000:]}")
        report = json.loads(done.stdout)
        entry = report["connectors"]["comfyui"]
        expect(entry["ok"], f"doctor: {entry}")
        version = stats["system"]["comfyui_version"]
        device = stats["devices"][0]
        for word in (f"ComfyUI {version}", f"device {device['name']}", "; RAM "):
            expect(word in entry["detail"], f"{word!r} not in {entry['detail']!r}")
        expect("comfyui" in report["capabilities"]["services"], "doctor: no comfyui service")
        [worker] = (await self.hub.http.get("/api/workers")).json()
        expect("comfyui" in worker["capabilities"]["services"], "hub: no comfyui service")
        return {
            "doctor": entry["detail"],
            "exit_code": done.returncode,
            "models": report["capabilities"]["models"],
        }


CHECKS = (
    "doctor",
    "workflow_shape",
    "prompt_shape",
    "bare_graph_shape",
    "cached_resubmit",
    "refused_unknown_node",
    "refused_bad_input",
    "input_image_url",
    "execution_error",
    "cancel_running",
    "cancel_queued",
    "timed_jobs",
)


async def run_checks(url: str, only: list[str], jobs: int = 20) -> dict[str, Any]:
    """Run the checks against the ComfyUI at `url`; the report."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as comfy:
        stats = (await comfy.get("/system_stats")).json()
        connector = Timed(ComfyUISettings.model_validate({"url": url}))
        async with (
            connector_hub(connector, progress_interval_s=0) as hub,
            Client(hub.url) as client,
        ):
            checks = Checks(hub, client, comfy, jobs)
            await checks.idle(within_s=5)
            outcomes: dict[str, Any] = {}
            for name in only:
                began = time.perf_counter()
                try:
                    details = await getattr(checks, name)()
                    outcomes[name] = {"ok": True, **details}
                except Exception as exc:  # one failed check does not stop the others
                    outcomes[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                outcomes[name]["took_s"] = round(time.perf_counter() - began, 3)
            timings = checks.timings
    system, [device, *_] = stats["system"], stats["devices"]
    return {
        "benchmark": "real_comfyui",
        "conditions": {
            "comfyui_url": url,
            "comfyui_version": system.get("comfyui_version"),
            "comfyui_argv": system.get("argv"),
            "pytorch": system.get("pytorch_version"),
            "device": device.get("name"),
            "emp": emp_hub.__version__,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "setup": "hub, worker (ComfyUIConnector) and embedded Valkey in this process "
            "(connector_hub); ComfyUI a process of its own",
        },
        "passed": sum(o["ok"] for o in outcomes.values()),
        "failed": [name for name, o in outcomes.items() if not o["ok"]],
        "checks": outcomes,
        "timings": timings,
        "summary": summary(timings),
    }


def summary(timings: list[dict[str, Any]]) -> dict[str, Any]:
    """p50 and p99 (ms) of each timing, over the `timed_jobs` (warm) when they ran."""
    warm = [t for t in timings if t["check"] == "timed_jobs"] or timings
    if not warm:
        return {}
    keys = ("comfyui_run_s", "comfyui_queue_s", "connector_s", "end_to_end_s", "overhead_s")
    return {"jobs": len(warm)} | {
        key.removesuffix("_s"): percentiles([t[key] for t in warm]) for key in keys
    }


def main(argv: list[str] | None = None) -> None:
    """Entry point: prints the report; exit status 1 when a check failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8188", help="ComfyUI's base URL")
    parser.add_argument("--only", default=",".join(CHECKS), help="comma-separated checks")
    parser.add_argument("--jobs", type=int, default=20, help="jobs of the timed_jobs check")
    args = parser.parse_args(argv)
    only = [n for n in args.only.split(",") if n]
    unknown = set(only) - set(CHECKS)
    if unknown:
        parser.error(f"unknown checks: {', '.join(sorted(unknown))}")
    report = asyncio.run(run_checks(args.url.rstrip("/"), only, args.jobs))
    print(json.dumps(report, indent=2))
    if report["failed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
