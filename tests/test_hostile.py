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


# --- --resume: a run folder never runs code, and damage is one line, never an inexact resume -------------------
TINY_RUN = ["--model", "nfnet_zoo_tiny", "--img-size", "32", "-b", "8", "--no-pretrained", "-j", "0", "--lr", "0.05",
            "--save-every", "0", "--seed", "1"]


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> Path:
    """A tiny run stopped after epoch 1 of 2 (its state is resumable), copied by each test that damages it."""
    from _images import make_folder
    from nfnet_zoo.cli import main
    tmp = tmp_path_factory.mktemp("saved")
    data = make_folder(tmp / "data", n_train=8, n_val=2)
    assert main(["finetune", *TINY_RUN, "--epochs", "1", "--data-dir", str(data), "--output", str(tmp / "run")]) == 0
    return tmp / "run"


@pytest.fixture
def run_copy(saved_run, tmp_path) -> Path:
    import shutil
    return Path(shutil.copytree(saved_run, tmp_path / "run"))


class _Payload:
    """What a hostile colleague plants: unpickling it creates MARKER (in place of anything worse)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_resume_never_unpickles_what_is_planted_in_the_state(run_copy, tmp_path):
    import torch
    marker = tmp_path / "PWNED"
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "pytorch_model.bin"):
        torch.save(_Payload(marker), run_copy / "state" / name)  # the files Accelerate's load_state reads
    r = run_cli(["finetune", "--resume", run_copy, "--epochs", "2"], tmp_path)
    assert not marker.exists(), "code from the run folder ran"
    line = one_line_error(r, "finetune")
    assert "is not one of the files the state was saved with" in line and "start a new run" in line


def test_resume_refuses_a_state_whose_manifest_lists_planted_files(run_copy, tmp_path):
    import torch
    from nfnet_zoo._owned import write_manifest
    marker = tmp_path / "PWNED"
    torch.save(_Payload(marker), run_copy / "state" / "custom_checkpoint_0.pkl")
    write_manifest(run_copy / "state", "manifest.json", extra={"format": 1, "processes": 1})  # a consistent forgery
    r = run_cli(["finetune", "--resume", run_copy, "--epochs", "2"], tmp_path)
    assert not marker.exists()
    assert "custom_checkpoint_0.pkl does not belong to this run's state" in one_line_error(r, "finetune")


def test_resume_refuses_an_accelerate_state_of_pickles(run_copy, tmp_path):
    """The state an earlier nfnet-zoo wrote (Accelerate's files, no manifest) is refused, never unpickled."""
    import shutil
    import torch
    marker = tmp_path / "PWNED"
    shutil.rmtree(run_copy / "state")
    (run_copy / "state").mkdir()
    torch.save(_Payload(marker), run_copy / "state" / "custom_checkpoint_0.pkl")
    (run_copy / "state" / "model.safetensors").write_bytes(b"")
    r = run_cli(["finetune", "--resume", run_copy, "--epochs", "2"], tmp_path)
    assert not marker.exists()
    line = one_line_error(r, "finetune")
    assert "manifest.json is missing" in line and "older nfnet-zoo" in line and "another --output" in line


def _forge(run: Path, name: str, edit) -> None:
    """Damage state/NAME with `edit(path)` and re-write the manifest so that only the content checks can tell."""
    from nfnet_zoo._owned import write_manifest
    edit(run / "state" / name)
    write_manifest(run / "state", "manifest.json", extra={"format": 1, "processes": 1})


def _rewrite_json(change):
    import json

    def edit(path: Path) -> None:
        obj = json.loads(path.read_text())
        change(obj)
        path.write_text(json.dumps(obj))
    return edit


def _rewrite_tensors(change):
    from safetensors.torch import load_file, save_file

    def edit(path: Path) -> None:
        tensors = load_file(path)
        change(tensors)
        save_file(tensors, path)
    return edit


DAMAGE = {
    # (file, how, forge the manifest too) -> words of the one line
    "truncated weights": ("model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:1000]), False,
                          "model.safetensors was changed since it was saved"),
    "a missing RNG file": ("rng_0.json", lambda p: p.unlink(), False, "rng_0.json is missing"),
    "a flipped byte in the RNG state": ("rng_0.safetensors", lambda p: p.write_bytes(
        p.read_bytes()[:-1] + bytes([p.read_bytes()[-1] ^ 1])), False, "rng_0.safetensors was changed"),
    "half-written JSON": ("progress.json", lambda p: p.write_text(p.read_text()[:20]), True, "is not valid JSON"),
    "a foreign RNG format": ("rng_0.json", _rewrite_json(lambda o: o["numpy"].update(key=[1, 2, 3])), True,
                             "rng_0.json is not a Python + numpy generator state"),
    "a torch RNG state of the wrong size": ("rng_0.safetensors", _rewrite_tensors(
        lambda t: t.update(torch=t["torch"][:100].clone())), True, "holds no torch CPU generator state"),
    "weights of another shape": ("model.safetensors", _rewrite_tensors(
        lambda t: t.update({"head.fc.bias": t["head.fc.bias"][:2].clone()})), True, "does not fit this model"),
    "foreign progress": ("progress.json", _rewrite_json(lambda o: o.update(epoch="one")), True,
                         "progress.json does not fit this run"),
    "another optimizer": ("optimizer.json", _rewrite_json(lambda o: o["param_groups"].pop()), True,
                          "other parameter groups"),
    "a momentum of another shape": ("optimizer.safetensors", _rewrite_tensors(
        lambda t: t.update({k: t[k][:1].clone() for k in list(t)[:1]})), True, "has shape"),
    "a manifest of another format": ("manifest.json", _rewrite_json(lambda o: o.update(format=0)), False,
                                     "has format 0"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_state_is_one_line_never_an_inexact_resume(run_copy, case, capsys):
    from nfnet_zoo.cli import main
    name, edit, forge, words = DAMAGE[case]
    (_forge(run_copy, name, edit) if forge else edit(run_copy / "state" / name))
    before = snapshot(run_copy)
    assert main(["finetune", "--resume", str(run_copy), "--epochs", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("nfnet-zoo finetune: error: ") and words in err[-1], err[-1]
    assert "state" in err[-1] and ("restore" in err[-1] or "start" in err[-1])
    assert snapshot(run_copy) == before  # nothing trained, nothing written
