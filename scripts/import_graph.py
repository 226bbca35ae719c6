"""Print the import cycles among apd_lens's modules; exit 1 if there is any.

Reads the source with :mod:`ast` only (nothing is imported). An edge ``a -> b`` is any import of
module ``b`` written in module ``a``: at module level, under ``if TYPE_CHECKING:``, or inside a
function (a deferred import hides a circle at run time but not in the design). ``from pkg import
name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``. Importing a package's
``__init__`` for its ``__version__`` is no design dependency and is skipped: edges into the
top-level package itself are left out.

    python scripts/import_graph.py [--package apd_lens] [--edges]
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def module_files(package: str, root: Path = ROOT) -> dict[str, Path]:
    """Every module of ``package`` by dotted name (a package by its ``__init__.py``)."""
    modules = {}
    for file in sorted((root / package).rglob("*.py")):
        parts = list(file.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = file
    return modules


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([name] if name else []))


def imports_of(module: str, file: Path, known: set[str]) -> set[str]:
    """The modules in ``known`` that ``module`` (source ``file``) imports, anywhere in the file."""
    tree = ast.parse(file.read_text(), filename=str(file))
    is_package = file.name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = node.module if node.level == 0 else _resolve_relative(module, is_package, node.level, node.module)
            targets = [
                f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source for alias in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a name inside a.b
                target = target.rpartition(".")[0]
            if target and target != module:
                found.add(target)
    return found


def import_graph(package: str = "apd_lens", root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (edges into the top-level package left out)."""
    files = module_files(package, root)
    known = set(files)
    return {m: imports_of(m, f, known) - {package} for m, f in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The graph's strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
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

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--package", default="apd_lens")
    parser.add_argument("--edges", action="store_true", help="also print every module's imports")
    args = parser.parse_args(argv)
    graph = import_graph(args.package)
    if args.edges:
        for module in sorted(graph):
            print(f"{module} -> {', '.join(sorted(graph[module])) or '(none)'}")
    found = cycles(graph)
    n_edges = sum(len(v) for v in graph.values())
    print(f"{args.package}: {len(graph)} modules, {n_edges} import edges, {len(found)} cycle(s)")
    for component in found:
        print("  cycle among: " + " <-> ".join(component))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
