"""Conversion of DeepMind's released NFNet checkpoints (`F0_haiku.npz` ... `F6_haiku.npz`).

Despite the name, a released checkpoint is a dill pickle of `{haiku_module: {param: ndarray}}`.
Unpickling runs code chosen by the file, so `load_haiku_checkpoint` uses an allow-listing unpickler
that builds only numpy arrays and (Haiku) mappings. The architecture is then read off the shapes,
the layouts are converted (HWIO -> OIHW, (in, out) -> (out, in)), and the result is written as a
timm model folder (config.json in the shared form of shared_config.py) that `nfnet_zoo.load_model(DIR)`
and `timm.create_model("local-dir:DIR", pretrained=True)` rebuild.
"""
from __future__ import annotations

import io
import json
import math
import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from ..files import write_json_atomic
from ..files import sha256
from ..errors import NFNetZooError
from .variants import VARIANTS

HaikuParams = dict[str, dict[str, np.ndarray]]


# --- safe reading --------------------------------------------------------------------------
class _HaikuMapping(dict):
    """Stand-in for Haiku's FlatMapping/FlatMap: a plain dict, whatever way it was pickled."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__()
        if args and not isinstance(args[0], (dict, list, tuple)):
            raise pickle.UnpicklingError("unexpected Haiku mapping contents")
        self.update(*args, **kwargs)

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and state[1] is None:
            state = state[0]
        if isinstance(state, dict):
            inner = [v for v in state.values() if isinstance(v, dict)]
            self.update(inner[0] if len(state) == 1 and inner else state)


# numpy's pickles build arrays from raw bytes: with an object dtype (or a structured one holding objects)
# those bytes become pointers numpy dereferences. So numpy's names map to the stand-ins below, which
# build nothing until the dtype is known to be a plain number and the bytes fit the shape exactly.
_NUMERIC_KINDS = "biufc"  # bool, signed, unsigned, float, complex


class _Dtype:
    """Stand-in for numpy.dtype(spec, align, copy) + its __setstate__: plain numeric dtypes only."""

    def __init__(self, spec: Any, align: Any = False, copy: Any = False):
        if not isinstance(spec, str):
            raise pickle.UnpicklingError(f"refusing dtype {spec!r:.40}: only plain numeric dtypes")
        try:
            self.dtype = np.dtype(spec)
        except (TypeError, ValueError):
            raise pickle.UnpicklingError(f"refusing dtype {spec!r:.40}: not a numpy dtype") from None
        if self.dtype.kind not in _NUMERIC_KINDS or self.dtype.fields is not None or self.dtype.subdtype:
            raise pickle.UnpicklingError(f"refusing dtype {self.dtype}: only plain numeric dtypes (no objects, "
                                         "records or raw bytes)")

    def __setstate__(self, state: Any) -> None:
        # numpy writes (version, byteorder, subarray, names, fields, elsize, alignment, flags)
        if (not isinstance(state, tuple) or len(state) not in (8, 9) or state[1] not in ("<", ">", "|", "=")
                or any(x is not None for x in state[2:5])):
            raise pickle.UnpicklingError("refusing a dtype state with fields or subarrays: only plain numeric dtypes")
        self.dtype = self.dtype.newbyteorder(state[1]) if state[1] in "<>" else self.dtype


def _checked_dtype(d: Any) -> np.dtype:
    if not isinstance(d, _Dtype):
        raise pickle.UnpicklingError("refusing an array without a numpy dtype")
    return d.dtype


class _Array:
    """Stand-in for numpy's ndarray reconstruction (`_reconstruct` then `__setstate__`): builds a copy
    of plain numeric data whose byte count is exactly shape x itemsize."""

    array: Optional[np.ndarray] = None

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) != 5:
            raise pickle.UnpicklingError("unexpected numpy array state")
        _, shape, dtype, fortran, raw = state
        dtype = _checked_dtype(dtype)
        if (not isinstance(shape, tuple) or len(shape) > 32
                or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
            raise pickle.UnpicklingError(f"refusing array shape {shape!r:.60}")
        if not isinstance(raw, (bytes, bytearray)):
            raise pickle.UnpicklingError("refusing array data that is not raw bytes")
        if len(raw) != math.prod(shape) * dtype.itemsize:
            raise pickle.UnpicklingError(f"array data of {len(raw)} bytes does not fit shape {shape} of {dtype}")
        self.array = np.frombuffer(raw, dtype).reshape(shape, order="F" if fortran else "C").copy()


class _NdarrayName:
    """numpy.ndarray may only appear as _reconstruct's first argument: calling it maps raw memory."""

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        raise pickle.UnpicklingError("refusing to call numpy.ndarray on raw data")


