"""The output routes (images, video): uploaded by the worker holding the job, stored on
disk (emp_hub/storage.py), downloaded by whoever may read the job. The job's
result holds references (name, size, content type, URL), never the bytes. Each file and
each job's files together are size-capped; the files go when the job's retention runs out."""

from __future__ import annotations

import contextlib
import json
import mimetypes
import os
import re
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Request
from fastapi.responses import FileResponse

from emp_hub.auth import Principal, Role
from emp_hub.broker import JobNotFound
from emp_hub.hub import Hub
from emp_hub.routes.api import HubDep, Reader, role, visible_job
from emp_hub.settings import HubSettings
from emp_hub.storage import folder
from emp_protocol.jobs import OutputRef

router = APIRouter(tags=["outputs"])

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
Uploader = Annotated[Principal, role(Role.WORKER, Role.ADMIN)]
Anyone = Annotated[Principal, role(Role.ADMIN, Role.CLIENT, Role.MONITOR, Role.WORKER)]


def _place(root: Path, job_id: str, name: str) -> Path:
    if not NAME.match(name) or name.endswith(".meta"):
        raise HTTPException(422, "output names are letters, digits, '.', '_' and '-'")
    return folder(root, job_id) / name


def _used(path: Path, own: str = "") -> int:
    """Bytes the job's other files take (uploads under way included, not `own`): what
    counts against its quota besides the file `path`, which an upload replaces."""
    total = 0
    with contextlib.suppress(FileNotFoundError), os.scandir(path.parent) as entries:
        for entry in entries:
            if entry.name not in (path.name, own) and not entry.name.endswith(".meta"):
                with contextlib.suppress(FileNotFoundError):  # another upload just ended
                    total += entry.stat().st_size
    return total


def _check_size(settings: HubSettings, job_id: str, name: str, size: int, used: int) -> None:
    """413 when a file of `size` bytes is over the per-file cap or the job's quota."""
    if size > settings.max_output_bytes:
        raise HTTPException(
            413,
            f"output {name} is over {settings.max_output_bytes} bytes, the most one output "
            "may have (EMP_MAX_OUTPUT_BYTES)",
        )
    if used + size > settings.output_quota_bytes:
        raise HTTPException(
            413,
            f"with output {name}, the outputs of job {job_id} would take over "
            f"{settings.output_quota_bytes} bytes, the most one job may keep "
            "(EMP_OUTPUT_QUOTA_BYTES)",
        )


@router.put(
    "/api/jobs/{job_id}/outputs/{name}",
    response_model=OutputRef,
    status_code=201,
    responses={413: {"description": "Over EMP_MAX_OUTPUT_BYTES or EMP_OUTPUT_QUOTA_BYTES"}},
)
async def upload(
    job_id: str,
    name: str,
    request: Request,
    hub: HubDep,
    principal: Uploader,
    x_lease_token: Annotated[str, Header(description="The lease token of the job")],
    content_type: Annotated[str | None, Header()] = None,
) -> OutputRef:
    """Store an output of a job; only the worker holding the job (its lease token) may.
    The body streams to disk, within EMP_MAX_OUTPUT_BYTES and the job's
    EMP_OUTPUT_QUOTA_BYTES; an upload refused half-way leaves nothing behind."""
    # One round trip: the token holds the job, and (before a byte lands) the job's
    # retention covers its files.
    if not await hub.broker.accept_output(job_id, x_lease_token):
        raise HTTPException(409, f"the lease token does not hold job {job_id}")
    settings = hub.settings
    path = _place(settings.outputs, job_id, name)
    used = _used(path)
    declared = request.headers.get("content-length", "")
    if declared.isdigit():
        _check_size(settings, job_id, name, int(declared), used)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".upload-")
    own = os.path.basename(tmp)
    size, stored = 0, False
    try:
        with os.fdopen(fd, "wb") as out:
            async for chunk in request.stream():
                size += len(chunk)
                _check_size(settings, job_id, name, size, used)
                out.write(chunk)
        _check_size(settings, job_id, name, size, _used(path, own))  # with uploads since
        os.replace(tmp, path)  # readers never see half a file
        stored = True
    finally:
        if not stored:
            os.unlink(tmp)
    kind = content_type or mimetypes.guess_type(name)[0] or "application/octet-stream"
    path.with_name(path.name + ".meta").write_text(json.dumps({"content_type": kind}))
    return OutputRef(
        name=name, size=size, content_type=kind, url=f"/api/jobs/{job_id}/outputs/{name}"
    )


@router.get("/api/jobs/{job_id}/outputs", response_model=list[OutputRef])
async def list_outputs(job_id: str, hub: HubDep, principal: Reader) -> list[OutputRef]:
    """The job's stored outputs."""
    await visible_job(hub, principal, job_id)
    where = folder(hub.settings.outputs, job_id)
    if not where.is_dir():
        return []
    return [
        OutputRef(
            name=p.name,
            size=p.stat().st_size,
            url=f"/api/jobs/{job_id}/outputs/{p.name}",
            content_type=json.loads(p.with_name(p.name + ".meta").read_text())["content_type"],
        )
        for p in sorted(where.iterdir())
        if not p.name.endswith(".meta") and p.with_name(p.name + ".meta").exists()
    ]


async def _readable_by_job(
    hub: Hub, principal: Principal, job_id: str, name: str, reader: str, lease_token: str
) -> None:
    """A read on behalf of job `reader` (a worker fetching a job's input): the caller holds
    it (its lease token), and job `job_id` is of the same customer (or both have none);
    404 otherwise, as for a job the caller may not see."""
    if principal.role not in (Role.WORKER, Role.ADMIN):
        raise HTTPException(403, "reading as a job (X-Job-Id) needs a token with role worker")
    if not await hub.broker.holds(reader, lease_token):
        raise HTTPException(409, f"the lease token does not hold job {reader}")
    own = await hub.broker.get(reader)
    try:
        source = await hub.broker.get(job_id)
    except JobNotFound:
        source = None
    if source is None or source.customer != own.customer:
        raise HTTPException(
            404,
            f"job {job_id} has no output {name} that job {reader} may read "
            "(only the outputs of its own customer's jobs)",
        )


@router.get(
    "/api/jobs/{job_id}/outputs/{name}",
    response_class=FileResponse,
    responses={409: {"description": "X-Lease-Token does not hold the job X-Job-Id"}},
)
async def download(
    job_id: str,
    name: str,
    hub: HubDep,
    principal: Anyone,
    x_job_id: Annotated[
        str | None,
        Header(
            description="Read as this job (a worker fetching the job's input): with "
            "X-Lease-Token, the outputs of its own customer's jobs"
        ),
    ] = None,
    x_lease_token: Annotated[str | None, Header(description="The lease token of X-Job-Id")] = None,
) -> FileResponse:
    """One output of a job (404 when the job is not visible or the output not there). A
    worker reads one as the job it runs (X-Job-Id and X-Lease-Token): an input of that job,
    which may be an output of any job of the same customer."""
    if x_job_id is not None:
        await _readable_by_job(hub, principal, job_id, name, x_job_id, x_lease_token or "")
    elif principal.role is Role.WORKER:
        raise HTTPException(
            403, "a worker reads outputs as the job it runs (X-Job-Id, X-Lease-Token)"
        )
    else:
        await visible_job(hub, principal, job_id)
    path = _place(hub.settings.outputs, job_id, name)
    meta = path.with_name(path.name + ".meta")
    if not path.is_file() or not meta.exists():
        raise HTTPException(404, f"job {job_id} has no output {name}")
    return FileResponse(path, media_type=json.loads(meta.read_text())["content_type"])
