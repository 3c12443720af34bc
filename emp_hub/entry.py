"""The entry points of the commands that need an extra: `emp` (client), `emp-hub`, `emp-demo`
and `emp-broker-demo` (hub).

A worker-only install (`pip install emp`) has these commands too. Without their extra,
each says on one line which extra to install and exits 2, instead of a ModuleNotFoundError.
Imports only the standard library until it imports the command's module.
"""

from __future__ import annotations

import importlib
import sys

OURS = ("emp_hub", "emp_worker", "emp_client")


def _run(command: str, module: str, extra: str) -> int | None:
    try:
        main = importlib.import_module(module).main
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").partition(".")[0]
        if not missing or missing in OURS:
            raise
        print(
            f"{command}: this command needs the {extra} extra ({missing} is not installed); "
            f"pip install 'emp[{extra}]'",
            file=sys.stderr,
        )
        return 2
    result: int | None = main()
    return result


def client() -> int | None:
    """`emp`."""
    return _run("emp", "emp_client.cli", "client")


def hub() -> int | None:
    """`emp-hub`."""
    return _run("emp-hub", "emp_hub.cli", "hub")


def demo() -> int | None:
    """`emp-demo`."""
    return _run("emp-demo", "emp_hub.demos.system", "hub")


def broker_demo() -> int | None:
    """`emp-broker-demo`."""
    return _run("emp-broker-demo", "emp_hub.demos.broker", "hub")
