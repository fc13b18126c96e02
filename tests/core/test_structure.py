"""The package's two import rules, read statically from the source (tests/imports.py): every
`import` counts, at the top or inside a function.

- No import cycles among the modules of `stages/`: what two modules both need lives a level
  below them (a helper module of the stage, or `stages/core/`).
- No stage imports another stage: `base`, `prepare`, `train`, `merge`, `evaluate` and `export`
  import themselves and `stages/core/` only, so editing one stage's code re-runs that stage
  alone (plus what reads its outputs). `core` imports only itself; `tools` (inspect, gate,
  retrain, chat) may import any package, and none imports `tools`.
"""

from __future__ import annotations

from tests.imports import import_graph

STAGES = ("base", "prepare", "train", "merge", "evaluate", "export")


def package(module: str) -> str | None:
    """stages.prepare.shards -> prepare; stages (the root package) -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def may_import(importer: str, imported: str) -> bool:
    """Whether a module of package `importer` may import one of package `imported`."""
    ours, theirs = package(importer), package(imported)
    return theirs in (None, ours, "core") or ours == "tools"


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected group of modules that import each other, as the path
    a -> b -> ... -> a (Tarjan's algorithm, then the shortest way back round within the group).

    >>> find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}})
    [['a', 'b', 'c', 'a'], ['e', 'e']]
    >>> find_cycles({"a": {"b"}, "b": set()})
    []
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

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
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1 or node in graph.get(node, ()):
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(_shortest_round(graph, group) for group in groups)


def _shortest_round(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """The shortest path from the group's first module back to itself, inside the group."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node] & group):
                if nxt == start:
                    return [*paths[node], start]
                if nxt not in paths:
                    paths[nxt] = [*paths[node], nxt]
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"{sorted(group)} holds no cycle")


def test_no_import_cycles() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, "modules that import each other:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_stage_imports_another() -> None:
    crossing = sorted(
        f"{importer} imports {imported}"
        for importer, targets in import_graph().items()
        for imported in targets
        if not may_import(importer, imported)
    )
    assert not crossing, "imports across stage packages:\n" + "\n".join(crossing)


def test_the_graph_sees_every_kind_of_import() -> None:
    """Imports inside functions count, and the graph knows every stage package."""
    graph = import_graph()
    assert "stages.prepare.vision_shards" in graph["stages.prepare.shards"]
    assert "stages.core.eval_chats" in graph["stages.export.verify"]
    assert "stages.export.gguf" in graph["stages.export.command"]  # imported inside the click command
    assert {package(m) for m in graph} >= {*STAGES, "core", "tools"}


def test_the_rules() -> None:
    assert may_import("stages.merge.fold", "stages.merge.check")
    assert may_import("stages.merge.fold", "stages.core.io")
    assert may_import("stages.tools.gate", "stages.evaluate.harness")
    assert not may_import("stages.export.verify", "stages.evaluate.harness")
    assert not may_import("stages.core.cli", "stages.train.trainer")
    assert not may_import("stages.train.trainer", "stages.tools.gate")
