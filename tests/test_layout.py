"""The code's structure holds as docs/architecture.md draws it: packages are layers whose imports run one way,
no import circle (module-level or inside a function), no module takes another's `_private` name, no source file
much over 600 lines, every package says in its docstring what it owns, and methods/ sees only the contract."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*ROOT.glob("bench/**/*.py"), *ROOT.glob("methods/*.py")])
MAX_LINES = 620  # "about 600": a file past it holds more than one job

# Layers, top to bottom: a module imports only modules of its own layer or below.
LAYERS = [
    ("bench.cli", "bench.__main__"),
    ("bench.sweep",),
    ("bench.report",),
    ("bench.trial",),
    ("bench.evaluate",),
    ("methods", "bench.backbones", "bench.datasets", "bench.flops", "bench.readout"),
    ("bench.results", "bench.config", "bench.registry", "bench.runfolder", "bench.errors", "bench"),
]
METHODS_MAY_IMPORT = ("methods", "bench.registry", "bench.errors", "bench.readout", "bench.backbones.contract")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in SOURCES}


def resolve(name: str) -> str | None:
    """The project module an import names (a name imported from a package may be a module of it)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names taken from it) for every import statement of the file, in functions too."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.append((sub, []) if sub in MODULES else (node.module, [alias.name]))
    return [(m, names) for m, names in out if m.split(".")[0] in ("bench", "methods")]


GRAPH = {name: {resolve(m) for m, _ in imports(path)} - {None, name} for name, path in MODULES.items()}


def layer(name: str) -> int:
    best = None
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if name == prefix or name.startswith(prefix + ".") or (prefix == "bench" and name == "bench"):
                if best is None or len(prefix) > best[1]:
                    best = (i, len(prefix))
    assert best is not None, f"{name} is in no layer of tests/test_layout.py: add it where it belongs"
    return best[0]


def upward(graph) -> list[str]:
    return sorted(f"{a} -> {b}" for a, deps in graph.items() for b in deps if layer(b) < layer(a))


def circles(graph) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module."""
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


def test_imports_run_one_way():
    assert not upward(GRAPH), "imports from a lower layer to a higher one:\n" + "\n".join(upward(GRAPH))


def test_no_import_circle():
    assert not circles(GRAPH), f"import circles: {circles(GRAPH)}"


def test_no_private_name_crosses_modules():
    taken = [f"{module_name(path)} takes {m}.{n}" for path in SOURCES for m, names in imports(path)
             for n in names if n.startswith("_") and not n.startswith("__")]
    assert not taken, "\n".join(taken)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_source_files_stay_short(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES, f"{path.relative_to(ROOT)}: split it by job"


def test_every_package_says_what_it_owns():
    for init in [*ROOT.glob("bench/**/__init__.py"), ROOT / "methods" / "__init__.py"]:
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) > 40, f"{init.relative_to(ROOT)}: a docstring saying what the package owns"


def test_methods_see_only_the_contract_the_readout_and_the_registry():
    seen = {m for path in ROOT.glob("methods/*.py") for m, _ in imports(path)}
    outside = sorted(m for m in seen if not any(m == p or m.startswith(p + ".") for p in METHODS_MAY_IMPORT))
    assert not outside, f"methods/ imports {outside}"


def test_the_layout_checks_see_a_circle_and_an_upward_import():
    """The checks are not vacuous: the real graph crosses layers downward, and planted faults are found."""
    assert "bench.evaluate.curves" in GRAPH["bench.report.frame"]
    assert "bench.trial.train" in GRAPH["bench.sweep.runner"]
    planted = {"bench.trial.train": {"bench.sweep.runner"}, "bench.sweep.runner": {"bench.trial.train"},
               "bench.errors": set()}
    assert circles(planted) == [["bench.sweep.runner", "bench.trial.train"]]
    assert upward(planted) == ["bench.trial.train -> bench.sweep.runner"]
