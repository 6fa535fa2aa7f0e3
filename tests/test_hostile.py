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

CLI = [sys.executable, "-m", "nfnet_zoo_cli"]


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
    from nfnet_zoo.files import remove_owned, write_manifest
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
    from nfnet_zoo.models.convert import load_haiku_checkpoint
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
    from nfnet_zoo_cli import main
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
    from nfnet_zoo.files import write_manifest
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
    from nfnet_zoo.files import write_manifest
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
    "a null running sum": ("progress.json", _rewrite_json(lambda o: o.update(loss_sum=None)), True,
                           "progress.json does not fit this run"),
    "a step beyond the epoch": ("progress.json", _rewrite_json(lambda o: o.update(step=10 ** 6)), True,
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
    from nfnet_zoo_cli import main
    name, edit, forge, words = DAMAGE[case]
    (_forge(run_copy, name, edit) if forge else edit(run_copy / "state" / name))
    before = snapshot(run_copy)
    assert main(["finetune", "--resume", str(run_copy), "--epochs", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("nfnet-zoo finetune: error: ") and words in err[-1], err[-1]
    assert "state" in err[-1] and ("restore" in err[-1] or "start" in err[-1])
    assert snapshot(run_copy) == before  # nothing trained, nothing written


# --- every numeric flag of every command: one line, exit 2, nothing written ----------------------------------------
NEG, HUGE, NAN, INF = "-1", "1e30", "nan", "inf"
INT_BAD = [NEG, "99999999999999", "1.5", NAN]  # an int flag: negative, huge, a fraction, nan
BAD_FLAGS = {
    # finetune: flag -> values outside its range (the examples among them)
    "--epochs": ["0", *INT_BAD], "--batch-size": ["0", *INT_BAD], "--grad-accum-steps": ["0", *INT_BAD],
    "--lr": ["0", NEG, HUGE, NAN, INF], "--lr-base": ["0", NEG, HUGE, NAN],
    "--momentum": [NEG, "1", HUGE, NAN], "--weight-decay": [NEG, "2", NAN, INF],
    "--warmup-epochs": [NEG, HUGE, NAN], "--warmup-lr": [NEG, HUGE, NAN], "--min-lr": [NEG, HUGE, INF],
    "--smoothing": [NEG, "1", NAN], "--mixup": [NEG, HUGE, NAN], "--cutmix": [NEG, INF],
    "--drop": ["2", NEG, "1", NAN], "--drop-path": [NEG, "1", INF], "--clipping": [NEG, HUGE, NAN],
    "--model-ema-decay": [NEG, "2", NAN], "--img-size": ["0", "-8", "4", *INT_BAD],
    "--test-img-size": ["0", "-8", *INT_BAD], "--hflip": [NEG, "1.5", NAN], "--seed": [NEG, "4294967296", "x"],
    "--workers": [NEG, "99999999", "two"], "--val-split": [NEG, "1", NAN], "--save-every": [NEG, "1e3"],
    "--log-interval": ["0", NEG, "1e3"],
    "--freeze-epochs": [*INT_BAD, "11"],  # 11: more than the 10 --epochs
    "--layer-decay": ["0", NEG, "1.5", NAN, INF], "--patience": INT_BAD,
    "--sam": [NEG, "11", NAN, INF], "--sam-fraction": ["0", NEG, "1.5", NAN],
    "--decay-epochs": ["0", NEG, NAN, INF], "--decay-rate": ["0", NEG, HUGE, NAN], "--decay-milestones": ["0", NEG],
}
BAD_SCALES = [["2", "-1"], ["0", "0.5"], ["0.6", "0.5"], [NAN, "1"], ["0.1", INF]]
OTHER_BAD = [  # (command line, where the command would write)
    (["convert", "IN", "--out", "OUT", "--alpha", v], "OUT") for v in ("0", NEG, NAN, INF, HUGE)] + [
    (["publish", "IN", "--repo-id", "me/x", "--dry-run", "--alpha", v], None) for v in ("0", NAN)] + [
    (["evaluate", "OUT", "--data-dir", "IN", "-b", v], None) for v in ("0", NEG, "1e3", NAN)] + [
    (["evaluate", "OUT", "--data-dir", "IN", "-j", v], None) for v in (NEG, "99999999")] + [
    (["predict", "OUT", "IN", "-k", v], None) for v in ("0", NEG, "99999999999")] + [
    (["demo", "--output", "OUT", "-j", v], "OUT") for v in (NEG, "nan")] + [
    (["export", "OUT", "--output", "OUT.onnx", "--image-size", v], "OUT.onnx") for v in ("0", NEG, "4097", NAN)]


def _refused_in_process(args: list, capsys) -> str:
    from nfnet_zoo_cli import main
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse's refusals
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, (code, err)
    return err[0]


@pytest.mark.parametrize("flag, value", [(f, v) for f, vs in BAD_FLAGS.items() for v in vs] +
                         [("--scale", v) for v in BAD_SCALES])
def test_every_numeric_finetune_flag_is_checked_before_anything_is_written(flag, value, tmp_path, capsys):
    data = tmp_path / "data" / "a"
    data.mkdir(parents=True)
    out = tmp_path / "run"
    values = value if isinstance(value, list) else [value]
    line = _refused_in_process(["finetune", "--model", "nfnet_zoo_tiny", "--no-pretrained", "--data-dir",
                                data.parent, "--output", out, flag, *values], capsys)
    assert line.startswith("nfnet-zoo finetune: error: ") and flag in line, line
    assert not out.exists()


@pytest.mark.parametrize("args, writes", OTHER_BAD, ids=[" ".join(a) for a, _ in OTHER_BAD])
def test_every_numeric_flag_of_the_other_commands_is_checked(args, writes, tmp_path, capsys):
    (tmp_path / "IN").write_bytes(b"x")
    args = [tmp_path / a if a in ("IN", "OUT") else a for a in args]
    line = _refused_in_process(args, capsys)
    assert line.startswith(f"nfnet-zoo {args[0]}: error: argument "), line
    assert not (tmp_path / "OUT").exists()


@pytest.mark.parametrize("kwargs", ["widths=(-1,64,96,128)", "group_width=0", "alpha='x'", "drop_rate=5.0"])
def test_model_kwargs_timm_refuses_are_one_line(kwargs, tmp_path, capsys):
    from _images import make_folder
    data = make_folder(tmp_path / "data", n_train=2, n_val=1)
    line = _refused_in_process(["finetune", "--model", "nfnet_zoo_tiny", "--no-pretrained", "--data-dir", data,
                                "--output", tmp_path / "run", "-j", "0", "--model-kwargs", kwargs], capsys)
    assert "bad model argument for nfnet_zoo_tiny" in line and "--model-kwargs" in line


def test_the_lists_above_cover_every_numeric_flag_of_every_command():
    """A numeric flag added later without a range fails here (the ranges live in nfnet_zoo_cli/settings.py)."""
    from nfnet_zoo_cli import build_parser
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    covered = set(BAD_FLAGS) | {"--scale"} | {f"{a[0]} {x}" for a, _ in OTHER_BAD for x in a if x.startswith("-")}
    for name, sub in commands.items():
        for action in sub._actions:
            if action.type in (int, float) or getattr(action.type, "__name__", "") == "parse":
                long = max(action.option_strings, key=len)
                assert long in covered or f"{name} {action.option_strings[0]}" in covered or \
                    f"{name} {long}" in covered, f"{name} {long} has no hostile values in this test"


# --- damaged run folders: one line naming the file and the fix; advice that does not loop ---------------------------
@pytest.mark.parametrize("name, content, words", [
    ("args.json", '{"model": "nfnet_zoo_ti', "args.json is damaged or foreign"),
    ("args.json", "[1, 2]", "args.json is damaged or foreign"),
    ("args.json", '{"model": "nfnet_zoo_tiny", "data_dir": "d", "epochs": -3}', "epochs must be an integer"),
    ("args.json", '{"model": "nfnet_zoo_tiny", "data_dir": "d", "scale": 5}', "args.json is damaged or foreign"),
    ("args.json", b"\xff\xfe{}", "args.json is damaged or foreign"),
    ("args.json", '{"model": "nfnet_zoo_tiny", "data_dir": "d", "model_args": [1]}', "args.json is damaged or foreign"),
    ("args.json", '{"model": "nfnet_zoo_tiny", "data_dir": "d", "model_args": {"checkpoint_path": "/etc/passwd"}}',
     "model_args do not build nfnet_zoo_tiny (checkpoint_path name weights to load"),
    ("args.json", '{"model": "nfnet_zoo_tiny", "data_dir": "d", "model_args": {"pretrained": true}}',
     "model_args do not build nfnet_zoo_tiny"),
    ("data.json", '{"root": "x", "kind": "fol', "data.json is damaged or foreign"),
    ("data.json", '{"root": "x"}', "data.json is damaged or foreign"),
    ("data.json", None, "data.json is missing"),
])
def test_damaged_run_files_are_one_line(run_copy, name, content, words, capsys):
    path = run_copy / name
    if content is None:
        path.unlink()
    else:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    line = _refused_in_process(["finetune", "--resume", run_copy, "--epochs", "2"], capsys)
    assert words in line and ("restore" in line or "start a new run" in line), line


def test_a_run_killed_before_its_first_state_is_restarted_by_the_same_command(run_copy, capsys):
    """A kill between the first export and the first state save (or while data.json was written) leaves exports
    and temporary files but no state/: --resume says "start it again", and the same command does."""
    import json
    import shutil
    from nfnet_zoo_cli import main
    shutil.rmtree(run_copy / "state")
    for name in ("summary.json", "README.md"):  # written only after the last state save
        (run_copy / name).unlink()
    (run_copy / ".data.json.4242.tmp").write_text('{"root": ')  # what a kill while writing data.json leaves
    line = _refused_in_process(["finetune", "--resume", run_copy], capsys)
    assert "start it again with the same command" in line
    data = json.loads((run_copy / "args.json").read_text())["data_dir"]
    assert main(["finetune", *TINY_RUN, "--epochs", "1", "--data-dir", data, "--output", str(run_copy)]) == 0
    assert (run_copy / "state" / "manifest.json").is_file()
    (run_copy / "mine.txt").write_text("a user's file")  # anything else in the folder: refused, never replaced
    shutil.rmtree(run_copy / "state")
    line = _refused_in_process(["finetune", *TINY_RUN, "--data-dir", data, "--output", run_copy], capsys)
    assert "exists and is not empty" in line


@pytest.mark.parametrize("damage, command", [(d, c) for d in ("truncated weights", "non-JSON config",
                                                                "config of another model")
                                             for c in ("evaluate", "predict", "finetune --checkpoint")
                                             if (d, c) != ("config of another model", "finetune --checkpoint")])
def test_damaged_model_folders_are_one_line(saved_run, tmp_path, damage, command, capsys):
    import json
    import shutil
    model = Path(shutil.copytree(saved_run, tmp_path / "model", ignore=shutil.ignore_patterns("state")))
    if damage == "truncated weights":
        w = model / "model.safetensors"
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    elif damage == "non-JSON config":
        (model / "config.json").write_text("<html>not json</html>")
    else:
        cfg = json.loads((model / "config.json").read_text())
        cfg["nfnet_zoo"] = {"architecture": "nfnet_f0", "model_args": {}}  # the exact architecture nfnet-zoo builds
        (model / "config.json").write_text(json.dumps(cfg))
    data = json.loads((saved_run / "args.json").read_text())["data_dir"]
    image = next(Path(data).rglob("*.png"))
    args = {"evaluate": ["evaluate", model, "--data-dir", data, "-j", "0"], "predict": ["predict", model, image],
            "finetune --checkpoint": ["finetune", "--checkpoint", model, "--data-dir", data, "--output",
                                      tmp_path / "ft", "-j", "0", "--img-size", "32"]}[command]
    line = _refused_in_process(args, capsys)
    assert line.startswith(f"nfnet-zoo {command.split()[0]}: error: ") and str(model) in line, line
    if damage != "config of another model":  # (finetune --checkpoint takes the classes from the data)
        assert ("model.safetensors" if damage == "truncated weights" else "config.json") in line
    assert not (tmp_path / "ft").exists()


# --- the machine: read-only or full disk -> one line, exit 1, before training, the earlier state kept ---------------
def _resume(run: Path, capsys) -> tuple[int, list]:
    from nfnet_zoo_cli import main
    code = main(["finetune", "--resume", str(run), "--epochs", "2"])
    return code, capsys.readouterr().err.strip().splitlines()


def test_resume_on_a_read_only_disk_stops_before_training(run_copy, monkeypatch, capsys):
    import errno
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):  # what the kernel answers on a read-only mount
        if str(path).startswith(str(run_copy)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)
    monkeypatch.setattr(os, "open", read_only)
    before = snapshot(run_copy)
    code, err = _resume(run_copy, capsys)
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("nfnet-zoo finetune: error: read-only file system") and "resuming" not in err[0]
    assert snapshot(run_copy) == before


def test_a_disk_too_full_for_the_state_stops_before_training(run_copy, monkeypatch, capsys):
    import shutil
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 ** 12, 10 ** 12, 4096))
    before = snapshot(run_copy)
    code, err = _resume(run_copy, capsys)
    assert code == 1 and len(err) == 1 and "disk full" in err[0] and "MiB are free" in err[0], err
    assert snapshot(run_copy) == before