_NDARRAY = _NdarrayName()


def _reconstruct(*args: Any) -> _Array:
    # numpy's own ndarray reconstructor, but only for plain ndarrays.
    if len(args) != 3 or args[0] is not _NDARRAY:
        raise pickle.UnpicklingError("only plain numpy arrays may be reconstructed")
    return _Array()


def _create_array(f: Any, args: tuple, state: tuple, npdict: Any = None) -> _Array:
    # dill's wrapper around numpy's reconstructor (dill._dill._create_array), minus arbitrary `f`.
    if f is not _reconstruct or npdict:
        raise pickle.UnpicklingError("unexpected dill array wrapper")
    array = f(*args)
    array.__setstate__(state)
    return array


def _scalar(dtype: Any, data: Any = b"") -> Any:
    dtype = _checked_dtype(dtype)
    if not data:
        return dtype.type()
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise pickle.UnpicklingError(f"refusing a {dtype} scalar of {len(data)} bytes")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _arrays(params: Any) -> Any:
    """The unpickled {module: {param: _Array}} with each stand-in replaced by its numpy array."""
    if not isinstance(params, dict):
        return params
    out = {}
    for m, p in params.items():
        if isinstance(p, dict):
            p = {k: (v.array if isinstance(v, _Array) else v) for k, v in p.items()}
            if any(v is None for v in p.values()):
                raise pickle.UnpicklingError("an array without its data")
        out[m] = p
    return out


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,   # files written with numpy 1.x
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # files written with numpy 2.x
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _Dtype,
    ("dill._dill", "_create_array"): _create_array,
    ("collections", "OrderedDict"): dict,
    ("builtins", "dict"): dict,
    ("haiku._src.data_structures", "FlatMapping"): _HaikuMapping,
    ("haiku._src.data_structures", "FlatMap"): _HaikuMapping,
    ("haiku.data_structures", "FlatMapping"): _HaikuMapping,
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def _from_flat_npz(path: Path) -> HaikuParams:
    # A plain npz with flat keys such as "NFNet.nf_block_1.conv1.w" (no pickles allowed).
    params: HaikuParams = {}
    with np.load(path, allow_pickle=False) as z:
        for key in z.files:
            *module, name = key.split(".")
            params.setdefault("/~/".join(module), {})[name] = z[key]
    return params


def load_haiku_checkpoint(path: Union[str, os.PathLike]) -> HaikuParams:
    """Read a DeepMind NFNet checkpoint without executing code from it.

    Accepts the released dill/pickle files (numpy 1.x or 2.x module paths, plain dicts or Haiku
    FlatMapping) and plain `.npz` archives with flat dotted keys. Anything else is refused with an
    `NFNetZooError`.
    """
    path = Path(path)
    if not path.is_file():
        raise NFNetZooError(f"{path}: no such file; pass the path of a DeepMind checkpoint such as F0_haiku.npz")
    if zipfile.is_zipfile(path):
        try:
            params = _from_flat_npz(path)
        except (ValueError, OSError, zipfile.BadZipFile) as e:
            raise NFNetZooError(f"{path}: not a DeepMind NFNet checkpoint ({e}); pass an official *_haiku.npz")
    else:
        try:
            with path.open("rb") as f:
                params = _arrays(_SafeUnpickler(io.BufferedReader(f)).load())
        except pickle.UnpicklingError as e:
            if "refusing" not in str(e):
                raise NFNetZooError(f"{path}: truncated or corrupt checkpoint ({e}); download the file again") from None
            raise NFNetZooError(f"{path}: unsafe or foreign pickle ({e}); only official DeepMind NFNet "
                                "checkpoints (numpy arrays in dicts) can be converted") from None
        except (EOFError, ValueError, TypeError, IndexError, AttributeError, KeyError, RecursionError,
                MemoryError, OverflowError) as e:
            raise NFNetZooError(f"{path}: truncated or corrupt checkpoint ({type(e).__name__}); "
                                "download the file again") from None
    _check_structure(path, params)
    return {m: dict(p) for m, p in params.items()}


