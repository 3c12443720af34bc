"""Shared fixtures: a real Redis-protocol server and a broker in a private namespace.

By default the tests start an embedded Valkey (the hub's own default). Set
EMP_TEST_REDIS_URL to run them against another server, e.g. redis://127.0.0.1:6379/0;
every test then works in its own key namespace and deletes it afterwards.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio

from emp_hub.broker import Broker, BrokerSettings
from emp_hub.broker.connection import connect
from emp_hub.embedded import EmbeddedValkey
from emp_hub.settings import HubSettings
from emp_hub.testing import running_hub


class Clock:
    """A clock the test moves by hand; starts at the real time."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The server under test: EMP_TEST_REDIS_URL, or an embedded Valkey for the session."""
    url = os.environ.get("EMP_TEST_REDIS_URL")
    if url:
        yield url
        return
    with EmbeddedValkey(Path(tmp_path_factory.mktemp("valkey"))) as server:
        yield server.url


async def drop_namespace(client: redis.asyncio.Redis, namespace: str) -> None:
    """Delete every key of a test namespace (tests only: it uses SCAN)."""
    keys = [k async for k in client.scan_iter(match="{" + namespace + "}:*", count=1000)]
    for i in range(0, len(keys), 500):
        await client.delete(*keys[i : i + 500])


@pytest.fixture
def namespace() -> str:
    """A key namespace of this test alone."""
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def redis_client(redis_url: str, namespace: str) -> AsyncIterator[redis.asyncio.Redis]:
    """A client on the server under test; the test's namespace is removed afterwards."""
    client = connect(redis_url)
    try:
        yield client
    finally:
        await drop_namespace(client, namespace)
        await client.aclose()


@pytest.fixture
def hub_settings(redis_url: str, namespace: str, redis_client: redis.asyncio.Redis) -> HubSettings:
    """A hub on the test's namespace (redis_client removes it afterwards); a test module
    that needs other settings overrides this fixture."""
    return HubSettings(
        redis_url=redis_url,
        broker=BrokerSettings(namespace=namespace, live_cache_s=0),
        maintenance_interval_s=0.2,
    )


@pytest.fixture
async def base_url(hub_settings: HubSettings) -> AsyncIterator[str]:
    """The URL of a hub with `hub_settings`, running in this process under uvicorn."""
    async with running_hub(hub_settings) as url:
        yield url


@pytest.fixture
def clock() -> Clock:
    """The broker's clock, moved by hand."""
    return Clock()


@pytest.fixture
def settings(namespace: str) -> BrokerSettings:
    """Broker settings of the test (override the fixture to change them)."""
    return BrokerSettings(namespace=namespace, live_cache_s=0)


@pytest.fixture
def broker(redis_client: redis.asyncio.Redis, settings: BrokerSettings, clock: Clock) -> Broker:
    """A broker on the server under test, in the test's own namespace."""
    return Broker(redis_client, settings, clock=clock)
