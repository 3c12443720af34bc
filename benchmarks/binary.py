"""The single-file worker: its size and how fast it starts. Prints JSON.

It builds the binary with scripts/build-worker.sh (or takes --binary PATH), then measures

* size: the file's bytes, and what is largest inside it (compressed);
* `--version`, cold: the first run after the build, once the page cache was dropped when this
  process may do so (`cold_cache_dropped` says whether it could); onefile unpacks itself
  into a new `_MEI...` folder under TMPDIR on every start, so "cold" differs from "warm"
  only by the operating system's cache of the binary and of the libraries;
* `--version`, warm: the median of the next runs; for both, the CPU time of the two onefile
  processes too (user: unpacking and Python; system: mostly writing the unpacked files),
  which, unlike the wall clock, does not grow when other programs share the cores;
* registered: from starting `emp-worker run` (simulation connector) to the hub listing the
  worker in /api/workers, polled every 10 ms, against one `emp-hub serve` on an embedded
  Valkey; the median of several starts.

Targets (issue 12): at most 40 MB; `--version` under 1 s; registered under 2 s.

Usage: python -m benchmarks.binary [--binary PATH] [--runs 5] [--url REDIS_URL] [--keep-cache]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

import emp_hub
from benchmarks.hub import hubs
from emp_hub.embedded import redis_url_or_embedded

ROOT = Path(__file__).parent.parent


def build() -> Path:
    """scripts/build-worker.sh; the binary's path (its last line of output)."""
    done = subprocess.run(
        ["scripts/build-worker.sh"],
        cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(done.stdout.strip().splitlines()[-1])


def drop_page_cache() -> bool:
    """Ask Linux to drop its page cache (root, and not in every container); whether it did."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def version_seconds(binary: Path, env: dict[str, str]) -> tuple[float, float, float]:
    """One `--version` run: wall clock, and the CPU seconds (user, system) of both onefile
    processes, which do not depend on what else the machine runs."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run([str(binary), "--version"], env=env, capture_output=True, check=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime


def summary(values: list[float]) -> dict[str, float]:
    """Median, min and max, in seconds."""
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


def largest(binary: Path, count: int = 8) -> list[dict[str, Any]]:
    """The largest entries of the onefile archive (compressed and unpacked bytes), read with
    PyInstaller's reader from the build environment when there is one."""
    python = ROOT / "build" / "worker-venv" / "bin" / "python"
    if not python.exists():
        return []
    script = (
        "import json, sys\n"
        "from PyInstaller.archive.readers import CArchiveReader\n"
        "toc = CArchiveReader(sys.argv[1]).toc\n"
        "rows = sorted(((v[1], v[2], k) for k, v in toc.items()), reverse=True)\n"
        "print(json.dumps(rows[:int(sys.argv[2])]))\n"
    )
    done = subprocess.run(
        [str(python), "-c", script, str(binary), str(count)], capture_output=True, text=True
    )
    if done.returncode != 0:
        return []
    return [
        {"name": name, "compressed": packed, "unpacked": full}
        for packed, full, name in json.loads(done.stdout)
    ]


async def registered_seconds(binary: Path, url: str, tmp: Path, runs: int) -> list[float]:
    """From starting `run` to the hub listing the worker, `runs` times (each stopped after)."""
    times = []
    async with httpx.AsyncClient(timeout=10) as http:
        for i in range(runs):
            env = {
                **os.environ,
                "TMPDIR": str(tmp),
                "EMP_HUB_URL": url.replace("http", "ws", 1),
                "EMP_WORKER_ID": f"bench-binary-{i}",
                "EMP_CONNECTORS": "simulation",
                "EMP_PLUGIN_DIR": str(tmp / "plugins"),
                "EMP_LOG_LEVEL": "warning",
            }
            started = time.perf_counter()
            proc = await asyncio.create_subprocess_exec(str(binary), "run", env=env)
            try:
                while True:
                    live = (await http.get(f"{url}/api/workers")).json()
                    if any(w["worker_id"] == env["EMP_WORKER_ID"] for w in live):
                        break
                    if proc.returncode is not None or time.perf_counter() - started > 60:
                        raise RuntimeError("the worker did not register")
                    await asyncio.sleep(0.01)
                times.append(time.perf_counter() - started)
            finally:
                proc.terminate()
                await asyncio.wait_for(proc.wait(), 30)
    return times


async def registered_at_a_hub(binary: Path, redis_url: str, tmp: Path, runs: int) -> list[float]:
    """`registered_seconds` against one `emp-hub serve`, in a namespace of its own."""
    async with hubs(redis_url, 1, f"bench-binary-{os.getpid()}") as running:
        return await registered_seconds(binary, running[0].url, tmp, runs)


def measure(
    binary: Path, redis_url: str, runs: int, fresh: bool, drop: bool = True
) -> dict[str, Any]:
    """Every figure, in a TMPDIR of its own."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "TMPDIR": tmp}
        dropped = drop and drop_page_cache()
        cold = version_seconds(binary, env)
        warm = [version_seconds(binary, env) for _ in range(runs)]
        registered = asyncio.run(registered_at_a_hub(binary, redis_url, Path(tmp), runs))
        left = [p.name for p in Path(tmp).glob("_MEI*")]
    size = binary.stat().st_size
    return {
        "conditions": {
            "version": emp_hub.__version__,
            "binary": binary.name,
            "freshly_built": fresh,
            "cold_cache_dropped": dropped,
            "python": platform.python_version(),
            "machine": f"{platform.system()} {platform.machine()}",
            "cpus": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "tmpdir": tempfile.gettempdir(),
            "runs": runs,
        },
        "results": {
            "size_bytes": size,
            "size_mb": round(size / 1e6, 1),
            "largest_inside": largest(binary),
            "version_cold_s": round(cold[0], 3),
            "version_cold_cpu_s": {"user": round(cold[1], 3), "system": round(cold[2], 3)},
            "version_warm_s": summary([w[0] for w in warm]),
            "version_warm_cpu_s": {
                "user": summary([w[1] for w in warm]),
                "system": summary([w[2] for w in warm]),
            },
            "start_to_registered_s": summary(registered),
            "extraction_dirs_left": left,
        },
        "targets": {
            "size_mb_at_most": 40,
            "version_s_under": 1,
            "registered_s_under": 2,
        },
    }


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--binary", help="a built binary (default: build one now)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--url", help="Redis URL (default: an embedded Valkey in a temp dir)")
    parser.add_argument(
        "--keep-cache", action="store_true", help="do not drop the page cache before cold"
    )
    args = parser.parse_args(argv)
    binary = Path(args.binary) if args.binary else build()
    with tempfile.TemporaryDirectory() as tmp, redis_url_or_embedded(args.url, Path(tmp)) as url:
        report = measure(binary, url, args.runs, fresh=not args.binary, drop=not args.keep_cache)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
