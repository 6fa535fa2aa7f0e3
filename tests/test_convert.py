"""The converter: safe reading of DeepMind checkpoints, shape inference, layouts, the CLI."""
import json
import os
import pickle
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import nfnet_zoo  # noqa: F401
from nfnet_zoo import NFNetZooError
from nfnet_zoo.models.convert import (convert_haiku_checkpoint, haiku_to_timm, infer_architecture,
                               load_haiku_checkpoint, timm_keys, to_torch_layout)

DATA = Path(__file__).parent / "data" / "deepmind"
TINY = DATA / "tiny_d1_haiku.npz"
CLI = [sys.executable, "-m", "nfnet_zoo_cli"]


def _manifest():
    return json.loads((DATA / "tiny_d1_params_manifest.json").read_text())


def test_reads_the_dill_file_as_deepmind_wrote_it():
    params = load_haiku_checkpoint(TINY)
    flat = np.load(DATA / "tiny_d1_params.npz")  # the same parameters as a plain npz, written by DeepMind's side
    entries = _manifest()
    assert sum(len(p) for p in params.values()) == len(entries)
    for e in entries:
        assert params[e["haiku_module"]][e["param"]].shape == tuple(e["shape"])
    for e in entries:
        np.testing.assert_array_equal(params[e["haiku_module"]][e["param"]], flat[e["flat_key"]])


def test_numpy2_plain_pickle_and_haiku_flatmapping(tmp_path, monkeypatch):
    params = load_haiku_checkpoint(TINY)
    # numpy 2 writes numpy._core.multiarray paths and plain pickle writes no dill wrapper.
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps(params, protocol=4))
    assert b"numpy._core.multiarray" in plain.read_bytes()
    again = load_haiku_checkpoint(plain)
    assert all(np.array_equal(again[m][p], params[m][p]) for m in params for p in params[m])

    # 2021 checkpoints may hold Haiku's FlatMapping; build one under its real module path.
    mod = types.ModuleType("haiku._src.data_structures")

    class FlatMapping(dict):
        def __reduce__(self):
            return FlatMapping, (dict(self),)

    FlatMapping.__module__, FlatMapping.__qualname__ = mod.__name__, "FlatMapping"
    mod.FlatMapping = FlatMapping
    for name in ("haiku", "haiku._src"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    flat = tmp_path / "flatmapping.pkl"
    flat.write_bytes(pickle.dumps(FlatMapping({m: FlatMapping(p) for m, p in params.items()})))
    assert b"haiku._src.data_structures" in flat.read_bytes()
    for name in ("haiku", "haiku._src", mod.__name__):
        monkeypatch.delitem(sys.modules, name)  # the reader must not need Haiku
    got = load_haiku_checkpoint(flat)
    assert set(got) == set(params)


class _Attack:
    def __reduce__(self):
        return os.system, ("echo pwned > /dev/null",)


@pytest.mark.parametrize("payload, words", [
    (lambda: pickle.dumps({"NFNet/~/nf_block": {"w": _Attack()}}), "refusing to load"),
    (lambda: pickle.dumps({"weights": [1, 2, 3]}), "not a DeepMind NFNet checkpoint"),
    (lambda: TINY.read_bytes()[: len(TINY.read_bytes()) // 2], "truncated or corrupt"),
    (lambda: b"", "truncated or corrupt"),
])
def test_bad_files_are_refused_with_one_line(tmp_path, payload, words):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(payload())
    with pytest.raises(NFNetZooError, match=words) as e:
        load_haiku_checkpoint(bad)
    assert "\n" not in str(e.value)


def test_torch_checkpoint_is_a_foreign_file(tmp_path):
    bad = tmp_path / "model.pth"
    torch.save({"w": torch.ones(2)}, bad)  # a zip archive, not an npz of arrays
    with pytest.raises(NFNetZooError, match="not a DeepMind NFNet checkpoint"):
        load_haiku_checkpoint(bad)


def test_full_size_f0_maps_one_to_one():
    """The 233 tensors of the official F0 land on our nfnet_f0 with the converted shapes."""
    entries = json.loads((DATA / "f0_param_shapes.json").read_text())
    assert len(entries) == 233
    params = {}
    for module, name, shape in entries:
        params.setdefault(module, {})[name] = np.empty(shape, dtype=np.float32)
    variant, model_args = infer_architecture(params)
    assert (variant, model_args) == ("nfnet_f0", {"num_classes": 1000})
    keys = timm_keys(params)
    with torch.device("meta"):
        ours = timm.create_model("nfnet_f0").state_dict()
        theirs = timm.create_model("dm_nfnet_f0").state_dict()
    assert sorted(keys.values()) == sorted(ours) == sorted(theirs)
    for (m, p), key in keys.items():
        assert tuple(to_torch_layout(params[m][p], key).shape) == tuple(ours[key].shape), key
    assert sum(int(np.prod(s)) for _, _, s in entries) == 71_489_284


def test_custom_shapes_are_described_by_model_args(tmp_path):
    variant, model_args, state = haiku_to_timm(load_haiku_checkpoint(TINY))
    assert variant == "nfnet_f0"
    assert model_args["depths"] == (1, 1, 1, 1) and model_args["widths"] == (32, 64, 96, 128)
    assert model_args["group_width"] == 8 and model_args["num_classes"] == 10
    out = convert_haiku_checkpoint(TINY, tmp_path / "out")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_args"]["widths"] == [32, 64, 96, 128]
    assert "notes" not in cfg["pretrained_cfg"]  # no claim to be DeepMind's F0 weights
    model = timm.create_model(f"local-dir:{out}", pretrained=True)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)


def test_cli_convert_and_one_line_errors(tmp_path):
    ok = subprocess.run([*CLI, "convert", str(TINY), "--out", str(tmp_path / "out")],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()
    bad = tmp_path / "attack.npz"
    bad.write_bytes(pickle.dumps({"x": _Attack()}))
    r = subprocess.run([*CLI, "convert", str(bad), "--out", str(tmp_path / "o2")], capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "refusing to load" in r.stderr
    assert not (tmp_path / "o2" / "model.safetensors").exists()
    r = subprocess.run([*CLI, "convert", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "o3")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no such file" in r.stderr and "Traceback" not in r.stderr