def test_disk_full_while_saving_keeps_the_earlier_state(run_copy, monkeypatch, capsys):
    import errno
    import safetensors.torch
    real = safetensors.torch.save_file

    def full(tensors, filename, *args, **kwargs):
        if "state.tmp" in str(filename):
            real(tensors, filename, *args, **kwargs)
            with open(filename, "r+b") as f:  # what a full disk leaves: part of the file, then ENOSPC
                f.truncate(os.path.getsize(filename) // 2)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
        return real(tensors, filename, *args, **kwargs)
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    state = snapshot(run_copy / "state")
    code, err = _resume(run_copy, capsys)
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("nfnet-zoo finetune: error: disk full (") and "state" in err[0] and "kept" in err[0]
    assert snapshot(run_copy / "state") == state
    monkeypatch.setattr(safetensors.torch, "save_file", real)  # space freed: the same resume completes
    code, err = _resume(run_copy, capsys)
    assert code == 0, err
    assert len((run_copy / "metrics.jsonl").read_text().splitlines()) == 2


def test_a_fault_of_the_machine_is_one_line_exit_1_in_every_command(tmp_path):
    """cli.main turns any OSError into one line (exit 1): here `cards --out` under a file, which cannot be a folder."""
    (tmp_path / "file").write_text("a user's file")
    r = run_cli(["cards", "--out", tmp_path / "file" / "sub"], tmp_path)
    line = one_line_error(r, "cards", code=1)
    assert "file" in line and "Not a directory" in line
    assert (tmp_path / "file").read_text() == "a user's file"


def test_convert_replaces_only_the_files_it_wrote(tmp_path):
    from nfnet_zoo import NFNetZooError
    from nfnet_zoo.models.convert import convert_haiku_checkpoint
    tiny = Path(__file__).parent / "data" / "deepmind" / "tiny_d1_haiku.npz"
    out = convert_haiku_checkpoint(tiny, tmp_path / "out")
    convert_haiku_checkpoint(tiny, out)  # its own files: converted again in place
    (out / "config.json").write_text('{"architecture": "mine"}')  # the user edits one
    with pytest.raises(NFNetZooError, match="already holds config.json, which convert did not write"):
        convert_haiku_checkpoint(tiny, out)
    assert (out / "config.json").read_text() == '{"architecture": "mine"}'
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "model.safetensors").write_bytes(b"a user's model")
    r = run_cli(["convert", tiny, "--out", theirs], tmp_path)
    assert "already holds model.safetensors" in one_line_error(r, "convert")
    assert (theirs / "model.safetensors").read_bytes() == b"a user's model" and not (theirs / "config.json").exists()


