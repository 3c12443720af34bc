"""What the machine has: GPUs (NVML, through nvidia-ml-py), CPU cores, RAM and disk.

A machine without an NVIDIA driver simply has no GPUs: nothing is printed, nothing fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from emp_protocol.capabilities import GPU

GIB = 1024**3


def gpus() -> list[GPU]:
    """Every NVIDIA GPU NVML sees, in index order (empty without a driver)."""
    try:
        import pynvml  # type: ignore[import-untyped]

        pynvml.nvmlInit()
    except Exception:  # no library, no driver, no device: no GPU
        return []
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        found = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            found.append(
                GPU(
                    name=_text(pynvml.nvmlDeviceGetName(handle)),
                    memory_gb=round(int(memory.total) / GIB, 1),
                    driver=driver,
                )
            )
        return found
    except Exception:
        return []
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def cpu_cores() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def ram_gb() -> float:
    """Total memory."""
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1)
    except (ValueError, OSError, AttributeError):
        return 0.0


def disk_gb(path: Path | None = None) -> float:
    """Free disk space where the worker runs."""
    try:
        return round(shutil.disk_usage(path or Path.cwd()).free / GIB, 1)
    except OSError:
        return 0.0