def _check_structure(path: Path, params: Any) -> None:
    ok = (isinstance(params, dict) and params
          and all(isinstance(m, str) and isinstance(p, dict) and
                  all(isinstance(k, str) and isinstance(v, (np.ndarray, np.generic)) for k, v in p.items())
                  for m, p in params.items()))
    if not ok or not any("nf_block" in m for m in params):
        raise NFNetZooError(f"{path}: not a DeepMind NFNet checkpoint (expected {{haiku_module: {{param: "
                            "array}}}} with nf_block modules); pass an official *_haiku.npz")


# --- architecture from shapes --------------------------------------------------------------
_BLOCK = re.compile(r"^NFNet/~/nf_block(?:_(\d+))?$")


def _blocks(params: HaikuParams) -> list[str]:
    found = {}
    for m in params:
        match = _BLOCK.match(m)
        if match:
            found[int(match.group(1) or 0)] = m
    if sorted(found) != list(range(len(found))):
        raise NFNetZooError("checkpoint has gaps in its nf_block numbering; it is not a complete NFNet")
    return [found[i] for i in range(len(found))]


def _get(params: HaikuParams, module: str, name: str) -> np.ndarray:
    try:
        return params[module][name]
    except KeyError:
        raise NFNetZooError(f"checkpoint lacks {module}/{name}; it is not a complete NFNet checkpoint") from None