# --- misleading runs: refused or said in one line ----------------------------------------------------
def test_fp16_on_the_cpu_is_refused_not_trained_in_float32(tmp_path, capsys):
    from _images import make_folder
    data = make_folder(tmp_path / "data", n_train=4, n_val=1)
    line = _refused_in_process(["finetune", *TINY_RUN, "--data-dir", data, "--output", tmp_path / "o",
                                "--mixed-precision", "fp16", "--cpu"], capsys)
    assert "--mixed-precision fp16 needs a GPU" in line and "bf16" in line
    assert not (tmp_path / "o").exists()


def test_accelerate_launch_cpu_says_it_starts_one_process(tmp_path, monkeypatch):
    from nfnet_zoo.training.finetune import _accelerator
    from nfnet_zoo.training.recipe import FinetuneConfig
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")  # what `accelerate launch --cpu ...` sets
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.warns(UserWarning, match="accelerate launch --cpu` starts only one.*torchrun"):
        _accelerator(FinetuneConfig(cpu=True), tmp_path)


# --- issue 21: a run folder has one owner, and finetune never writes through a link out of it ------------------
@pytest.fixture
def lock_holder(tmp_path):
    """Start a process that holds RUN's lock, as a running finetune does; yields (start(run) -> pid)."""
    procs = []

    def start(run: Path) -> int:
        code = ("import sys, time; from nfnet_zoo.training.runlock import RunLock; assert RunLock(sys.argv[1]).acquire() is "
                "None; print('held', flush=True); time.sleep(600)")
        p = subprocess.Popen([sys.executable, "-c", code, str(run)], env=_env(tmp_path), stdout=subprocess.PIPE,
                             text=True)
        procs.append(p)
        assert p.stdout.readline() == "held\n"
        return p.pid
    yield start
    for p in procs:
        p.kill()
        p.wait()


