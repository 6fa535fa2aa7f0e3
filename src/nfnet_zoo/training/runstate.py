"""The resumable state of a run (RUN/state/), in files that cannot carry code.

Accelerate's save_state pickles registered objects and RNG states, and its load_state unpickles them
(weights_only=False, or torch's allow-list widened with numpy's reconstructors); a run folder is copied
between machines and colleagues, so resuming one must never run code from it. RUN/state/ holds:

  model.safetensors                        the (unwrapped, full) model weights
  ema.safetensors                          the EMA weights (--model-ema)
  optimizer.safetensors, optimizer.json    the optimizer's tensors; everything else (groups, steps), by name
  scheduler.json, scaler.json, progress.json  the schedule, the fp16 GradScaler, where the run is
  rng_<rank>.json, rng_<rank>.safetensors  each process's Python, numpy, torch (CPU and device) generators
  manifest.json                            written last: every file's size and sha256

Saving writes state.tmp/ and then swaps it in (state/ -> state.old/ -> gone), so a kill leaves state/ or
state.old/ whole. Loading checks the manifest first, then reads each file with safetensors or json and checks
its keys, shapes, dtypes and formats against the live objects; anything missing, damaged or foreign is one
line naming the file. Model and optimizer go through torch.distributed.checkpoint's full state dicts, which
are the same under one process, DDP (replicated: the main process writes) and FSDP2 (gathered, then sharded).
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..files import check_manifest, read_manifest, write_manifest
from ..errors import NFNetZooError

FORMAT = 1
MANIFEST = "manifest.json"
_TENSOR, _TUPLE = "__tensor__", "__tuple__"


class _Damaged(Exception):
    """A state file that is missing, damaged or foreign: (file name, what is wrong)."""


def state_dir(run: Path) -> Optional[Path]:
    """The last complete state of RUN: state/, or state.old/ after a kill between the two renames."""
    for name in ("state", "state.old"):
        if (run / name).is_dir():
            return run / name
    return None


# --- saving ----------------------------------------------------------------------------------------------
def save_run_state(accelerator, run: Path, model, optimizer, scheduler, progress: dict, ema=None) -> None:
    """Write the run's state into RUN/state.tmp, then swap it in (every process calls this)."""
    from safetensors.torch import save_file
    tmp, state, old = run / "state.tmp", run / "state", run / "state.old"
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)  # a half-written state.tmp of this run
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    weights, optim = _full_state(model, optimizer)  # collective under FSDP2: every process takes part
    rank = accelerator.process_index
    rng_json, rng_tensors = _rng_state()
    save_file(rng_tensors, str(tmp / f"rng_{rank}.safetensors"))
    _write_json(tmp / f"rng_{rank}.json", rng_json)
    if main:
        save_file(_contiguous(weights), str(tmp / "model.safetensors"))
        tensors: dict[str, torch.Tensor] = {}
        _write_json(tmp / "optimizer.json", _to_plain(optim, tensors, "optimizer"))
        save_file(_contiguous(tensors), str(tmp / "optimizer.safetensors"))
        _write_json(tmp / "scheduler.json", _to_plain(scheduler.state_dict(), {}, "scheduler"))
        _write_json(tmp / "progress.json", _to_plain(progress, {}, "progress"))
        if ema is not None:
            save_file(_contiguous(ema.state_dict()), str(tmp / "ema.safetensors"))
        if accelerator.scaler is not None:
            _write_json(tmp / "scaler.json", _to_plain(accelerator.scaler.state_dict(), {}, "scaler"))
    accelerator.wait_for_everyone()
    if main:
        write_manifest(tmp, MANIFEST, extra={"format": FORMAT, "processes": accelerator.num_processes})
        if state.is_dir():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(state, old)
        os.replace(tmp, state)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _full_state(model, optimizer) -> tuple[dict, dict]:
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def _contiguous(tensors: dict) -> dict:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, allow_nan=True), encoding="utf-8")


