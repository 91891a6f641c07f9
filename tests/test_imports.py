"""The import graph of each package has no circle: every `import` and `from ... import` of a sibling
module counts, at module level and inside functions (a function-level import only hides a circle
from the interpreter, not from a reader). A package's __init__ is its facade: a module importing the
package itself (`from rollout import X`) depends on everything __init__ imports."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def import_graph(package: str) -> dict[str, set[str]]:
    """module -> the sibling modules it imports (names relative to the package; "__init__" for it)."""
    graph: dict[str, set[str]] = {}
    for path in sorted((REPO / package).rglob("*.py")):
        name = ".".join(path.relative_to(REPO / package).with_suffix("").parts)
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for t in targets:
                if t == package:
                    deps.add("__init__")
                elif t.startswith(package + "."):
                    deps.add(t[len(package) + 1:])
        graph[name] = {dep for dep in deps if dep in _modules(package) and dep != name}
    return graph


def _modules(package: str) -> set[str]:
    return {".".join(p.relative_to(REPO / package).with_suffix("").parts) for p in (REPO / package).rglob("*.py")}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_circle_and_only_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


@pytest.mark.parametrize("package", ["rollout", "tulu"])
def test_package_imports_are_acyclic(package):
    graph = import_graph(package)
    assert len(graph) > 5, graph  # the walk found the package
    cycle = find_cycle(graph)
    assert cycle is None, f"{package}: import circle {' -> '.join(cycle)}"


def test_rollout_engine_side_never_reaches_the_trainer_side():
    """The engine (the readable reference of what vLLM computes) and the receiver stand alone: nothing
    on the engine side imports the pool or the trainer's half of the weight sync."""
    graph = import_graph("rollout")
    seen, todo = set(), ["engine", "receiver", "vllm_engine", "serve"]
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo += graph.get(node, ())
    assert not seen & {"pool", "weight_sync", "__init__"}, seen
