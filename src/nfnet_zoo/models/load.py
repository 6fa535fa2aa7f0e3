"""Every way a model is read: a registered name (its pretrained weights), a run folder or any folder with
model.safetensors + config.json, `local-dir:PATH`, `hf-hub:ID`, and a checkpoint to start from.

Each path checks before it builds: config fields, the weights' header against the architecture's
shapes (built on the meta device), finite values; failures are one-line `NFNetZooError`s. Nothing is
read with a loader that can run code.
"""
from __future__ import annotations

import difflib
import functools
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..errors import NFNetZooError
from .shared_config import exact_architecture, pretrained_cfg_of, state_shapes


# --- names and pretrained weights ------------------------------------------------------------------------------------
def check_model_name(name: str) -> str:
    """`name` if timm knows its architecture; else a one-line error with the closest names."""
    import timm
    from timm.models import split_model_name_tag
    arch, _ = split_model_name_tag(name)
    if timm.is_model(arch):
        return name
    close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
    hint = f"closest: {', '.join(close)}" if close else "list them with timm.list_models('nfnet*')"
    raise NFNetZooError(f"unknown model {name!r}; {hint}")


def has_pretrained_weights(name: str) -> bool:
    from timm.models._builder import resolve_pretrained_cfg
    try:
        return bool(resolve_pretrained_cfg(name).has_weights)
    except (RuntimeError, AssertionError, KeyError):
        return False


def _hub_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache
    repo_id = repo_id.split("@")[0]
    return any(isinstance(try_to_load_from_cache(repo_id, f), str)
               for f in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"))


def _url_cached(url: str) -> bool:
    from urllib.parse import urlparse
    return os.path.isfile(os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path)))


def _is_cached(name: str) -> bool:
    """True when the pretrained weights need no download (local, or already in the HF/torch cache)."""
    if name.startswith("local-dir:"):
        return True
    if name.startswith("hf-hub:"):
        return _hub_cached(name[len("hf-hub:"):])
    from timm.models._builder import resolve_pretrained_cfg
    cfg = resolve_pretrained_cfg(name)
    return (bool(cfg.file) or (bool(cfg.hf_hub_id) and _hub_cached(cfg.hf_hub_id))
            or (bool(cfg.url) and _url_cached(cfg.url)))


def _offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as huggingface_hub read it, or as set since."""
    from huggingface_hub import constants
    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or flag.upper() in {"1", "ON", "YES", "TRUE"}


def _hub_reachable() -> bool:
    """One request to the Hub, no retries (a download retries for about 50 s before it fails)."""
    from huggingface_hub import constants, get_session
    try:
        get_session().head(constants.ENDPOINT, timeout=10)  # any answer, even an error status, will do
        return True
    except Exception:
        return False


def _refuse_when_offline(what: str, ways_out: str) -> None:
    """One line, at once, for something not cached when HF_HUB_OFFLINE is set or the Hub does not answer
    (a download would retry for about 50 s first)."""
    why = ("HF_HUB_OFFLINE is set" if _offline() else
           "the Hugging Face Hub cannot be reached" if not _hub_reachable() else None)
    if why:
        raise NFNetZooError(f"{what} not in the local cache and {why}; connect to the Hub once (with "
                            f"HF_HUB_OFFLINE unset), or {ways_out}")


def create_pretrained(name: str, ways_out: str = "pass a run folder or local-dir:PATH instead", **kwargs) -> nn.Module:
    """timm.create_model(name, pretrained=True) with a one-line error (ending in `ways_out`) when the
    weights are not cached and cannot be downloaded: at once when HF_HUB_OFFLINE is set or the Hub
    does not answer."""
    import timm
    cached = _is_cached(name)
    if not cached:
        _refuse_when_offline(f"pretrained weights for {name} are", ways_out)
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except NFNetZooError:
        raise
    except Exception as e:  # the Hub client raises many types (OSError, HTTP, connection, offline)
        if cached:
            raise
        raise NFNetZooError(f"pretrained weights for {name} are not in the local cache and could not be "
                            f"downloaded ({type(e).__name__}); connect to the Hugging Face Hub once, or "
                            f"{ways_out}") from None


@dataclass
class Checkpoint:
    """Weights from a run/model folder or a weights file, with what its config.json says."""

    state_dict: dict
    architecture: Optional[str] = None
    model_args: Optional[dict] = None
    label_names: Optional[list] = None


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a model folder (model.safetensors + config.json) or a .safetensors/.pth/.bin file."""
    from safetensors.torch import load_file
    p = check_checkpoint(path, finite=False)  # the loaded tensors are checked below: the file is read once
    if p.is_dir():
        cfg = _read_config(p / "config.json", "")  # checked by check_checkpoint; {} without one
        arch, args = exact_architecture(cfg) if isinstance(cfg.get("architecture"), str) else (None, None)
        state = load_file(p / "model.safetensors")
        check_finite(state, f"--checkpoint {p}", "restore it, or pass another --checkpoint")
        return Checkpoint(state, arch, args, cfg.get("label_names"))
    try:
        if p.suffix == ".safetensors":
            state = load_file(p)
            check_finite(state, f"--checkpoint {p}", "restore it, or pass another --checkpoint")
            return Checkpoint(state)
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise NFNetZooError(f"cannot read --checkpoint {p} ({str(e).splitlines()[0][:120]}); pass a "
                            f".safetensors file or a run folder") from None
    for key in ("state_dict", "model", "state_dict_ema"):  # timm/Lightning checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise NFNetZooError(f"--checkpoint {p} holds no state dict of tensors; pass a .safetensors file or a run folder")
    check_finite(state, f"--checkpoint {p}", "restore it, or pass another --checkpoint")
    return Checkpoint({k.removeprefix("module."): v for k, v in state.items()})


