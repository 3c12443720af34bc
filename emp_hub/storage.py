"""Job outputs on disk (EMP_OUTPUT_DIR, shared by the replicas): where a job's files live,
and their removal once the job's retention ran out. The routes that upload, list and
download them are in routes/outputs.py."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
from pathlib import Path

from emp_hub.broker import Broker


def folder(root: Path, job_id: str) -> Path:
    """A job's output folder: named by a hash, since job ids may hold any printable char."""
    return root / hashlib.sha256(job_id.encode()).hexdigest()[:32]


def _remove(folders: list[Path]) -> None:
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


async def remove_expired(broker: Broker, root: Path, limit: int = 1000) -> int:
    """Remove the files of up to `limit` jobs whose retention ran out (the broker's
    janitor lists them). Any replica may run it, at the same time too."""
    job_ids = await broker.expired_outputs(limit)
    if job_ids:
        folders = [folder(root, job_id) for job_id in job_ids]
        await asyncio.to_thread(_remove, folders)
        await broker.forget_outputs(job_ids)
    return len(job_ids)
