"""Waiting for a command the tests started in its own session (`start_new_session=True`)."""
from __future__ import annotations

import os
import signal
import subprocess

import pytest


def wait(p: subprocess.Popen, timeout: float = 240) -> subprocess.CompletedProcess:
    """P's result; past TIMEOUT its whole process group (torchrun and its workers) is killed and the test fails."""
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"{' '.join(map(str, p.args[:6]))} ... timed out:\n{err[-2000:]}")
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)