def _to_plain(obj: Any, tensors: dict, key: str) -> Any:
    """JSON-able copy of `obj`; tensors go to `tensors` under a path-like key, tuples are marked."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj
        return {_TENSOR: key}
    if isinstance(obj, dict):
        if not all(isinstance(k, (str, int)) for k in obj):
            raise TypeError(f"{key}: keys must be str or int")
        return {str(k): _to_plain(v, tensors, f"{key}/{k}") for k, v in obj.items()}
    if isinstance(obj, tuple):
        return {_TUPLE: [_to_plain(v, tensors, f"{key}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_to_plain(v, tensors, f"{key}/{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    raise TypeError(f"{key}: {type(obj).__name__} has no plain form")


def _rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    version, mt, gauss = random.getstate()
    name, key, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state()}
    for device in _devices():
        for i, s in enumerate(getattr(torch, device).get_rng_state_all()):
            tensors[f"{device}.{i}"] = s
    return {"python": {"version": version, "state": list(mt), "gauss": gauss},
            "numpy": {"bit_generator": name, "key": key.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                      "cached_gaussian": float(cached)}}, tensors


def _devices() -> list[str]:
    return [d for d in ("cuda", "xpu") if hasattr(torch, d) and getattr(torch, d).is_available()]


def check_room(run: Path, model, ema=None) -> None:
    """Before training: RUN is writable (a probe file) and its disk has room for the exports and two states
    (the swap holds state.tmp and state at once), or the OSError a late save would meet, now (exit 1)."""
    import errno
    import tempfile
    fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=run)  # EROFS / EACCES surface here
    os.close(fd)
    os.unlink(probe)
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    # best + last exports, and twice (model + optimizer state of up to two buffers a parameter + EMA)
    needed = weights * (2 + 2 * (3 + (ema is not None))) + (1 << 20)
    free = shutil.disk_usage(run).free
    if free < needed:
        raise OSError(errno.ENOSPC, f"{run} needs about {needed / 2**20:.0f} MiB for its state and models, "
                      f"{free / 2**20:.0f} MiB are free")


# --- loading ---------------------------------------------------------------------------------------------
def load_run_state(accelerator, run: Path, model, optimizer, scheduler, progress: dict, ema=None) -> dict:
    """Restore what save_run_state wrote, in place; returns the saved progress (same keys as `progress`).

    Raises NFNetZooError naming the file when anything is missing, damaged or foreign; nothing is loaded
    from a file before every file has been checked against the manifest.
    """
    folder = state_dir(run)
    if folder is None:
        raise NFNetZooError(f"{run} has no saved state yet (it stopped before its first save); start it again "
                            f"with the same command (its arguments are in {run}/args.json)")
    try:
        return _load(accelerator, folder, model, optimizer, scheduler, progress, ema)
    except _Damaged as e:
        name, what = e.args
        raise NFNetZooError(f"{folder / name} {what}; the run cannot be resumed exactly: restore {folder} from a "
                            f"copy, or start a new run with the same arguments ({run}/args.json) and another "
                            f"--output") from None


def _load(accelerator, folder: Path, model, optimizer, scheduler, progress: dict, ema) -> dict:
    files, problem = read_manifest(folder, MANIFEST)
    if files is None:
        raise _Damaged(MANIFEST, f"is missing or unreadable ({problem}): the state was written by an older "
                       f"nfnet-zoo (Accelerate pickles, never read: they can run code), or damaged")
    meta = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise _Damaged(MANIFEST, f"has format {meta.get('format')!r}, this nfnet-zoo reads format {FORMAT}")
    problem = check_manifest(folder, MANIFEST)
    if problem is not None:
        name, what = problem.split(" ", 1)
        raise _Damaged(name, {"is missing": "is missing", "was changed": "was changed since it was saved (truncated "
                              "or edited: its size or sha256 differs from the manifest)"}.get(
                                  what, "is not one of the files the state was saved with"))
    processes = meta.get("processes")
    if processes != accelerator.num_processes:
        raise _Damaged(MANIFEST, f"says {processes} process(es) saved it; resume it with {processes} process(es) "
                       f"(now {accelerator.num_processes})")
    expected = {"model.safetensors", "optimizer.json", "optimizer.safetensors", "scheduler.json", "progress.json",
                *(f"rng_{r}.{x}" for r in range(processes) for x in ("json", "safetensors"))}
    expected |= {"ema.safetensors"} if ema is not None else set()
    expected |= {"scaler.json"} if accelerator.scaler is not None else set()
    if set(files) != expected:
        odd = sorted(set(files) ^ expected)[0]
        raise _Damaged(odd, "is missing" if odd in expected else "does not belong to this run's state "
                       "(another --model-ema or --mixed-precision?)")

    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)
    live = get_model_state_dict(model)
    weights = _tensors(folder, "model.safetensors", {k: _like(v) for k, v in live.items()})
    live_optim = get_optimizer_state_dict(model, optimizer)
    optim = _from_plain_file(folder, "optimizer.json", _tensors(folder, "optimizer.safetensors", None))
    _check_optimizer(optim, live_optim, live)
    sched = _json(folder, "scheduler.json")
    _check_like("scheduler.json", sched, _to_plain(scheduler.state_dict(), {}, "scheduler"))
    saved_progress = _json(folder, "progress.json")
    _check_like("progress.json", saved_progress, progress)
    ema_weights = (_tensors(folder, "ema.safetensors", {k: _like(v) for k, v in ema.state_dict().items()})
                   if ema is not None else None)
    scaler = None
    if accelerator.scaler is not None:
        scaler = _json(folder, "scaler.json")
        _check_like("scaler.json", scaler, accelerator.scaler.state_dict())
    rank = accelerator.process_index
    rng = _checked_rng(folder, rank)

    # everything read and checked: now change the live objects
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=options)
    # not strict: a parameter the optimizer had not stepped (the backbone while --freeze-epochs holds it) has no
    # saved state; _check_optimizer has checked the rest
    set_optimizer_state_dict(model, optimizer, optim, options=StateDictOptions(full_state_dict=True, strict=False))
    _forget_unsaved_state(optimizer, live_optim["param_groups"], optim["state"])
    scheduler.load_state_dict(_from_plain(sched, {}))
    if ema_weights is not None:
        ema.load_state_dict(ema_weights)
    if scaler is not None:
        accelerator.scaler.load_state_dict(scaler)
    _set_rng(*rng)
    return _from_plain(saved_progress, {})


def _forget_unsaved_state(optimizer, live_groups: list, saved: dict) -> None:
    """torch's get/set_optimizer_state_dict first give a fresh optimizer's every parameter a state, by a step of
    zero gradients at lr 0 (torch.distributed.checkpoint's _init_optim_state): with weight decay that leaves a
    momentum of wd * w. A parameter the saved optimizer had not stepped starts fresh, as in the run never stopped.
    `live_groups`: get_optimizer_state_dict's param_groups, whose names follow the optimizer's parameters."""
    names = {}
    for group, live in zip(optimizer.param_groups, live_groups):
        if len(group["params"]) != len(live["params"]):  # shared parameters: no one-to-one naming, keep all
            return
        names.update((id(p), n) for p, n in zip(group["params"], live["params"]))
    for p in list(optimizer.state):
        if id(p) in names and names[id(p)] not in saved:
            del optimizer.state[p]


def _like(t: torch.Tensor) -> tuple:
    return tuple(t.shape), t.dtype


def _tensors(folder: Path, name: str, expected: Optional[dict]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    try:
        tensors = load_file(str(folder / name))
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise _Damaged(name, f"is not a readable safetensors file ({str(e).splitlines()[0][:80]})") from None
    if expected is not None:
        if tensors.keys() != expected.keys():
            odd = sorted(set(tensors) ^ set(expected))[0]
            raise _Damaged(name, f"does not fit this model: {odd} is {'missing' if odd in expected else 'foreign'}")
        for k, (shape, dtype) in expected.items():
            if _like(tensors[k]) != (shape, dtype):
                raise _Damaged(name, f"does not fit this model: {k} is {_like(tensors[k])}, expected {(shape, dtype)}")
    return tensors


def _json(folder: Path, name: str) -> Any:
    try:
        return json.loads((folder / name).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise _Damaged(name, f"is not valid JSON ({e})") from None


def _from_plain_file(folder: Path, name: str, tensors: dict) -> Any:
    plain = _json(folder, name)
    used: set = set()
    try:
        obj = _from_plain(plain, tensors, used)
    except KeyError as e:
        raise _Damaged(name, f"names tensor {e} that its .safetensors file lacks") from None
    if used != tensors.keys():
        raise _Damaged(name.replace(".json", ".safetensors"), f"holds tensors {name} does not name")
    return obj


def _from_plain(obj: Any, tensors: dict, used: Optional[set] = None) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR}:
            if used is not None:
                used.add(obj[_TENSOR])
            return tensors[obj[_TENSOR]]
        if set(obj) == {_TUPLE}:
            return tuple(_from_plain(v, tensors, used) for v in obj[_TUPLE])
        return {k: _from_plain(v, tensors, used) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_plain(v, tensors, used) for v in obj]
    return obj


def _kind(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    return type(v).__name__


def _check_like(name: str, saved: Any, live: dict) -> None:
    """Same keys as the live object's state, each value of the same kind (or None on either side: a value
    not set yet)."""
    if not isinstance(saved, dict) or saved.keys() != live.keys():
        odd = sorted(set(saved) ^ set(live))[:1] if isinstance(saved, dict) else ["its top level"]
        raise _Damaged(name, f"does not fit this run (keys differ: {odd[0]})")
    for k, v in live.items():
        a, b = _kind(saved[k]), _kind(v)
        if a != b and "none" not in (a, b):
            raise _Damaged(name, f"does not fit this run ({k} is a {a}, expected a {b})")


def _check_optimizer(saved: Any, live: dict, params: dict) -> None:
    name = "optimizer.json"
    if not isinstance(saved, dict) or set(saved) != {"state", "param_groups"}:
        raise _Damaged(name, "is not an optimizer state")
    groups, live_groups = saved["param_groups"], live["param_groups"]
    if not isinstance(groups, list) or len(groups) != len(live_groups):
        raise _Damaged(name, "has other parameter groups than this run's optimizer")
    for g, lg in zip(groups, live_groups):
        if not isinstance(g, dict) or g.get("params") != lg["params"]:
            raise _Damaged(name, "has other parameter groups than this run's optimizer")
        _check_like(name, g, lg)
    if not isinstance(saved["state"], dict) or not set(saved["state"]) <= set(params):
        raise _Damaged(name, "holds state for parameters this model does not have")
    for p, entry in saved["state"].items():
        if not isinstance(entry, dict):
            raise _Damaged(name, f"has a malformed entry for {p}")
        for k, v in entry.items():
            # by size: FSDP2 keeps 0-d gains as (1,) parameters (agc.prepare_for_fsdp2), saved 0-d
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.numel() != params[p].numel():
                raise _Damaged("optimizer.safetensors", f"{p}/{k} has shape {tuple(v.shape)}, the parameter "
                               f"{tuple(params[p].shape)}")


def _checked_rng(folder: Path, rank: int) -> tuple:
    name = f"rng_{rank}.json"
    s = _json(folder, name)
    try:
        py, npy = s["python"], s["numpy"]
        mt = tuple(py["state"])
        ok = (py["version"] == 3 and len(mt) == 625 and all(type(x) is int and 0 <= x < 2 ** 32 for x in mt)
              and (py["gauss"] is None or type(py["gauss"]) is float)
              and npy["bit_generator"] == "MT19937" and len(npy["key"]) == 624
              and all(type(x) is int and 0 <= x < 2 ** 32 for x in npy["key"])
              and type(npy["pos"]) is int and 0 <= npy["pos"] <= 624 and npy["has_gauss"] in (0, 1)
              and type(npy["cached_gaussian"]) is float)
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise _Damaged(name, "is not a Python + numpy generator state")
    tensors = _tensors(folder, f"rng_{rank}.safetensors", None)
    torch_state = tensors.get("torch")
    if torch_state is None or _like(torch_state) != _like(torch.get_rng_state()):
        raise _Damaged(f"rng_{rank}.safetensors", "holds no torch CPU generator state")
    devices = {}
    for device in _devices():
        live = getattr(torch, device).get_rng_state_all()
        saved = [tensors.get(f"{device}.{i}") for i in range(len(live))]
        if all(t is not None and _like(t) == _like(l) for t, l in zip(saved, live)):
            devices[device] = saved
    numpy_state = ("MT19937", np.array(npy["key"], dtype=np.uint32), npy["pos"], npy["has_gauss"],
                   npy["cached_gaussian"])
    return (3, mt, py["gauss"]), numpy_state, torch_state, devices


def _set_rng(python: tuple, numpy_state: tuple, torch_state: torch.Tensor, devices: dict) -> None:
    random.setstate(python)
    np.random.set_state(numpy_state)
    torch.set_rng_state(torch_state)
    for device, states in devices.items():
        getattr(torch, device).set_rng_state_all(states)


__all__ = ["save_run_state", "load_run_state", "state_dir", "check_room", "FORMAT"]