def infer_architecture(params: HaikuParams, activation: str = "gelu", alpha: float = 0.2) -> tuple[str, dict]:
    """Read an NFNet's architecture off its tensor shapes.

    Returns `(variant, model_args)`: the registered variant the shapes match (model_args then holds
    only `num_classes`), or `nfnet_f0` with every architecture field spelled out. `activation` and
    `alpha` cannot be seen in shapes and are taken as given.
    """
    blocks = _blocks(params)
    depths, widths, group_widths, mids, two_convs = [], [], [], [], set()
    for b in blocks:
        conv0, conv1 = _get(params, f"{b}/~/conv0", "w"), _get(params, f"{b}/~/conv1", "w")
        out = _get(params, f"{b}/~/conv2", "w").shape[-1]
        if f"{b}/~/conv_shortcut" in params or not depths:  # a projection shortcut opens a stage
            depths.append(0)
            widths.append(out)
            group_widths.append(conv1.shape[2])
        depths[-1] += 1
        mids.append((conv0.shape[-1], out, len(depths) - 1))
        two_convs.add(f"{b}/~/conv1b" in params)
    if len(two_convs) != 1:
        raise NFNetZooError("checkpoint mixes blocks with and without conv1b; not an NFNet this tool knows")
    se_w = _get(params, f"{blocks[0]}/~/squeeze_excite/~/linear", "w")
    se_ratio = se_w.shape[1] / se_w.shape[0]
    # Expansion: mid = group_width * (int(out * e) // group_width); take the paper's 0.5 if it fits.
    expansion = 0.5
    for mid, out, s in mids:
        if group_widths[s] * (int(out * expansion) // group_widths[s]) != mid:
            expansion = mids[0][0] / mids[0][1]
            break
    stem = [int(_get(params, f"NFNet/~/stem_conv{i}", "w").shape[-1]) for i in range(4)]
    if stem[-1] != widths[0] // 2:
        raise NFNetZooError(f"stem width {stem[-1]} is not half the first stage width {widths[0]}; "
                            "not an NFNet this tool knows")
    final = _get(params, "NFNet/~/final_conv", "w").shape[-1]
    num_classes = int(_get(params, "NFNet/~/linear", "w").shape[-1])
    gw = tuple(int(g) for g in group_widths)
    arch = dict(
        depths=tuple(depths), widths=tuple(int(w) for w in widths),
        group_width=gw[0] if len(set(gw)) == 1 else gw, expansion=expansion, se_ratio=se_ratio,
        alpha=alpha, activation=activation, stem_widths=tuple(stem[:3]),
        final_conv_mult=final / widths[-1], use_two_convs=two_convs.pop(),
    )
    for name, cfg in VARIANTS.items():
        if name.startswith("nfnet_f") and all(getattr(cfg, k) == v for k, v in arch.items()):
            return name, {"num_classes": num_classes}
    return "nfnet_f0", {**arch, "num_classes": num_classes}


# --- layouts and names ---------------------------------------------------------------------
_CONV_NAMES = {"conv0": "conv1", "conv1": "conv2", "conv1b": "conv2b", "conv2": "conv3",
               "conv_shortcut": "downsample.conv"}
_PARAM_NAMES = {"w": "weight", "b": "bias", "bias": "bias", "gain": "gain", "skip_gain": "skipinit_gain"}


def timm_keys(params: HaikuParams) -> dict[tuple[str, str], str]:
    """Map every `(haiku_module, param)` of a checkpoint to our (= timm's dm_nfnet) state-dict key."""
    where, s, b = {}, -1, 0
    for blk in _blocks(params):
        if f"{blk}/~/conv_shortcut" in params or s < 0:
            s, b = s + 1, 0
        where[blk] = f"stages.{s}.{b}"
        b += 1
    keys = {}
    for module, tensors in params.items():
        parts = module.split("/~/")
        if parts[0] != "NFNet" or len(parts) < 2:
            raise NFNetZooError(f"unexpected module {module!r}; not a DeepMind NFNet checkpoint")
        head = parts[1]
        if head.startswith("stem_conv"):
            prefix = f"stem.conv{int(head[len('stem_conv'):]) + 1}"
        elif head == "final_conv":
            prefix = "final_conv"
        elif head == "linear":
            prefix = "head.fc"
        elif f"NFNet/~/{head}" in where:
            prefix = where[f"NFNet/~/{head}"]
            rest = parts[2:]
            if rest == ["squeeze_excite", "linear"]:
                prefix += ".attn_last.fc1"
            elif rest == ["squeeze_excite", "linear_1"]:
                prefix += ".attn_last.fc2"
            elif len(rest) == 1 and rest[0] in _CONV_NAMES:
                prefix += "." + _CONV_NAMES[rest[0]]
            elif rest:
                raise NFNetZooError(f"unexpected module {module!r} in checkpoint")
        else:
            raise NFNetZooError(f"unexpected module {module!r} in checkpoint")
        for name in tensors:
            if name not in _PARAM_NAMES:
                raise NFNetZooError(f"unexpected parameter {module}/{name} in checkpoint")
            keys[(module, name)] = f"{prefix}.{_PARAM_NAMES[name]}"
    return keys


def to_torch_layout(array: np.ndarray, key: str) -> torch.Tensor:
    """Haiku layout -> PyTorch layout for the tensor that lands at `key`."""
    t = torch.tensor(np.asarray(array, dtype=np.float32))  # a copy; keeps 0-d skip gains 0-d
    if key.endswith(".weight") and t.ndim == 4:       # conv HWIO -> OIHW
        t = t.permute(3, 2, 0, 1)
    elif key.endswith(".weight") and t.ndim == 2:     # linear (in, out) -> (out, in)
        t = t.t()
        if ".attn_last." in key:                      # SE linears are 1x1 convs in timm
            t = t[:, :, None, None]
    elif key.endswith(".gain"):
        t = t.reshape(-1, 1, 1, 1)
    return t.contiguous()


def haiku_to_timm(params: HaikuParams, activation: str = "gelu",
                  alpha: float = 0.2) -> tuple[str, dict, dict[str, torch.Tensor]]:
    """Convert checkpoint parameters: returns `(variant, model_args, state_dict)`."""
    variant, model_args = infer_architecture(params, activation, alpha)
    state_dict = {key: to_torch_layout(params[m][p], key) for (m, p), key in timm_keys(params).items()}
    return variant, model_args, state_dict


def convert_haiku_checkpoint(src: Union[str, os.PathLike], out_dir: Union[str, os.PathLike],
                             activation: str = "gelu", alpha: float = 0.2) -> Path:
    """Convert a DeepMind checkpoint into `out_dir/model.safetensors` + timm `out_dir/config.json`.

    The model is rebuilt and loaded strictly before anything is written; files land atomically.
    Load the result with `nfnet_zoo.load_model(OUT_DIR)` (the exact network), or with
    `timm.create_model("local-dir:OUT_DIR", pretrained=True)`.
    """
    import timm
    from timm.models import save_for_hf

    from .shared_config import rewrite_shared

    variant, model_args, state_dict = haiku_to_timm(load_haiku_checkpoint(src), activation, alpha)
    # A shape that matches no paper variant must not inherit that variant's weight notes.
    overlay = {} if "depths" not in model_args else {"tag": None, "notes": None}
    try:
        model = timm.create_model(variant, pretrained_cfg_overlay=overlay, **model_args)
    except ValueError as e:
        raise NFNetZooError(f"{e}; pass --activation with one of the paper's nonlinearities") from None
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise NFNetZooError(f"{src}: converted tensors do not fit {variant} (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}); the checkpoint is not a standard NFNet")
    out = Path(out_dir)
    _check_replaceable(out)
    out.mkdir(parents=True, exist_ok=True)
    # the pool named: timm < 1.0.31 does not read it from the head
    arch_args = {**{k: list(v) if isinstance(v, tuple) else v for k, v in model_args.items()}, "global_pool": "avg"}
    with tempfile.TemporaryDirectory(dir=out, prefix=".convert-") as tmp:
        save_for_hf(model, tmp, model_config={"source_checkpoint": Path(src).name, "global_pool": "avg"},
                    model_args=arch_args, safe_serialization=True)
        rewrite_shared(Path(tmp) / "config.json")  # loadable by plain timm and transformers (shared_config.py)
        for name in _OUTPUTS:
            os.replace(Path(tmp) / name, out / name)
    write_json_atomic(out / _WRITTEN, {name: sha256(out / name) for name in _OUTPUTS})
    return out


_OUTPUTS = ("model.safetensors", "config.json")
_WRITTEN = ".nfnet-zoo-convert.json"  # the sha256 of the files convert wrote in OUT: those it may replace


def _check_replaceable(out: Path) -> None:
    """OUT's model.safetensors and config.json are missing, or unchanged since convert wrote them."""
    try:
        written = json.loads((out / _WRITTEN).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        written = {}
    for name in _OUTPUTS:
        p = out / name
        if p.exists() or p.is_symlink():
            ours = isinstance(written, dict) and p.is_file() and not p.is_symlink() and written.get(name) == sha256(p)
            if not ours:
                raise NFNetZooError(f"--out {out} already holds {name}, which convert did not write (or which was "
                                    f"changed since); pass another --out (nothing was changed)")


__all__ = ["load_haiku_checkpoint", "infer_architecture", "timm_keys", "to_torch_layout",
           "haiku_to_timm", "convert_haiku_checkpoint"]
