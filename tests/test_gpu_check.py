"""`make gpu-check DEVICE=cpu QUICK=1`: the GPU check's script keeps working where CI runs (the CPU).

The reference is the run the script leaves behind: its log, its summary and its exit status.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_make_gpu_check_quick_on_the_cpu(tmp_path):
    log = tmp_path / "gpu_check.log"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    env.pop("PYTEST_CURRENT_TEST", None)
    r = subprocess.run(["make", "-s", "gpu-check", "DEVICE=cpu", "QUICK=1", f"PYTHON={sys.executable}", f"LOG={log}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    text = log.read_text()
    assert r.returncode == 0, text[-4000:]
    summary = text[text.index("=== summary ==="):]
    steps = re.findall(r"^(ok|FAILED.*?|left out.*?)\s+\d+\.\d s  (.+)$", summary, re.M)
    assert [name.split(":")[0] for _, name in steps] == [
        "versions and device", "device-aware tests on cpu", "finetune", "evaluate", "bench.py --quick"]
    assert all(status == "ok" for status, name in steps[:4]), summary
    assert "passed" in text and "gpu-check on cpu: passed" in text
    assert "torch " in text and "timm " in text  # the versions line


def test_a_python_without_the_dependencies_is_one_line(tmp_path):
    """A bare python (a fresh venv: what the system python3 is on many machines) is refused before any step."""
    import venv
    venv.create(tmp_path / "bare", with_pip=False)
    bare = tmp_path / "bare" / "bin" / "python"
    r = subprocess.run(["make", "-s", "gpu-check", "DEVICE=cpu", "QUICK=1", f"PYTHON={bare}", f"LOG={tmp_path / 'log'}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and not (tmp_path / "log").exists()
    [line] = [x for x in r.stderr.splitlines() if not x.startswith("make")]
    assert line.startswith(f"gpu-check: error: {bare} has no torch, torchvision, timm") and "pass PYTHON=" in line
