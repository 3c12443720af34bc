"""The lane (emp_hub/broker/lane.py): one multiplexed connection for the broker's scripts,
against the real server under test."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import redis.asyncio
import redis.exceptions

from emp_hub.auth import Role, TokenStore
from emp_hub.broker import Broker, BrokerSettings, JobSpec
from emp_hub.broker.connection import Client, connect
from emp_hub.broker.lane import Lane

pytestmark = pytest.mark.broker


@pytest.fixture
def lane(redis_client: Client) -> Lane:
    assert redis_client.lane is not None  # emp's client has one
    return redis_client.lane


async def test_every_caller_gets_its_own_reply(lane: Lane, namespace: str) -> None:
    """Hundreds of commands at once, some refused: each caller gets its reply or error."""
    key = "{" + namespace + "}:counter"
    await lane.execute("SET", "{" + namespace + "}:text", "not a number")

    async def one(i: int) -> Any:
        if i % 7 == 0:
            with pytest.raises(redis.exceptions.ResponseError, match="not an integer"):
                await lane.execute("INCR", "{" + namespace + "}:text")
            return "refused"
        if i % 3 == 0:
            return await lane.execute("INCR", key)
        return await lane.execute("ECHO", f"message {i} " + "x" * (i * 37))

    answers = await asyncio.gather(*(one(i) for i in range(600)))
    for i, answer in enumerate(answers):
        if i % 7 == 0:
            assert answer == "refused"
        elif i % 3 != 0:
            assert answer == f"message {i} " + "x" * (i * 37)
    counts = [int(a) for i, a in enumerate(answers) if i % 3 == 0 and i % 7 != 0]
    assert sorted(counts) == list(range(1, len(counts) + 1))  # in the order they were sent


async def test_a_cancelled_caller_leaves_the_others_their_replies(lane: Lane) -> None:
    calls = [asyncio.ensure_future(lane.execute("ECHO", str(i))) for i in range(200)]
    await asyncio.sleep(0)  # every command written
    for call in calls[::2]:
        call.cancel()
    done = await asyncio.gather(*calls, return_exceptions=True)
    for i, result in enumerate(done):
        if i % 2:
            assert result == str(i)
        else:
            assert isinstance(result, asyncio.CancelledError)
    assert await lane.execute("ECHO", "after") == "after"


async def test_a_killed_connection_is_opened_again(lane: Lane, redis_client: Client) -> None:
    first = await lane.execute("CLIENT", "ID")
    await redis_client.client_kill_filter(_id=first)
    assert await lane.execute("ECHO", "again") == "again"  # retried on a new connection
    assert await lane.execute("CLIENT", "ID") != first
    assert await lane.execute("CLIENT", "GETNAME") == "emp-lane"


async def test_closing_the_client_closes_its_lane(redis_url: str) -> None:
    client = connect(redis_url)
    assert client.lane is not None
    lane_id = await client.lane.execute("CLIENT", "ID")
    await client.aclose()
    other = connect(redis_url)
    try:
        ids = [c["id"] for c in await other.client_list()]
        assert str(lane_id) not in ids
    finally:
        await other.aclose()


async def test_scripts_run_on_the_lane_and_load_again_after_a_flush(
    redis_client: Client, namespace: str
) -> None:
    broker = Broker(redis_client, BrokerSettings(namespace=namespace))
    assert redis_client.lane is not None
    before = (await redis_client.info("commandstats")).get("cmdstat_evalsha", {}).get("calls", 0)
    await broker.submit(JobSpec(service="sim"))
    await redis_client.script_flush()
    await broker.submit(JobSpec(service="sim"))  # NOSCRIPT, then EVAL
    assert (await broker.stats()).pending == 2
    # The lane's connection ran them: it is the one named emp-lane that did EVAL last.
    lanes = [c for c in await redis_client.client_list() if c["name"] == "emp-lane"]
    assert any(c["cmd"] in {"eval", "evalsha"} for c in lanes), lanes
    after = (await redis_client.info("commandstats"))["cmdstat_evalsha"]["calls"]
    assert after > before


async def test_a_refused_script_is_the_broker_error_it_names(
    redis_client: Client, namespace: str
) -> None:
    broker = Broker(redis_client, BrokerSettings(namespace=namespace))
    await broker.submit(JobSpec(service="sim", id="once"))
    with pytest.raises(Exception, match="already exists") as refused:
        await broker.submit(JobSpec(service="sim", id="once"))
    assert type(refused.value).__name__ == "DuplicateJob"


async def test_a_silent_server_times_the_lane_out() -> None:
    """A server that takes the connection and never answers: the call fails with
    TimeoutError after the lane's timeout, as redis-py's socket timeout would."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the lane gives up

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    lane = Lane(port=port, timeout=0.3)
    try:
        started = time.monotonic()
        with pytest.raises(redis.exceptions.TimeoutError):
            await lane.execute("PING")
        assert 0.3 <= time.monotonic() - started < 3
    finally:
        await lane.aclose()
        server.close()
        await server.wait_closed()


async def test_a_server_that_cannot_be_reached_is_a_connection_error() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(redis.exceptions.ConnectionError, match=f"127.0.0.1:{port}"):
        await Lane(port=port).execute("PING")


async def test_a_wrong_password_is_a_connection_error(redis_client: Client) -> None:
    assert redis_client.lane is not None
    wrong = Lane(
        host=redis_client.lane.host,
        port=redis_client.lane.port,
        path=redis_client.lane.path,
        password="not-the-password",
    )
    with pytest.raises(redis.exceptions.ConnectionError):
        await wrong.execute("PING")
    await wrong.aclose()


def test_a_client_over_tls_runs_its_scripts_through_the_pool() -> None:
    pool = redis.asyncio.ConnectionPool.from_url("rediss://127.0.0.1:6380/0")
    assert Lane.for_pool(pool) is None
    tcp = Lane.for_pool(redis.asyncio.ConnectionPool.from_url("redis://:pw@10.0.0.1:7000/3"))
    assert tcp is not None and tcp.address == "10.0.0.1:7000"
    unix = Lane.for_pool(redis.asyncio.ConnectionPool.from_url("unix:///run/valkey.sock"))
    assert unix is not None and unix.address == "/run/valkey.sock"


async def test_a_token_is_looked_up_on_the_lane(redis_client: Client, namespace: str) -> None:
    """An authenticated request's one Redis command goes on the lane, as the scripts do."""
    tokens = TokenStore(redis_client, namespace, refresh_s=3600.0)
    token = await tokens.create(Role.CLIENT, name="ci")
    assert not await tokens.is_open()  # checked now, then not for an hour
    assert redis_client.lane is not None
    lane_id = str(await redis_client.lane.execute("CLIENT", "ID"))
    principal = await tokens.authenticate(token)
    assert principal is not None and principal.name == "ci"
    [lane] = [c for c in await redis_client.client_list() if c["id"] == lane_id]
    assert lane["cmd"] == "hget"


async def test_without_a_lane_the_token_is_looked_up_through_the_pool(
    redis_url: str, redis_client: Client, namespace: str
) -> None:
    """A client without a lane (redis-py's own; emp's over TLS) looks the token up too."""
    token = await TokenStore(redis_client, namespace).create(Role.MONITOR, name="m")
    plain = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    try:
        principal = await TokenStore(plain, namespace).authenticate(token)
        assert principal is not None and principal.role is Role.MONITOR
        assert await TokenStore(plain, namespace).authenticate("not-a-token") is None
    finally:
        await plain.aclose()