def test_a_second_finetune_on_a_folder_in_use_is_refused(run_copy, lock_holder, tmp_path):
    import json
    out = tmp_path / "new"
    out.mkdir()
    pid = lock_holder(out)  # a run that has just started there (only its lock file so far)
    data = json.loads((run_copy / "args.json").read_text())["data_dir"]
    line = one_line_error(run_cli(["finetune", *TINY_RUN, "--epochs", "1", "--data-dir", data, "--output", out],
                                  tmp_path), "finetune")
    assert f"{out} is in use by another nfnet-zoo finetune (pid {pid} on " in line and "another --output" in line
    assert [p.name for p in out.iterdir()] == [".nfnet-zoo.lock"]
    pid = lock_holder(run_copy)  # a run being resumed, or still training
    before = snapshot(run_copy)
    line = one_line_error(run_cli(["finetune", "--resume", run_copy], tmp_path), "finetune")
    assert f"in use by another nfnet-zoo finetune (pid {pid} on " in line
    assert snapshot(run_copy) == before


def test_a_killed_run_leaves_no_lock_behind(tmp_path):
    from nfnet_zoo.training.runlock import RunLock
    code = "import sys, time; from nfnet_zoo.training.runlock import RunLock; RunLock(sys.argv[1]).acquire(); time.sleep(600)"
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=_env(tmp_path))
    while not (tmp_path / ".nfnet-zoo.lock").exists() or not (tmp_path / ".nfnet-zoo.lock").read_text():
        assert p.poll() is None
    assert RunLock(tmp_path).acquire() is not None
    p.kill()  # SIGKILL: no chance to clean up
    p.wait()
    lock = RunLock(tmp_path)
    assert lock.acquire() is None and f"pid {os.getpid()} " in (tmp_path / ".nfnet-zoo.lock").read_text()
    lock.release()


