"""What the hub's and the worker's processes both do once they have started (standard
library only)."""

from __future__ import annotations

import gc


def freeze_startup_objects() -> bool:
    """Take every object that exists now out of the garbage collector's reach, once per
    process (False when it was done before): what start-up built (modules, classes, the
    app, the settings) lives as long as the process, and each full collection walked all
    of it, 30 to 50 ms at a time, several times a drain (docs/benchmarks.md). Objects made
    later are collected as before; garbage that exists now is collected first."""
    if gc.get_freeze_count():
        return False
    gc.collect()
    gc.freeze()
    return True
