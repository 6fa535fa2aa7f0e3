"""The declared floors: pyproject.toml's lower bounds, what `make test-floors` installs (constraints-floor.txt)
and what the commands check (nfnet_zoo_cli/versions.py) agree, and a release older than its floor is refused in
one line.

References: pyproject.toml and the constraints files as pip reads them, and the interpreter's own package
metadata (importlib.metadata) for the version found.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from nfnet_zoo_cli.versions import FLOORS

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower().replace("-", "_")


def _lower_bounds(requirements: list[str]) -> dict[str, str]:
    return {_name(r): m.group(1) for r in requirements if (m := re.search(r">=\s*([\w.]+)", r))}


def _pins(path: Path) -> dict[str, str]:
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return {_name(line): line.split("==")[1].strip() for line in lines if "==" in line}


def _release(version: str) -> tuple[int, ...]:
    numbers = [int(n) for n in version.split(".")]
    while numbers and numbers[-1] == 0:  # 1.0 == 1.0.0
        numbers.pop()
    return tuple(numbers)


def test_floors_agree_with_pyproject_and_constraints_floor():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = _lower_bounds(project["dependencies"])
    floors = _pins(ROOT / "constraints-floor.txt")
    pins = _pins(ROOT / "constraints.txt")
    assert declared.keys() == FLOORS.keys()
    assert {k: _release(v) for k, v in declared.items()} == {k: _release(v) for k, v in FLOORS.items()}
    for name, floor in declared.items():
        if name in ("torch", "torchvision"):  # only the pinned build is on the machine
            assert floors[name] == pins[name], name
        else:
            assert _release(floors[name]) == _release(floor), name
    extra = _lower_bounds(project["optional-dependencies"]["datasets"])
    assert extra.keys() == {"datasets", "pyarrow"}
    for name, floor in extra.items():  # the `datasets` extra's floors are what make test-floors installs
        assert _release(floors[name]) == _release(floor), name
    wds = _lower_bounds(project["optional-dependencies"]["wds"])
    assert wds.keys() == {"webdataset", "pyyaml"}  # pyyaml: webdataset's own dependency, not held to a floor here
    assert _release(floors["webdataset"]) == _release(wds["webdataset"])  # the `wds` extra's floor, installed too
    assert floors.keys() == declared.keys() | extra.keys() | {"webdataset"}


def _fake_installed(folder: Path, name: str, version: str) -> Path:
    """A distribution's metadata as pip writes it, so that importlib.metadata finds `version` first."""
    info = folder / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return folder


@pytest.mark.parametrize("command", [["evaluate", "runs/x", "--data-dir", "d"], ["cards", "--out", "o"]])
def test_a_release_older_than_its_floor_is_one_line(tmp_path, command):
    old = _fake_installed(tmp_path / "site", "timm", "1.0.15")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(old), str(ROOT / "src")])}
    r = subprocess.run([sys.executable, "-m", "nfnet_zoo_cli", *command], capture_output=True, text=True,
                       timeout=120, env=env, cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == (f"nfnet-zoo {command[0]}: error: timm 1.0.15 found, nfnet-zoo needs >= {FLOORS['timm']}: "
                        f"pip install -U 'timm>={FLOORS['timm']}'\n")
    assert not (tmp_path / "o").exists()


def test_the_installed_releases_pass_their_floors():
    from nfnet_zoo_cli.versions import check_versions, too_old
    assert check_versions() is None  # this environment: make test's pins or make test-floors' floors
    assert too_old("torch", "2.6") is None  # a local build's version: 2.14.1+cpu and the like
    assert too_old("torch", "999.0").startswith("torch ")
    assert too_old("no-such-distribution", "1.0") == ("no-such-distribution is not installed, nfnet-zoo needs "
                                                      ">= 1.0: pip install 'no-such-distribution>=1.0'")


def test_the_readme_table_names_the_floors_and_the_pins():
    """README's table under 'Installing with pip': its lowest column is FLOORS, its tested column the pins."""
    readme = (ROOT / "README.md").read_text()
    rows = {_name(cells[0].strip("` ")): cells for line in readme.splitlines()
            if line.startswith("| ") and len(cells := [c.strip() for c in line.strip("|").split("|")]) == 4}
    pins = _pins(ROOT / "constraints.txt")
    for name, floor in FLOORS.items():
        lowest, tested = rows[name][1], rows[name][3]
        assert lowest.split()[0].rstrip(",") == floor, name
        if name in pins:
            assert tested == pins[name], name
        else:
            assert tested.endswith("*") or "*," in tested, name  # marked: not pinned


def test_importing_with_a_timm_older_than_its_floor_warns_in_one_line(tmp_path):
    old = _fake_installed(tmp_path / "site", "timm", "1.0.15")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(old), str(ROOT / "src")])}
    r = subprocess.run([sys.executable, "-W", "always", "-c", "import nfnet_zoo, timm"], capture_output=True,
                       text=True, timeout=120, env=env)
    assert r.returncode == 0
    assert f"UserWarning: nfnet-zoo: timm 1.0.15 found, nfnet-zoo needs >= {FLOORS['timm']}: " in r.stderr
