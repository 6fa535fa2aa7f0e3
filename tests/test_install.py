"""Fits into users' environments: a light `import nfnet_zoo` and `nfnet-zoo --help`, declared imports.

References: the interpreter's own import log (`python -X importtime`), timm's registry in a fresh
process, and pyproject.toml against the imports found in the source by `ast`.
"""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "timm", "accelerate", "huggingface_hub", "PIL", "numpy", "safetensors", "matplotlib")
# what the `nfnet-zoo` console script runs (pyproject.toml: nfnet_zoo_cli:run)
CONSOLE_SCRIPT = "import sys; from nfnet_zoo_cli import run; sys.exit(run())"


def _imported_modules(args: list[str]) -> tuple[subprocess.CompletedProcess, set[str]]:
    r = subprocess.run([sys.executable, "-X", "importtime", "-c", CONSOLE_SCRIPT, *args], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    # lines "import time: self | cumulative | module" (the module indented by its depth)
    names = {line.rsplit("|", 1)[1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    return r, {n.split(".")[0] for n in names}


@pytest.mark.parametrize("args, code, says", [
    (["--help"], 0, "finetune"),
    (["finetune", "--help"], 0, "default: 0.1, the paper's"),
    (["push", "--help"], 0, "--repo-id"),
    (["curves", "--help"], 0, "pip install 'nfnet-zoo[plots]'"),
    (["predict", "--help"], 0, "Exit status: 0 when every image was scored, 1 when any could not be read"),
    (["predict", "runs/x", "a.png", "--json", "--csv"], 2, "argument --csv: not allowed with argument --json"),
    (["finetune", "--no-such-flag"], 2, "unrecognized arguments: --no-such-flag"),
    (["evaluate", "runs/x"], 2, "the following arguments are required: --data-dir"),
    (["no-such-command"], 2, "invalid choice"),
])
def test_help_and_usage_errors_import_no_heavy_library(args, code, says):
    r, modules = _imported_modules(args)
    assert r.returncode == code, r.stderr[-2000:]
    assert says in " ".join((r.stdout if code == 0 else r.stderr).split())  # argparse wraps lines
    assert "nfnet_zoo_cli" in modules  # the log is real: it saw our command line
    assert "nfnet_zoo" not in modules  # whose import registers the models with timm
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))


_IMPORT = """
import sys
import nfnet_zoo
import timm
names = timm.list_models("nfnet_*")
assert {"nfnet_f0", "nfnet_f7_plus", "nfnet_zoo_tiny"} <= set(names), names
assert timm.list_models(module="nfnet_zoo") == sorted(timm.list_models(module="nfnet_zoo")) and "nfnet_zoo_tiny" in \
    timm.list_models(module="nfnet_zoo")
assert isinstance(timm.create_model("nfnet_zoo_tiny"), nfnet_zoo.NFNet)
# registration is all the import does: training, the Hub client, data loading and plots load on first use
loaded = {m for m in sys.modules if m.startswith("nfnet_zoo.")}
assert loaded <= {"nfnet_zoo.errors", "nfnet_zoo.models", "nfnet_zoo.models.layers",
                  "nfnet_zoo.models.nfnet", "nfnet_zoo.models.nfnet_zoo", "nfnet_zoo.models.variants"}, sorted(loaded)
assert not {"accelerate", "matplotlib", "datasets"} & set(sys.modules), sorted(sys.modules)
assert callable(nfnet_zoo.finetune) and nfnet_zoo.finetune.__module__ == "nfnet_zoo.training.finetune"
assert nfnet_zoo.evaluate.__module__ == "nfnet_zoo.evaluation" and nfnet_zoo.push_to_hub.__module__ == "nfnet_zoo.hub.push"
assert not hasattr(sys.modules["nfnet_zoo"], "__path__") or type(sys.modules["nfnet_zoo"]).__name__ == "module"
print("ok")
"""
_EARLIER = """
import timm
assert "nfnet_zoo_tiny" not in timm.list_models("nfnet_*")
import nfnet_zoo
assert "nfnet_zoo_tiny" in timm.list_models("nfnet_*")
print("ok")
"""


@pytest.mark.parametrize("script", [_IMPORT, _EARLIER], ids=["nfnet_zoo-first", "timm-first"])
def test_import_nfnet_zoo_registers_the_variants_in_timm(script):
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def _top_level_imports(folder: Path) -> set[str]:
    names = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"__future__"}


def _declared(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


# import name -> distribution name, where they differ
DISTRIBUTION = {"PIL": "pillow", "sklearn": "scikit-learn", "yaml": "pyyaml", "huggingface_hub": "huggingface-hub"}


def test_every_import_is_declared_in_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    package = _declared(project["dependencies"]) | {d for reqs in extras.values() for d in _declared(reqs)}
    tests = _declared(project["dependencies"]) | _declared(extras["test"])
    # this project's own modules: the package and the helper files beside the tests and benchmarks
    local = {"nfnet_zoo", "nfnet_zoo_cli"} | {f.stem for d in ("tests", "benchmarks", "experiments") for f in (ROOT / d).glob("*.py")}
    as_dist = lambda names: {DISTRIBUTION.get(n, n).lower().replace("_", "-") for n in names - local}
    assert as_dist(_top_level_imports(ROOT / "src")) <= package
    assert as_dist(_top_level_imports(ROOT / "tests")) <= tests
    assert as_dist(_top_level_imports(ROOT / "experiments")) <= tests  # make reproduce runs in the tests
