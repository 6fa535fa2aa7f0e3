"""Hostile input (issue 15): nothing of the user's deleted, no code run from a file, one line per fault.

Every hostile file is generated here (pickle opcodes, planted run folders); the commands run as the user
runs them, in a subprocess, and the references are the files on disk before and after.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "nfnet_zoo.cli"]


def _env(tmp_path: Path) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1")
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


def run_cli(args: list, tmp_path: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, env=_env(tmp_path),
                          timeout=timeout, cwd=tmp_path)


def one_line_error(r: subprocess.CompletedProcess, command: str, code: int = 2) -> str:
    """The single stderr line of a refused command (exit `code`, no traceback)."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == code and "Traceback" not in r.stderr, (r.returncode, r.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith(f"nfnet-zoo {command}: error: "), r.stderr
    return lines[0]


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes (and every folder), to show that nothing changed."""
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else b"<dir>")
            for p in sorted(root.rglob("*"))}


# --- demo: deletes only what it can prove it wrote ------------------------------------------------------------
def test_demo_never_deletes_a_users_digits_folder(tmp_path):
    home = tmp_path / "home"
    (home / "digits" / "mine").mkdir(parents=True)
    (home / "digits" / "mine" / "thesis.txt").write_text("years of work")
    (home / "demo").mkdir()
    (home / "demo" / "notes.txt").write_text("mine too")
    before = snapshot(home)
    line = one_line_error(run_cli(["demo", "--output", home / "demo"], tmp_path), "demo")
    assert "not an earlier demo run" in line and "nothing was changed" in line
    assert snapshot(home) == before


@pytest.mark.parametrize("digits", ["user folder", "user file", "empty tmp beside"])
def test_demo_refuses_a_digits_folder_it_did_not_write_before_writing_anything(tmp_path, digits):
    home = tmp_path / "home"
    home.mkdir()
    if digits == "user folder":
        (home / "digits" / "mine").mkdir(parents=True)
    elif digits == "user file":
        (home / "digits").write_text("a file named digits")
    else:  # the old code removed digits.tmp unasked
        (home / "digits.tmp" / "mine").mkdir(parents=True)
        (home / "digits" / "mine").mkdir(parents=True)
    before = snapshot(home)
    line = one_line_error(run_cli(["demo", "--output", home / "demo"], tmp_path), "demo")
    assert "is not a digits folder the demo wrote" in line
    assert snapshot(home) == before and not (home / "demo").exists()


def test_demo_digits_folder_is_reused_only_while_unchanged(tmp_path):
    from nfnet_zoo import NFNetZooError
    from nfnet_zoo.demo import build_digits_folder
    root = build_digits_folder(tmp_path / "digits")
    assert build_digits_folder(root) == root
    (root / "train" / "3" / "mine.png").write_bytes(b"a user's file")  # the user adds a file
    with pytest.raises(NFNetZooError, match="mine.png is not one of its files"):
        build_digits_folder(root)
    assert (root / "train" / "3" / "mine.png").read_bytes() == b"a user's file"


def test_removing_an_owned_folder_deletes_exactly_its_files(tmp_path):
    from nfnet_zoo._owned import remove_owned, write_manifest
    run = tmp_path / "run"
    (run / "last").mkdir(parents=True)
    (run / "model.safetensors").write_bytes(b"w" * 10)
    (run / "last" / "config.json").write_text("{}")
    write_manifest(run)
    (run / "user").mkdir()  # an empty folder of the user's is content too
    assert remove_owned(run) == "user/ is not one of its files"
    (run / "user").rmdir()
    (run / "model.safetensors").write_bytes(b"x" * 10)  # same size, other bytes
    assert remove_owned(run) == "model.safetensors was changed"
    (run / "model.safetensors").write_bytes(b"w" * 10)
    os.symlink(tmp_path, run / "link")
    assert remove_owned(run) == "link is not one of its files"
    (run / "link").unlink()
    assert remove_owned(run) is None
    assert run.is_dir() and not any(run.iterdir())
