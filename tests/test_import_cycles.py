"""The package's modules import each other without a cycle (imports inside functions count too)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "asft_lightning"
NAME = PACKAGE.name

# Imports that close a cycle today, each to be removed by the work named (then delete its line here: the test fails
# on an entry whose import is gone, so this list only shrinks). Everything else must be acyclic.
KNOWN_CYCLE_EDGES: set[tuple[str, str]] = set()  # an import cycle allowed for now (none)


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (``pkg.sub`` for ``pkg/sub/__init__.py``)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``module`` imports anywhere in its file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from ..a import b
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import sub` imports the module pkg.sub when there is one, else a name of pkg
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:  # import pkg.a.b.c where pkg.a.b is the module
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    """The modules ``start`` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

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
            group = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                group.append(top)
                if top == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_the_package_has_no_import_cycle():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    # a package's __init__ that hands on its submodules' names is the package's face, not a party to a cycle
    faces = {name for name, path in modules.items() if path.name == "__init__.py"}
    graph = {name: {d for d in deps if d not in faces} for name, deps in graph.items()}
    stale = sorted((a, b) for a, b in KNOWN_CYCLE_EDGES if b not in graph.get(a, set()) or a not in _reach(graph, b))
    assert not stale, f"no longer imported, or no longer on a cycle (delete from KNOWN_CYCLE_EDGES): {stale}"
    for a, b in KNOWN_CYCLE_EDGES:
        graph[a] = graph[a] - {b}
    cycles = find_cycles(graph)
    detail = [" <-> ".join(c) + ": " + "; ".join(f"{a} imports {sorted(graph[a] & set(c))}" for a in c) for c in cycles]
    assert not cycles, "import cycles in asft_lightning:\n" + "\n".join(detail)


def test_the_cycle_finder_finds_cycles():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
    modules = _modules()
    assert f"{NAME}.cli" in modules and f"{NAME}.callbacks" in modules
    # the walk sees imports inside functions: the CLI imports the demo only when `asft demo` runs
    assert f"{NAME}.demo" in _imports(f"{NAME}.cli", modules[f"{NAME}.cli"], modules)