def check_checkpoint(path: str | os.PathLike, finite: bool = True) -> Path:
    """The checks of --checkpoint PATH, run before anything is written: the folder's config.json against the
    weights' header, and with `finite` the weights read one tensor at a time for NaN and infinities."""
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / "model.safetensors").is_file():
            raise NFNetZooError(f"--checkpoint {p} has no model.safetensors; pass a run folder of "
                                f"`nfnet-zoo finetune` or a weights file")
        fix = "restore it, or pass another --checkpoint"
        _refuse_links_out(p)
        if (p / "config.json").exists() and not (p / "config.json").is_file():
            raise NFNetZooError(f"--checkpoint {p}/config.json is not a file; {fix}")
        if (p / "config.json").is_file():
            check_model_folder(p / "config.json", p / "model.safetensors", f"--checkpoint {p}", fix)
        else:
            _weights_header(p / "model.safetensors", fix)
        if finite:
            _check_finite_file(p / "model.safetensors", f"--checkpoint {p}", fix)
    elif p.suffix == ".safetensors" and p.is_file():
        fix = "restore it, or pass another --checkpoint"
        _weights_header(p, fix)
        if finite:
            _check_finite_file(p, f"--checkpoint {p}", fix)
    elif not p.is_file():
        raise NFNetZooError(f"--checkpoint {p} does not exist; pass a run folder or a .safetensors file")
    return p


def _refuse_links_out(folder: Path) -> None:
    """A model folder's config.json and model.safetensors are its own: a link out of the folder (to a file
    of yours, or another model's) is refused, since the folder may come from someone else."""
    inside = folder.resolve()
    for name in ("config.json", "model.safetensors"):
        f = folder / name
        if f.is_symlink() and inside not in f.resolve().parents:
            raise NFNetZooError(f"{f} is a link out of its folder (to {f.resolve()}); copy the file itself into "
                                f"{folder}, or pass the folder it belongs to")


def _read_config(cfg_file: Path, fix: str, where: Optional[str] = None) -> dict:
    """config.json as a JSON object ({} when absent); a damaged one is one line naming it (as `where`/config.json:
    a Hub repo is named by its id, not by the cache's path)."""
    import json
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.is_file() else {}
        if not isinstance(cfg, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError, OSError) as e:
        name = f"{where}/config.json" if where else cfg_file
        raise NFNetZooError(f"{name} is damaged ({str(e).splitlines()[0][:80]}); {fix}") from None
    return cfg


