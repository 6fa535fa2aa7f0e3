"""The package's shape: its import graph (every import, at module level or inside a function) has no
cycle, data flows one way (models -> data, AGC -> evaluation -> training -> hub -> command line),
the reference model imports no speed path, and nothing hooks the import system.

Reference: the source itself, read with `ast` (nothing is imported to find the imports).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGES = ("nfnet_zoo", "nfnet_zoo_cli")

# Layers, lowest first: a module may import from its own layer and those below, never from above.
LAYERS = [
    ("nfnet_zoo.errors", "nfnet_zoo.files", "nfnet_zoo_cli.settings", "nfnet_zoo_cli.versions"),
    ("nfnet_zoo.models",),
    ("nfnet_zoo.agc", "nfnet_zoo.agc_distributed", "nfnet_zoo.data"),  # data's own modules: see test below
    ("nfnet_zoo.evaluation", "nfnet_zoo.export"),
    ("nfnet_zoo.training",),
    ("nfnet_zoo.hub",),
    ("nfnet_zoo.demo",),
    ("nfnet_zoo_cli",),
]


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (SRC / package).rglob("*.py"):
            parts = path.relative_to(SRC).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Our modules that `name` imports anywhere in its source (a package counts as its __init__)."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # `from pkg import sub` imports the module pkg.sub where one exists, else names of pkg
            targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in MODULES else stem for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # nfnet_zoo.models.layers.WSConv2d -> the module
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(name: str) -> int:
    best = None
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if name == prefix or name.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (i, len(prefix))
    assert best is not None, f"{name} is in no layer of tests/test_structure.py: place it"
    return best[0]


def test_the_graph_is_read():
    # the reading is real: known edges are found, at module level and inside functions
    assert "nfnet_zoo.models.layers" in GRAPH["nfnet_zoo.models.nfnet"]
    assert "nfnet_zoo.agc" in GRAPH["nfnet_zoo.agc_distributed"]
    assert any(m.startswith("nfnet_zoo.training") for m in GRAPH["nfnet_zoo_cli.cli"])  # lazy, in handlers


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n not in PACKAGES))
def test_data_flows_one_way(name):
    # The package roots are the public tables (lazy names): they sit above everything and are not checked.
    upward = sorted(t for t in GRAPH[name] if t not in PACKAGES and _layer(t) > _layer(name))
    assert not upward, f"{name} (layer {_layer(name)}) imports from a higher layer: {upward}"


# Modules that serve the speed path's copy rather than compute with the reference: the export writes the
# standardised weights `standardize_once` holds as plain convolutions.
SERVES_THE_SPEED_PATH = ["nfnet_zoo.export"]


def test_the_reference_model_imports_no_speed_path():
    speed = "nfnet_zoo.models.inference"
    importers = sorted(n for n, targets in GRAPH.items() if speed in targets)
    # otherwise reached only through nfnet_zoo.optimize_for_inference's lazy name
    assert importers == SERVES_THE_SPEED_PATH, importers


def test_nothing_hooks_the_import_system():
    for name, path in MODULES.items():
        text = path.read_text()
        for marker in ("meta_path", "MetaPathFinder", "path_hooks", "__class__ ="):
            assert marker not in text, f"{name} uses {marker}"


def test_data_modules_build_on_one_another():
    # Hub ids <- samples (what a sample is, how it is read) <- datasets <- files on disk <- loading <- shards <- entry points
    order = ["nfnet_zoo.data.image_check", "nfnet_zoo.data.sources", "nfnet_zoo.data.hfds", "nfnet_zoo.data.samples",
             "nfnet_zoo.data.hf", "nfnet_zoo.data.folders", "nfnet_zoo.data.loading", "nfnet_zoo.data.shards",
             "nfnet_zoo.data"]
    assert set(order) == {n for n in MODULES if n == "nfnet_zoo.data" or n.startswith("nfnet_zoo.data.")}
    for i, name in enumerate(order):
        later = sorted(t for t in GRAPH[name] if t in order[i + 1:])
        assert not later, f"{name} imports {later}, which build on it"
