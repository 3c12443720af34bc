"""A command's round trip on the broker's lane against redis-py's pool. Prints JSON.

The broker runs its scripts on a lane (emp_hub/broker/lane.py): one connection shared by
every caller of the process. Everything else goes through redis-py, which checks a
connection out of its pool and back in for every command. Both come from one
`emp_hub.broker.connect()` client, to one server, and are measured in the same run,
alternating sample by sample so that the machine's drift falls on both alike:

* `back_to_back`: one command right after the last one's reply;
* `after_pause`: one command after `--pause-ms` idle (a hub between two submits: on a VM
  the first packet after a pause costs more);
* `concurrent`: `--callers` tasks sending `--commands` commands each, at once (commands/s).

The commands are PING and a trivial script by EVALSHA (`return 1`), which is what the
broker's own scripts cost besides their work. Usage:
python -m benchmarks.lane [--samples N] [--pause-ms MS] [--url redis://...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

from benchmarks.claim import percentiles, run_loop
from emp_hub.broker import connect
from emp_hub.broker.connection import Client
from emp_hub.embedded import redis_url_or_embedded

Command = Callable[[], Awaitable[Any]]


def commands(client: Client, sha: str) -> dict[str, dict[str, Command]]:
    """For each command, its call through redis-py's pool and through the lane."""
    lane = client.lane
    assert lane is not None, "a TLS server: the scripts go through redis-py there"
    return {
        "ping": {"redis_py": client.ping, "lane": lambda: lane.execute("PING")},
        "evalsha": {
            "redis_py": lambda: client.evalsha(sha, 0),
            "lane": lambda: lane.execute("EVALSHA", sha, 0),
        },
    }


async def round_trips(ways: dict[str, Command], samples: int, pause_s: float) -> dict[str, Any]:
    """Each way's round trip, `samples` times, the ways alternating."""
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(samples):
        for name, call in ways.items():
            if pause_s:
                await asyncio.sleep(pause_s)
            start = time.perf_counter()
            await call()
            times[name].append(time.perf_counter() - start)
    return {name: percentiles(values) for name, values in times.items()}


async def concurrent_rate(call: Command, callers: int, each: int) -> float:
    """Commands a second with `callers` tasks sending `each` commands one after another."""

    async def caller() -> None:
        for _ in range(each):
            await call()

    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    return callers * each / (time.perf_counter() - start)


async def run(url: str, samples: int, pause_ms: float, callers: int, each: int) -> dict[str, Any]:
    client = connect(url)
    try:
        sha = await client.script_load("return 1")
        ways = commands(client, sha)
        for way in ways.values():  # open the pool's connection and the lane's
            for call in way.values():
                await call()
        results: dict[str, Any] = {}
        for command, way in ways.items():
            results[command] = {
                "back_to_back": await round_trips(way, samples, 0),
                "after_pause": await round_trips(way, samples, pause_ms / 1000),
                "concurrent_per_s": {
                    name: round(await concurrent_rate(call, callers, each))
                    for name, call in way.items()
                },
            }
            for timing in ("back_to_back", "after_pause"):
                pair = results[command][timing]
                pair["redis_py_over_lane_p50"] = round(
                    pair["redis_py"]["p50_ms"] / pair["lane"]["p50_ms"], 2
                )
        return {
            "conditions": {
                "version": version("emp"),
                "python": sys.version.split()[0],
                "machine": platform.machine(),
                "cpus": os.cpu_count(),
                "redis": version("redis"),
                "samples": samples,
                "pause_ms": pause_ms,
                "callers": callers,
                "commands_per_caller": each,
            },
            "results": results,
        }
    finally:
        await client.aclose()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.lane",
        description="A command's round trip on the broker's lane against redis-py's pool. "
        "Prints JSON.",
    )
    parser.add_argument("--samples", type=int, default=2000, help="round trips a way (2000)")
    parser.add_argument("--pause-ms", type=float, default=5.0, help="idle before each (5)")
    parser.add_argument("--callers", type=int, default=50, help="concurrent callers (50)")
    parser.add_argument("--commands", type=int, default=200, help="commands a caller (200)")
    parser.add_argument("--url", help="Redis URL (default: an embedded Valkey in a temp dir)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, redis_url_or_embedded(args.url, Path(tmp)) as url:
        report = run_loop(run(url, args.samples, args.pause_ms, args.callers, args.commands))
    report["conditions"]["server"] = "--url" if args.url else "an embedded Valkey"
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