def test_a_planted_lock_link_or_a_filesystem_without_locks(tmp_path, monkeypatch):
    import errno
    import fcntl
    from nfnet_zoo import NFNetZooError
    from nfnet_zoo.training.runlock import RunLock
    (tmp_path / "target").write_text("a user's file")
    os.symlink(tmp_path / "target", tmp_path / ".nfnet-zoo.lock")
    with pytest.raises(NFNetZooError, match="nfnet-zoo.lock is a link; remove it"):
        RunLock(tmp_path).acquire()
    assert (tmp_path / "target").read_text() == "a user's file"
    (tmp_path / ".nfnet-zoo.lock").unlink()

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(fcntl, "flock", no_locks)  # as on some NFS mounts
    with pytest.warns(UserWarning, match="has no locks: a second finetune on it would not be stopped"):
        assert RunLock(tmp_path).acquire() is None


@pytest.mark.parametrize("name", ["last", "state"])
def test_resume_never_writes_through_a_linked_folder(run_copy, tmp_path, name):
    import shutil
    elsewhere = Path(shutil.move(run_copy / name, tmp_path / "elsewhere"))  # e.g. a folder of another run
    os.symlink(elsewhere, run_copy / name)
    before, run_before = snapshot(elsewhere), snapshot(run_copy)
    line = one_line_error(run_cli(["finetune", "--resume", run_copy, "--epochs", "2"], tmp_path), "finetune")
    assert f"{run_copy / name} is a link (to {elsewhere})" in line and "remove the link" in line
    assert snapshot(elsewhere) == before and snapshot(run_copy) == run_before


