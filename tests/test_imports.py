"""The package's import graph has no cycles, counting every import (also inside functions)."""
from __future__ import annotations

import ast
import os

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ddp_train")


def module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-len(".py")].split(os.sep)
    return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def modules() -> dict[str, str]:
    """``{dotted module name: file}`` for every .py file under ddp_train/."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                found[module_name(os.path.join(folder, f))] = os.path.join(folder, f)
    return found


def imported(name: str, path: str, known: set[str]) -> set[str]:
    """The ddp_train modules that importing ``name`` runs: every import statement in the file
    (module level or not), and the packages above each target, except the importer's own
    (a submodule importing a sibling finds its package already initialising)."""
    is_package = path.endswith("__init__.py")
    package = name if is_package else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.Import):
            targets |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = ".".join(base[:len(base) - node.level + 1])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            targets.add(source)
            targets |= {f"{source}.{a.name}" for a in node.names}  # `from pkg import submodule`
    own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
    edges = set()
    for target in targets:
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix in known and prefix not in own:
                edges.add(prefix)
    return edges


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def import_graph() -> dict[str, set[str]]:
    """``{module: modules it imports}`` over ddp_train/."""
    found = modules()
    return {name: imported(name, path, set(found)) for name, path in found.items()}


def test_no_import_cycles():
    graph = import_graph()
    assert "ddp_train.trainer" in graph and "ddp_train.engine.base" in graph
    assert cycles(graph) == []


def test_the_cycle_check_finds_cycles():
    # The checker itself: a two-module and a three-module cycle, and an acyclic chain.
    graph = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"g"}, "g": set()}
    assert cycles(graph) == [["a", "b"], ["c", "d", "e"]]


def test_relative_and_nested_imports_are_edges():
    graph = import_graph()
    assert "ddp_train.models" in graph["ddp_train.infer"]  # imported inside a function
    assert "ddp_train.checkpoint" in graph["ddp_train.engine.base"]  # `from .. import checkpoint`
    assert "ddp_train.engine.deepspeed_engine" in graph["ddp_train.engine"]  # lazy, in a function
    # a submodule's import of its own package is not an edge (it is initialising already)
    assert "ddp_train.engine" not in graph["ddp_train.engine.ddp"]