def _weights_header(weights: Path, fix: str, where: Optional[str] = None) -> dict:
    """{name: (dtype, shape)} from a safetensors header, read without loading a tensor."""
    from safetensors import safe_open
    try:
        with safe_open(str(weights), "pt") as f:
            return {k: (str(f.get_slice(k).get_dtype()), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    except Exception as e:  # safetensors' own error type: a truncated file or a damaged header
        name = f"{where}/model.safetensors" if where else weights
        raise NFNetZooError(f"{name} is damaged or truncated ({str(e).splitlines()[0][:80]}); {fix}") from None


_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")  # timm's str_to_interp_mode
_MAX_SIZE = 4096  # pixels: far above any NFNet's evaluation size, far below what exhausts memory


def _check_config(cfg: dict, where: str) -> None:
    """The fields of a received config.json that preprocessing and the classifier read, checked before use."""
    def bad(field: str, problem: str) -> NFNetZooError:
        return NFNetZooError(f"{where}/config.json: {field} {problem}; restore the config.json written with these "
                             f"weights, or pass another model")
    if not isinstance(cfg.get("architecture"), str):
        raise bad("architecture", "is missing; it is not a timm model folder")
    try:
        exact_architecture(cfg)
    except ValueError as e:
        field, _, problem = str(e).partition(" ")
        raise bad(field, problem) from None
    n = cfg.get("num_classes")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise bad("num_classes", f"is {n!r}, not a positive whole number")
    names = cfg.get("label_names")
    if names is not None and (not isinstance(names, list) or len(names) != n
                              or not all(isinstance(x, str) for x in names)):
        raise bad("label_names", f"is not a list of {n} class names")
    pcfg = cfg.get("pretrained_cfg", {})
    if not isinstance(pcfg, dict):
        raise bad("pretrained_cfg", "is not a JSON object")
    for key in ("input_size", "test_input_size"):
        v = pcfg.get(key)
        if v is not None and not (isinstance(v, list) and len(v) == 3 and all(
                isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= _MAX_SIZE for x in v)):
            raise bad(f"pretrained_cfg.{key}", f"is {v!r}, not [channels, height, width] of at most {_MAX_SIZE}")
    for key in ("mean", "std"):
        v = pcfg.get(key)
        if v is not None and not (isinstance(v, list) and len(v) == 3 and all(
                isinstance(x, (int, float)) and math.isfinite(x) and (key == "mean" or x > 0) for x in v)):
            raise bad(f"pretrained_cfg.{key}", f"is {v!r}, not 3 finite numbers (one a colour channel)")
    interpolation = pcfg.get("interpolation")
    if interpolation is not None and interpolation not in _INTERPOLATIONS:
        raise bad("pretrained_cfg.interpolation", f"is {interpolation!r}, not one of {', '.join(_INTERPOLATIONS)}")
    for key in ("crop_pct", "test_crop_pct"):
        v = pcfg.get(key)
        if v is not None and not (isinstance(v, (int, float)) and 0 < v <= 1):
            raise bad(f"pretrained_cfg.{key}", f"is {v!r}, not a fraction in (0, 1]")


def _hub_file(repo: str, filename: str) -> Path:
    """A file of the Hub repo `repo` (`id` or `id@revision`): from the cache, else downloaded; one line when
    neither works (at once when HF_HUB_OFFLINE is set or the Hub does not answer)."""
    from huggingface_hub import hf_hub_download
    repo_id, _, revision = repo.partition("@")
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision or None, local_files_only=True))
    except Exception:  # not cached (or a bad id, which the download below reports)
        pass
    _refuse_when_offline(f"{filename} of hf-hub:{repo} is", "pass a run folder or local-dir:PATH instead")
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision or None))
    except Exception as e:  # the Hub client raises many types (not found, HTTP, connection)
        raise NFNetZooError(f"{filename} of hf-hub:{repo} could not be downloaded ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:100] if str(e) else ''}); check the repo id and revision, "
                            f"or pass a run folder or local-dir:PATH") from None


def check_model_folder(config_file: Path, weights: Path, where: str,
                       fix: str = "restore it from where it came, or pass another model"):
    """Check a received config.json + model.safetensors without allocating the model: the config's fields;
    the exact architecture (shared_config.py) built on the meta device against the weights' header (names,
    shapes, floating dtypes). Returns (config, build, kwargs): `build(**kwargs)` makes the model."""
    import timm
    cfg = _read_config(config_file, fix, where)
    _check_config(cfg, where)
    header = _weights_header(weights, fix, where)
    arch, args = exact_architecture(cfg)
    check_model_name(arch)
    kwargs = dict(num_classes=cfg["num_classes"], pretrained_cfg=pretrained_cfg_of(cfg), **args)
    build = functools.partial(timm.create_model, arch)
    shapes = _meta_shapes(build, kwargs, where, arch, fix)
    missing, unexpected = sorted(set(shapes) - set(header)), sorted(set(header) - set(shapes))
    from .variants import TIMM_OWN, TIMM_OWN_NOTE, only_skip_gains_missing
    if arch in TIMM_OWN and only_skip_gains_missing(missing, unexpected):  # timm's own nfnet_fN, as it is
        warnings.warn(f"{where} " + TIMM_OWN_NOTE.format(name=arch))
        build = functools.partial(TIMM_OWN[arch], pretrained=False)
        shapes = _meta_shapes(build, kwargs, where, arch, fix)
        missing, unexpected = sorted(set(shapes) - set(header)), sorted(set(header) - set(shapes))
    detail = misfit({k: v[1] for k, v in shapes.items()}, {k: v[1] for k, v in header.items()})
    if detail:
        raise NFNetZooError(f"{where}: model.safetensors does not fit the {arch} that config.json describes "
                            f"({detail}); {fix}")
    not_float = [k for k, (dtype, _) in header.items() if shapes[k][0].is_floating_point and
                 dtype not in ("F32", "F16", "BF16", "F64")]
    if not_float:
        raise NFNetZooError(f"{where}: model.safetensors holds {not_float[0]} as {header[not_float[0]][0]}, not "
                            f"floating point; {fix}")
    return cfg, build, kwargs


