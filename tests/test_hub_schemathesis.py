"""Schemathesis against the hub's own OpenAPI: no input it can generate gives a 5xx."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from emp_hub.embedded import free_port
from tests.processes import eventually_sync

pytestmark = [pytest.mark.slow, pytest.mark.hub]


@pytest.fixture(scope="module")
def hub_url(redis_url: str) -> Iterator[str]:
    """A real `emp-hub serve` process on a namespace of its own."""
    port = free_port()
    namespace = f"schema-{port}"
    env = {
        **os.environ,
        "EMP_REDIS_URL": redis_url,
        "EMP_BROKER__NAMESPACE": namespace,
        "EMP_LOG_LEVEL": "warning",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "emp_hub.cli", "serve", "--port", str(port)], env=env
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            try:
                return httpx.get(f"{url}/health/ready").status_code == 200
            except httpx.TransportError:
                return False

        eventually_sync(ready, every_s=0.05, what="the hub ready")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        client = redis.Redis.from_url(redis_url)
        for key in client.scan_iter(match="{" + namespace + "}:*"):
            client.delete(key)
        client.close()


@pytest.fixture(scope="module")
def api_schema(hub_url: str) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{hub_url}/openapi.json")


def test_no_server_errors(api_schema: schemathesis.BaseSchema) -> None:
    """Every operation, with inputs generated from the schema (valid and invalid)."""
    operations = [result.ok() for result in api_schema.get_all_operations()]  # type: ignore[union-attr]
    assert len(operations) >= 10
    for operation in operations:
        if operation.path == "/api/dashboard/feed":
            continue  # a stream that ends only when its caller leaves: tests/test_live_feed.py

        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def check(case: schemathesis.Case[Any]) -> None:
            if isinstance(case.body, dict) and case.body.get("wait") is True:
                case.body["timeout"] = 0.5  # a waiting submit would wait for its job
            case.call_and_validate(checks=[not_a_server_error], timeout=10)

        check()
