"""Fixtures: the fake A1111 served on a free port, in the test's event loop."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import uvicorn
from fake_a1111 import FakeA1111, create_app

from emp_hub.embedded import free_port


@asynccontextmanager
async def serve(fake: FakeA1111, port: int | None = None) -> AsyncIterator[str]:
    """Serve `fake` (on `port`, else a free one) until the block ends; yields its base URL."""
    port = port or free_port()
    config = uvicorn.Config(
        create_app(fake), host="127.0.0.1", port=port, log_level="warning", lifespan="off"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        server.force_exit = True
        await task
