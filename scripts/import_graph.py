"""The import graph of our packages, read from the source: every import statement of every
module (those inside functions too, so a cycle hidden by a function-local import shows).

    python scripts/import_graph.py            # summary as JSON; exit 1 if there is a cycle
    python scripts/import_graph.py --edges    # also every edge, module -> modules

An import of a package counts as an import of its `__init__`; `from package import module`
counts as an import of that module. .ci/run runs it; tests/test_package_split.py uses it.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("emp_protocol", "emp_worker", "emp_hub", "emp_client")


def modules(package: str, root: Path = ROOT) -> dict[str, Path]:
    """The package's modules by dotted name."""
    found = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imported(module: str, path: Path) -> set[str]:
    """The dotted names `module` imports (relative imports resolved); for `from X import
    Y`, both X and X.Y (callers keep the names that are modules)."""
    names = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([base] if base else [])])
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}
    return names


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Each of our modules -> the modules of ours it imports (itself left out)."""
    ours = {name: path for package in PACKAGES for name, path in modules(package, root).items()}
    return {
        name: {other for other in imported(name, path) if other in ours and other != name}
        for name, path in ours.items()
    }


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan): each holds at
    least one cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(edges[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def main() -> int:
    """Print the summary (JSON); exit 1 when the graph has a cycle."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edges", action="store_true", help="list every edge too")
    args = parser.parse_args()
    edges = graph()
    found = cycles(edges)
    report: dict[str, object] = {
        "modules": len(edges),
        "imports": sum(len(targets) for targets in edges.values()),
        "cycles": found,
    }
    if args.edges:
        report["edges"] = {name: sorted(targets) for name, targets in sorted(edges.items())}
    print(json.dumps(report, indent=2))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