def misfit(built: dict, saved: dict) -> Optional[str]:
    """How saved tensor shapes ({name: shape}) fail to fit a built model's, or None when they fit exactly."""
    missing, unexpected = sorted(set(built) - set(saved)), sorted(set(saved) - set(built))
    wrong = [k for k in built if k in saved and tuple(built[k]) != tuple(saved[k])]
    if missing:
        return f"missing {missing[:2]}"
    if unexpected:
        return f"unexpected {unexpected[:2]}"
    if wrong:
        return f"{wrong[0]} is {list(saved[wrong[0]])}, the model has {list(built[wrong[0]])}"
    return None


def weights_shapes(weights: Path, fix: str) -> dict:
    """{name: shape} of a safetensors file, from its header (no tensor read); one line when it is damaged."""
    return {k: shape for k, (_, shape) in _weights_header(weights, fix).items()}


def check_finite(state: dict, where: str, fix: str = "restore it from where it came, or pass another model") -> None:
    """Weights with NaN or infinite values (a diverged or damaged run) are refused in one line."""
    broken = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if broken:
        raise NFNetZooError(f"{where}: the weights hold NaN or infinite values ({broken}), as a diverged or damaged "
                            f"run leaves them; {fix}")


def _check_finite_file(weights: Path, where: str, fix: str) -> None:
    """check_finite on a safetensors file, one tensor at a time (memory for the largest tensor only)."""
    from safetensors import safe_open
    with safe_open(str(weights), "pt") as f:
        for k in f.keys():
            check_finite({k: f.get_tensor(k)}, where, fix)


def load_model_files(config_file: Path, weights: Path, where: str) -> nn.Module:
    """The exact model a shared config.json + model.safetensors describe (shared_config.py), in eval mode:
    checked first (check_model_folder, then finite weights), then loaded strictly."""
    from safetensors.torch import load_file
    _, build, kwargs = check_model_folder(config_file, weights, where)
    state = load_file(weights)
    check_finite(state, where)
    model = build(**kwargs)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _meta_shapes(build, kwargs: dict, where: str, arch: str, fix: str) -> dict:
    """{name: (dtype, shape)} of the model `build(**kwargs)` makes, built on the meta device (no memory)."""
    try:
        return state_shapes(build, **kwargs)
    except Exception as e:  # noqa: BLE001 - any field value may break a constructor (ZeroDivisionError ...)
        raise NFNetZooError(f"{where}/config.json does not build {arch} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:100] if str(e) else ''}); {fix}") from None


def load_model(spec: str) -> nn.Module:
    """A trained model by MODEL spec (module docstring), in eval mode on the CPU.

    A folder, `local-dir:` or `hf-hub:` model is built from its config.json's exact architecture (the
    `nfnet_zoo` section that shared configs carry) and loaded strictly, so it computes what it computed
    when it was trained, whichever timm architecture config.json names for other loaders."""
    if spec.startswith("hf-hub:"):
        repo = spec[len("hf-hub:"):]
        return load_model_files(_hub_file(repo, "config.json"), _hub_file(repo, "model.safetensors"), spec)
    local = spec.startswith("local-dir:")
    p = Path(spec[len("local-dir:"):] if local else spec).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file() or not (p / "model.safetensors").is_file():
            raise NFNetZooError(f"{p} is not a model folder (needs model.safetensors and config.json, as "
                                f"`nfnet-zoo finetune` writes)")
        _refuse_links_out(p)
        return load_model_files(p / "config.json", p / "model.safetensors", str(p))
    if local or os.sep in spec or spec.startswith("."):
        raise NFNetZooError(f"{p} does not exist; pass a run folder, a local-dir:/hf-hub: name, or a model name")
    check_model_name(spec)
    if not has_pretrained_weights(spec):
        raise NFNetZooError(f"{spec} has no pretrained weights to evaluate; pass a run folder or a name with "
                            f"weights (e.g. nfnet_f0.dm_in1k)")
    return create_pretrained(spec).eval()


__all__ = ["load_model", "load_model_files", "check_model_folder", "check_finite", "misfit", "weights_shapes",
           "check_model_name", "read_checkpoint", "check_checkpoint", "create_pretrained", "has_pretrained_weights",
           "Checkpoint"]
