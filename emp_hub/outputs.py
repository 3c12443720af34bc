"""Job outputs (images, video): uploaded by the worker holding the job, stored on disk
(EMP_OUTPUT_DIR, shared by the replicas), downloaded by whoever may read the job. The job's
result holds references (name, size, content type, URL), never the bytes."""

from __future__ import annotations

import hashlib
import json
import mimetypes
import os
import re
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel

from emp_hub.api import HubDep, Reader, role, visible_job
from emp_hub.auth import Principal, Role

router = APIRouter(tags=["outputs"])

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
Uploader = Annotated[Principal, role(Role.WORKER, Role.ADMIN)]


class Output(BaseModel):
    """A reference to one stored output."""

    name: str
    size: int
    content_type: str
    url: str


def _folder(root: Path, job_id: str) -> Path:
    """A job's output folder: named by a hash, since job ids may hold any printable char."""
    return root / hashlib.sha256(job_id.encode()).hexdigest()[:32]


def _place(root: Path, job_id: str, name: str) -> Path:
    if not NAME.match(name) or name.endswith(".meta"):
        raise HTTPException(422, "output names are letters, digits, '.', '_' and '-'")
    return _folder(root, job_id) / name


@router.put("/api/jobs/{job_id}/outputs/{name}", response_model=Output, status_code=201)
async def upload(
    job_id: str,
    name: str,
    request: Request,
    hub: HubDep,
    principal: Uploader,
    x_lease_token: Annotated[str, Header(description="The lease token of the job")],
    content_type: Annotated[str | None, Header()] = None,
) -> Output:
    """Store an output of a job; only the worker holding the job (its lease token) may."""
    if not await hub.broker.holds(job_id, x_lease_token):
        raise HTTPException(409, f"the lease token does not hold job {job_id}")
    path = _place(hub.settings.outputs, job_id, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = await request.body()
    fd, tmp = tempfile.mkstemp(dir=path.parent)
    with os.fdopen(fd, "wb") as out:
        out.write(body)
    os.replace(tmp, path)  # readers never see half a file
    kind = content_type or mimetypes.guess_type(name)[0] or "application/octet-stream"
    path.with_name(path.name + ".meta").write_text(json.dumps({"content_type": kind}))
    return Output(
        name=name, size=len(body), content_type=kind, url=f"/api/jobs/{job_id}/outputs/{name}"
    )


@router.get("/api/jobs/{job_id}/outputs", response_model=list[Output])
async def list_outputs(job_id: str, hub: HubDep, principal: Reader) -> list[Output]:
    """The job's stored outputs."""
    await visible_job(hub, principal, job_id)
    folder = _folder(hub.settings.outputs, job_id)
    if not folder.is_dir():
        return []
    return [
        Output(
            name=p.name,
            size=p.stat().st_size,
            url=f"/api/jobs/{job_id}/outputs/{p.name}",
            content_type=json.loads(p.with_name(p.name + ".meta").read_text())["content_type"],
        )
        for p in sorted(folder.iterdir())
        if not p.name.endswith(".meta") and p.with_name(p.name + ".meta").exists()
    ]


@router.get("/api/jobs/{job_id}/outputs/{name}", response_class=FileResponse)
async def download(job_id: str, name: str, hub: HubDep, principal: Reader) -> FileResponse:
    """One output of a job (404 when the job is not visible or the output not there)."""
    await visible_job(hub, principal, job_id)
    path = _place(hub.settings.outputs, job_id, name)
    meta = path.with_name(path.name + ".meta")
    if not path.is_file() or not meta.exists():
        raise HTTPException(404, f"job {job_id} has no output {name}")
    return FileResponse(path, media_type=json.loads(meta.read_text())["content_type"])
