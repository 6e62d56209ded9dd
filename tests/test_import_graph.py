"""The runtime holds only the runtime, and the SDK and the benchmark have no
import cycles (counting imports inside functions too: a lazy import that
closes a cycle is still a cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _module(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(packages: tuple[str, ...]) -> dict[str, set[str]]:
    """Module -> the modules of ``packages`` it imports anywhere in its body."""
    files = {_module(p): p for pkg in packages for p in (REPO / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    deps.add(sub if sub in files else node.module)
            elif isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_lazy_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_sdk_and_bench_modules_import_no_cycle() -> None:
    graph = import_graph(("raftstate", "bench"))
    bad = [c for c in cycles(graph) if any(m.startswith(("raftstate.sdk", "bench")) for m in c)]
    assert bad == []


def test_the_runtime_package_imports_no_measurement_code() -> None:
    """Outside the CLI, ``raftstate`` never imports ``bench``, ``chaos`` or
    ``cluster``; inside it only ``raftstate.cli.main`` reaches ``bench``
    (lazily, in ``raftstate bench``)."""
    graph = import_graph(("raftstate", "bench", "chaos", "cluster"))
    offenders = set()
    for m, deps in graph.items():
        if not m.startswith("raftstate"):
            continue
        for d in deps:
            top = d.split(".")[0]
            if top == "bench" and m != "raftstate.cli.main":
                offenders.add((m, d))
            if top in ("bench", "chaos", "cluster") and not m.startswith("raftstate.cli"):
                offenders.add((m, d))
    assert offenders == set()
    assert not (REPO / "raftstate" / "bench").exists()
    assert not (REPO / "raftstate" / "benchpb").exists()
