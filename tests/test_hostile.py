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


# --- convert/publish: a pickle of allow-listed names must not build objects from raw bytes ------------------------
class _Op:
    """Pickle opcodes for one value, written by hand: the hostile files no pickler would write."""

    def __init__(self, code: bytes):
        self.code = code


def _ops(v) -> bytes:
    import struct
    if isinstance(v, _Op):
        return v.code
    if v is None:
        return b"N"
    if isinstance(v, bool):
        return b"\x88" if v else b"\x89"
    if isinstance(v, int):
        raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
        return b"\x8a" + bytes([len(raw)]) + raw  # LONG1
    if isinstance(v, str):
        return b"X" + struct.pack("<I", len(v.encode())) + v.encode()  # BINUNICODE
    if isinstance(v, bytes):
        return b"B" + struct.pack("<I", len(v)) + v  # BINBYTES
    if isinstance(v, tuple):
        return b"(" + b"".join(map(_ops, v)) + b"t"
    if isinstance(v, list):
        return b"](" + b"".join(map(_ops, v)) + b"e"
    if isinstance(v, dict):
        return b"}(" + b"".join(_ops(k) + _ops(x) for k, x in v.items()) + b"u"
    raise TypeError(v)


def _global(module: str, name: str) -> _Op:
    return _Op(b"c" + module.encode() + b"\n" + name.encode() + b"\n")


def _call(f: _Op, *args) -> _Op:
    return _Op(f.code + _ops(tuple(args)) + b"R")


def _build(obj: _Op, state) -> _Op:
    return _Op(obj.code + _ops(state) + b"b")


def _pickle(obj) -> bytes:
    return b"\x80\x03" + _ops(obj) + b"."


def _dtype(spec: str, state=None) -> _Op:
    plain = (3, "|" if spec[0] in "OVb|" else "<", None, None, None, -1, -1, 0)
    return _build(_call(_global("numpy", "dtype"), spec, False, True), state or plain)


def _array(dtype: _Op, shape: tuple, raw) -> _Op:
    new = _call(_global("numpy._core.multiarray", "_reconstruct"), _global("numpy", "ndarray"), (0,), b"b")
    return _build(new, (1, shape, dtype, False, raw))


def _checkpoint(value) -> bytes:
    return _pickle({"NFNet/~/nf_block": {"w": value}})


POINTERS = (0x4141414141414141).to_bytes(8, "little") * 2  # what numpy would dereference as PyObject*
HOSTILE_PICKLES = {
    "object dtype via the array state": lambda: _array(_dtype("O8"), (2,), POINTERS),
    "object dtype via a scalar": lambda: _call(_global("numpy._core.multiarray", "scalar"), _dtype("O8"),
                                               POINTERS[:8]),
    "structured dtype with an object field": lambda: _array(_dtype("V16", (
        3, "|", None, ("a", "b"), {"a": (_dtype("f8"), 0), "b": (_dtype("O8"), 8)}, 16, 8, 27)), (1,), POINTERS),
    "numeric dtype given object fields by its state": lambda: _array(_dtype("f8", (
        3, "<", None, ("b",), {"b": (_dtype("O8"), 0)}, 8, 8, 27)), (2,), POINTERS),
    "raw void dtype": lambda: _array(_dtype("V8"), (2,), POINTERS),
    "object array from a list": lambda: _array(_dtype("O8"), (1,), [_call(_global("builtins", "dict"))]),
    "numpy.ndarray called on a buffer": lambda: _call(_global("numpy", "ndarray"), (2,), _dtype("O8"), POINTERS),
    "huge shape over a short buffer": lambda: _array(_dtype("f4"), (2 ** 40, 2 ** 20), POINTERS),
    "negative shape": lambda: _array(_dtype("f4"), (-4,), POINTERS),
    "array state without data": lambda: _array(_dtype("f4"), (4,), None),
}


def test_the_opcode_writer_writes_what_numpy_reads(tmp_path):
    """The same writer, with a plain float dtype, makes a pickle numpy itself reads as the array: the hostile
    variants below differ from a real checkpoint only in what they hold."""
    import pickle
    import numpy as np
    from nfnet_zoo.convert import load_haiku_checkpoint
    want = np.arange(6, dtype="<f4").reshape(2, 3)
    data = _checkpoint(_array(_dtype("f4"), (2, 3), want.tobytes()))
    np.testing.assert_array_equal(pickle.loads(data)["NFNet/~/nf_block"]["w"], want)  # numpy's reader
    path = tmp_path / "ok.pkl"
    path.write_bytes(data)
    np.testing.assert_array_equal(load_haiku_checkpoint(path)["NFNet/~/nf_block"]["w"], want)
    scalar = _call(_global("numpy._core.multiarray", "scalar"), _dtype("f8"), np.float64(2.5).tobytes())
    path.write_bytes(_checkpoint(scalar))
    assert load_haiku_checkpoint(path)["NFNet/~/nf_block"]["w"] == 2.5


@pytest.mark.parametrize("case", sorted(HOSTILE_PICKLES))
def test_convert_refuses_raw_memory_pickles_in_one_line(tmp_path, case):
    bad = tmp_path / "F0_haiku.npz"
    bad.write_bytes(_checkpoint(HOSTILE_PICKLES[case]()))
    r = run_cli(["convert", bad, "--out", tmp_path / "out"], tmp_path)
    line = one_line_error(r, "convert")  # was: exit -11 (SIGSEGV, 139 in a shell) for the object dtypes
    assert "F0_haiku.npz" in line and ("unsafe or foreign pickle" in line or "corrupt" in line), line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["object dtype via the array state", "structured dtype with an object field"])
def test_publish_refuses_raw_memory_pickles_in_one_line(tmp_path, case):
    bad = tmp_path / "F1_haiku.npz"
    bad.write_bytes(_checkpoint(HOSTILE_PICKLES[case]()))
    r = run_cli(["publish", bad, "--repo-id", "me/f1", "--dry-run"], tmp_path)
    assert "unsafe or foreign pickle" in one_line_error(r, "publish")