# --- issue 21: --resume continues what the run recorded ----------------------------------------------------------
def test_resume_with_more_epochs_continues_timms_schedule_for_the_new_length(run_copy, tmp_path):
    """It used to keep the saved schedule's length: the extra epochs trained at lr 0, weights byte-identical."""
    import json
    import torch
    from safetensors.torch import load_file
    from timm.scheduler import create_scheduler_v2
    before = load_file(run_copy / "last" / "model.safetensors")
    r = run_cli(["finetune", "--resume", run_copy, "--epochs", "3"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "--epochs 3: the cosine schedule saved for another length is rebuilt to end at epoch 3 (9 updates) and " \
           "continues from update 3" in r.stdout
    rows = [json.loads(line) for line in (run_copy / "metrics.jsonl").read_text().splitlines()]
    # the reference: timm's schedule as a 3-epoch run builds it (24 images, batch 8: 3 updates per epoch)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05)
    sched, _ = create_scheduler_v2(opt, sched="cosine", num_epochs=3, warmup_epochs=1, warmup_lr=0.0, min_lr=0.0,
                                   step_on_epochs=False, updates_per_epoch=3)
    for row in rows[1:]:
        sched.step_update(3 * row["epoch"])
        assert row["lr"] == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=0), row
    assert [row["epoch"] for row in rows] == [1, 2, 3] and rows[1]["lr"] > 0.01
    after = load_file(run_copy / "last" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before), "the extra epochs did not train"
    assert json.loads((run_copy / "args.json").read_text())["epochs"] == 3  # what a later --resume reads
    line = one_line_error(run_cli(["finetune", "--resume", run_copy, "--epochs", "2"], tmp_path), "finetune")
    assert "has trained 3 epochs, more than --epochs 2; pass --epochs 4 or more" in line


def test_resume_rebuilds_the_model_the_run_recorded_not_the_checkpoints_current_config(saved_run, tmp_path):
    import json
    import shutil
    checkpoint = Path(shutil.copytree(saved_run, tmp_path / "ck", ignore=shutil.ignore_patterns("state")))
    data = json.loads((saved_run / "args.json").read_text())["data_dir"]
    out = tmp_path / "run"
    r = run_cli(["finetune", "--checkpoint", checkpoint, "--data-dir", data, "--output", out, "--epochs", "1",
                 *TINY_RUN[2:6], "-j", "0", "--save-every", "0"], tmp_path)
    assert r.returncode == 0, r.stderr
    built = json.loads((out / "config.json").read_text())["model_args"]
    config = json.loads((checkpoint / "config.json").read_text())
    config["model_args"]["activation"] = "relu"  # changed in the --checkpoint folder since the run started
    (checkpoint / "config.json").write_text(json.dumps(config))
    r = run_cli(["finetune", "--resume", out, "--epochs", "2"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "last" / "config.json").read_text())["model_args"] == built
    shutil.rmtree(checkpoint)  # gone altogether: the run's state holds the weights
    r = run_cli(["finetune", "--resume", out, "--epochs", "3"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "last" / "config.json").read_text())["model_args"] == built


# --- issue 21: messages that were tracebacks --------------------------------------------------------------------
def test_an_unreadable_image_met_in_a_dataloader_worker_is_one_line(tmp_path):
    """It printed torch's 15 lines of "Caught NFNetZooError in DataLoader worker ... Original Traceback"."""
    from _images import make_folder
    data = make_folder(tmp_path / "data", n_train=8, n_val=0, split=False)
    (data / "dark" / "000.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")  # unseen: --check-images none
    r = run_cli(["finetune", *TINY_RUN, "--data-dir", data, "--output", tmp_path / "o", "-j", "1", "--check-images",
                 "none"], tmp_path)
    line = one_line_error(r, "finetune")
    assert "cannot read image dark/000.png" in line and "remove it and start again" in line


def test_a_terminal_that_cannot_show_a_class_name_gets_escapes_not_a_traceback(run_copy, tmp_path):
    """predict printed a UnicodeEncodeError traceback for a class named cafe with an accent on an ASCII terminal."""
    import json
    config = json.loads((run_copy / "config.json").read_text())
    config["label_names"] = ["caf\u00e9", "\u732b", "mid"]  # what a run on such class folders writes
    (run_copy / "config.json").write_text(json.dumps(config))
    image = next(Path(json.loads((run_copy / "args.json").read_text())["data_dir"]).rglob("*.png"))
    env = dict(_env(tmp_path), PYTHONIOENCODING="ascii")  # or a latin-1 terminal and a class named in Greek
    r = subprocess.run([*CLI, "predict", str(run_copy), str(image)], capture_output=True, env=env, timeout=240,
                       cwd=tmp_path)
    assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr.decode(errors="replace")[-2000:]
    assert b"caf\\xe9" in r.stdout and b"\\u732b" in r.stdout, r.stdout


def test_a_resumed_args_json_that_asks_for_another_network_is_refused_before_it_is_built(run_copy, capsys):
    """A received run folder's args.json with huge widths would allocate gigabytes before the state's check."""
    import json
    args = json.loads((run_copy / "args.json").read_text())
    args["model_args"] = {**args["model_args"], "widths": [65536] * 4}  # about 80 GB of weights
    (run_copy / "args.json").write_text(json.dumps(args))
    line = _refused_in_process(["finetune", "--resume", run_copy], capsys)
    assert "args.json's model_args build a nfnet_zoo_tiny of " in line and "its saved state holds" in line, line
