"""The package's import graph: no cycle, and every module imports only from its own layer or below.

The graph is read from the source with :mod:`ast`: every ``import cctuning...`` and ``from cctuning...``
of a module, at module level or inside a function, is an edge to the module it names (a name imported
from a package that is itself a module, ``from cctuning.eval import nll``, is an edge to that module).
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cctuning"

# lowest first; the first part of the module name after ``cctuning.`` decides its layer
LAYERS = [
    {"errors", "io", "versions", "config", "stats", "guard"},
    {"data"},
    {"model"},
    {"loading", "presets"},
    {"training", "inference"},
    # `cctuning serve` (the HTTP server over generation) sits beside eval: nothing below it imports it
    {"eval", "serve"},
    # orchestration over the library (the experiment runner, the demo, `cctuning report`, diagnostics)
    {"lab"},
    {"cli"},
]
LAYER = {part: level for level, parts in enumerate(LAYERS) for part in parts}
# the package itself re-exports the model's names (CCModel, CCConfig) and the errors
PACKAGE_LAYER = LAYER["model"]
# a helper for tests and benchmarks: it may use the model and the data, the library never imports it
TESTING = "cctuning.testing"
TESTING_MAY_IMPORT = LAYER["model"]
LAB, CLI = "cctuning.lab", "cctuning.cli"
# Cycles found and reported, to be removed by the module's owner: then this list must shrink with it.
KNOWN_CYCLES: list[list[str]] = []


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def module_files() -> dict[str, Path]:
    return {
        module_name(path): path for path in sorted(PACKAGE.rglob("*.py")) if "resources" not in path.parts
    }


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """The package modules that ``name`` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1 packages
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # ``import cctuning.model.arch as a`` names a module
                target = target.rpartition(".")[0]
            if target.startswith("cctuning") and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def layer_of(name: str) -> int | None:
    """The layer of a module (None for the test helper, which the library may not import at all)."""
    parts = name.split(".")
    if name == TESTING:
        return None
    return PACKAGE_LAYER if len(parts) == 1 else LAYER.get(parts[1])


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a higher layer, or of the test helper, as "importer -> imported (why)"."""
    found = []
    for name, targets in sorted(graph.items()):
        level = TESTING_MAY_IMPORT if name == TESTING else layer_of(name)
        for target in sorted(targets):
            if target == TESTING:
                found.append(f"{name} -> {target} (a helper for tests, not for the library)")
            elif layer_of(target) > level:
                found.append(f"{name} (layer {level}) -> {target} (layer {layer_of(target)})")
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read_from_every_module():
    graph = import_graph()
    assert {"cctuning.cli", "cctuning.errors", "cctuning.model.ccmodel", TESTING} <= set(graph)
    assert "cctuning.errors" in graph["cctuning.cli"]  # module level
    assert "cctuning.training" in graph["cctuning.cli.train"]  # inside a function
    unknown = {name for name in graph if layer_of(name) is None} - {TESTING}
    assert not unknown, f"modules with no layer in LAYERS: {sorted(unknown)}"


def test_no_import_cycle():
    assert cycles(import_graph()) == KNOWN_CYCLES


def test_every_module_imports_only_from_its_layer_or_below():
    assert violations(import_graph()) == []


def _in(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def lab_importers(graph: dict[str, set[str]]) -> dict[str, list[str]]:
    """The modules outside cctuning.lab and cctuning.cli that import cctuning.lab, with what they import."""
    found = {
        name: sorted(t for t in targets if _in(t, LAB))
        for name, targets in graph.items()
        if not (_in(name, LAB) or _in(name, CLI))
    }
    return {name: targets for name, targets in found.items() if targets}


def test_only_the_lab_and_the_cli_import_the_lab():
    """cctuning.lab orchestrates the library: nothing below it may need it (the layer rule implies
    this; said here on its own, naming the modules that break it)."""
    offenders = lab_importers(import_graph())
    assert offenders == {}, f"only cctuning.lab and cctuning.cli may import cctuning.lab: {offenders}"


def test_lab_importers_are_found():
    graph = {
        "cctuning.eval.nll": {"cctuning.lab.report", "cctuning.stats"},
        "cctuning.model": {"cctuning.lab"},
        "cctuning.cli": {"cctuning.lab.experiment"},
        "cctuning.lab.demo": {"cctuning.lab.experiment", "cctuning.eval.nll"},
        "cctuning.laboratory": {"cctuning.eval"},
    }
    assert lab_importers(graph) == {
        "cctuning.eval.nll": ["cctuning.lab.report"],
        "cctuning.model": ["cctuning.lab"],
    }


def test_violations_are_found():
    graph = {
        "cctuning.data.records": {"cctuning.model.arch", "cctuning.errors"},
        "cctuning.errors": {"cctuning"},
        "cctuning.eval.nll": {"cctuning.testing", "cctuning.inference.matrix"},
        TESTING: {"cctuning.model", "cctuning.training"},
    }
    assert violations(graph) == [
        "cctuning.data.records (layer 1) -> cctuning.model.arch (layer 2)",
        "cctuning.errors (layer 0) -> cctuning (layer 2)",
        "cctuning.eval.nll -> cctuning.testing (a helper for tests, not for the library)",
        "cctuning.testing (layer 2) -> cctuning.training (layer 4)",
    ]


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
        ({"a": {"b"}, "b": set()}, []),
    ],
)
def test_cycles_finds_a_loop(graph, expected):
    assert cycles(graph) == expected
