"""emp-hub's token commands and its errors (the CLI run in-process)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import redis

from emp_hub.cli import main

pytestmark = pytest.mark.hub


@pytest.fixture(autouse=True)
def hub_env(monkeypatch: pytest.MonkeyPatch, redis_url: str, namespace: str) -> Iterator[None]:
    monkeypatch.setenv("EMP_REDIS_URL", redis_url)
    monkeypatch.setenv("EMP_BROKER__NAMESPACE", namespace)
    yield
    client = redis.Redis.from_url(redis_url)
    client.delete("{" + namespace + "}:tokens")
    client.close()


def test_token_lifecycle(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["token", "create", "--role", "client", "--customer", "acme", "--name", "shop"]) == 0
    )
    token = capsys.readouterr().out.strip()
    assert token.startswith("emp_")
    assert main(["token", "list", "--json"]) == 0
    [record] = json.loads(capsys.readouterr().out)
    assert (record["name"], record["role"], record["customer"]) == ("shop", "client", "acme")
    assert token not in json.dumps(record)
    assert main(["token", "revoke", record["id"]]) == 0
    assert main(["token", "revoke", record["id"]]) == 1
    assert "no token with id" in capsys.readouterr().err


def test_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["token", "create", "--role", "root"])
    assert "invalid choice" in capsys.readouterr().err
    assert main(["token", "create", "--role", "worker", "--customer", "acme"]) == 2
    assert "only client tokens" in capsys.readouterr().err


def test_unreachable_redis(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EMP_REDIS_URL", "redis://127.0.0.1:1/0")
    assert main(["token", "list"]) == 1
    assert "cannot reach Redis" in capsys.readouterr().err
