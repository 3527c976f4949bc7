"""The package's shape, as the design guide draws it: data flows one way and the core never
reaches for its edges. Read from the source (no imports run), so it is fast and exact."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "src" / "continual_transformer"
PACKAGE = "continual_transformer"
# The core: nothing here may import the learner or the edges built on it.
CORE = ("types", "config", "data", "model", "methods", "training", "io")
EDGES = ("learner", "cli", "server", "experiment")


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (at module level or inside functions)."""
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    for candidate in (f"{target}.{alias.name}", target):
                        if candidate in mods:
                            deps.add(candidate)
                            break
            elif isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names if alias.name in mods)
        graph[name] = deps - {name, PACKAGE}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
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
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def _layer(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


@pytest.fixture(scope="module")
def graph():
    return _graph()


def test_the_package_has_no_import_cycles(graph):
    assert _cycles(graph) == []


def test_the_core_never_imports_the_learner_or_the_edges(graph):
    reaching = sorted((m, d) for m, deps in graph.items() if _layer(m) in CORE
                      for d in deps if _layer(d) in EDGES)
    assert reaching == []


def test_types_import_nothing_of_the_package(graph):
    assert graph[f"{PACKAGE}.types"] == set()


def test_no_two_modules_share_a_file_name():
    names = [p.name for p in ROOT.rglob("*.py") if p.name != "__init__.py"]
    assert sorted({n for n in names if names.count(n) > 1}) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
