"""The package's import graph: no cycle, and no import of our own modules inside a function.

    .venv/bin/python tools/check_imports.py

Prints each module with what it imports from the package, bottom (configuration) first, and
exits 1 naming any cycle or function-level import. ``tests/test_layout.py`` runs it.
"""

from __future__ import annotations

import ast
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

PACKAGE = "wbc_spark"
ROOT = Path(__file__).resolve().parents[1]


def modules(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        name = ".".join(path.relative_to(root).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def imports(root: Path = ROOT) -> tuple[dict[str, set[str]], list[str]]:
    """(module -> package modules it imports, function-level imports as 'module:line')."""
    mods = modules(root)
    graph, inner = {}, []
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                # ``from pkg import mod`` depends on mod; ``from mod import name`` on mod.
                names = [f"{node.module}.{a.name}" for a in node.names
                         if f"{node.module}.{a.name}" in mods] or [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            hits = {n for n in names if n in mods and n != name}
            if hits:
                found |= hits
                if node.col_offset > 0:
                    inner.append(f"{name}:{node.lineno} imports {', '.join(sorted(hits))}")
        # A module importing its own sub-package's __init__ is not a dependency on itself.
        graph[name] = {m for m in found if not name.startswith(m + ".")}
    return graph, inner


def main() -> int:
    graph, inner = imports()
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as exc:
        print(f"import cycle: {' -> '.join(exc.args[1])}")
        return 1
    for name in order:
        deps = sorted(graph.get(name, ()))
        print(f"{name:<28} <- {', '.join(d.removeprefix(PACKAGE + '.') for d in deps) or '-'}")
    if inner:
        print("imports of the package inside functions:\n  " + "\n  ".join(inner))
        return 1
    print(f"{len(graph)} modules, no cycle, no function-level import of the package")
    return 0


if __name__ == "__main__":
    sys.exit(main())
