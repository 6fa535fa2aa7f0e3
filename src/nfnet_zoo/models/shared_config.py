"""The config.json of a model we share (run folders, pushed and published repos), for every loader.

Three kinds of reader load a shared folder or Hub repo: nfnet-zoo's own loaders (`evaluate`,
`predict`, `load_model`), timm with or without nfnet-zoo, and transformers' TimmWrapper, which calls
`timm.create_model(architecture, num_classes=N, **model_args)`. So config.json says:
- `architecture` + `model_args`: timm's own NormFreeNet (`dm_nfnet_fN` with `NfCfg` overlays) where it
  has our parameters, key for key, and computes the same network (logits within about 3e-5: timm's
  erf GELU against DeepMind's tanh form); otherwise our name (`nfnet_zoo_tiny`, the `_plus` stems), which
  plain timm refuses as unknown instead of loading another network into the weights;
- `model_args` never repeats num_classes (TimmWrapper passes it as well: a TypeError otherwise);
- `nfnet_zoo`: the exact architecture, which nfnet-zoo's loaders build (bit-exact numerics);
- `pretrained_cfg.input_size` is the evaluation size and crop, so timm's `resolve_model_data_config`,
  transformers' image processor and the Hub's widget preprocess as `evaluate` did.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Optional

SECTION = "nfnet_zoo"
# timm's standardisation is (w - mean) / sqrt(var + eps); DeepMind's rsqrt(max(var * fan_in, 1e-4)) has no
# eps inside: the smallest eps keeps timm's division finite and otherwise out of the way.
TIMM_STD_CONV_EPS = 1e-10
_PASS_THROUGH = ("in_chans", "global_pool")            # the same arguments in both models
_TRAINING_ONLY = ("drop_rate", "drop_path_rate", "stochdepth_rate", "train_size", "test_size")


# model_args that name files to load or downloads, not an architecture: never taken from a received config
LOADING_ARGS = frozenset({"pretrained", "checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir",
                          "pretrained_strict", "features_only"})


def exact_architecture(config: dict) -> tuple[str, dict]:
    """(architecture, model_args) that build the exact network of a config.json: its `nfnet_zoo` section
    when it has one, else its own (num_classes left out: it comes from config["num_classes"]).
    ValueError, saying which field, for a malformed one (received configs are anyone's)."""
    source, where = config, ""
    if SECTION in config:
        source, where = config[SECTION], f"{SECTION}."
        if not isinstance(source, dict):
            raise ValueError(f"{SECTION} is {source!r}, not an object with architecture and model_args")
    if not isinstance(source.get("architecture"), str):
        raise ValueError(f"{where}architecture is {source.get('architecture')!r}, not a model name")
    args = source.get("model_args") or {}
    if not isinstance(args, dict):
        raise ValueError(f"{where}model_args is {args!r}, not an object")
    loading = sorted(set(args) & LOADING_ARGS)
    if loading:
        raise ValueError(f"{where}model_args names {', '.join(loading)}: files or downloads to load, not the "
                         "architecture")
    return source["architecture"], {k: v for k, v in args.items() if k != "num_classes"}


def is_timm_own(config: dict, weight_names) -> bool:
    """A config.json + weights of timm's own nfnet_fN (a NormFreeNet without skip gains), which plain timm wrote:
    our NFNets always have skip gains, and timm's NfCfg-only arguments (channels ...) are not ours."""
    from .variants import TIMM_OWN, timm_own_fields

    arch = config.get("architecture")
    args = config.get("model_args") if isinstance(config.get("model_args"), dict) else {}
    return (SECTION not in config and arch in TIMM_OWN
            and (bool(set(args) & timm_own_fields()) or not any(k.endswith(".skipinit_gain") for k in weight_names)))


@functools.lru_cache(maxsize=64)
def _timm_native(architecture: str, args_json: str) -> Optional[tuple[str, str]]:
    try:
        return _find_timm_native(architecture, args_json)
    except Exception:  # noqa: BLE001 - a field timm cannot take (an activation it lacks ...): not expressible
        return None


def _find_timm_native(architecture: str, args_json: str) -> Optional[tuple[str, str]]:
    from timm.layers import get_act_fn
    from timm.models import nfnet as timm_nfnet

    from .nfnet import NFNetCfg
    from .variants import VARIANTS

    base = VARIANTS.get(architecture)
    if base is None:
        return None
    args = json.loads(args_json)
    fields = {f.name for f in dataclasses.fields(NFNetCfg)}
    unknown = set(args) - fields - set(_PASS_THROUGH) - set(_TRAINING_ONLY)
    if unknown:
        return None
    cfg = dataclasses.replace(base, **{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()
                                      if k in fields})
    stem = cfg.widths[0] // 2
    if (len(set(cfg.group_widths())) != 1 or not cfg.big_width or tuple(cfg.strides) != (1, 2, 2, 2)
            or tuple(cfg.stem_widths) != (stem // 8, stem // 4, stem // 2) or cfg.final_conv_mult <= 0
            or cfg.activation not in timm_nfnet._nonlin_gamma or get_act_fn(cfg.activation) is None):
        return None
    name = architecture if architecture.startswith("nfnet_f") and not architecture.endswith("_plus") else "nfnet_f0"
    name = "dm_" + name
    want = dict(depths=tuple(cfg.depths), channels=tuple(cfg.widths), alpha=cfg.alpha, stem_chs=stem,
                group_size=cfg.group_widths()[0], bottle_ratio=cfg.expansion, attn_kwargs={"rd_ratio": cfg.se_ratio},
                num_features=cfg.num_features, extra_conv=cfg.use_two_convs, act_layer=cfg.activation,
                std_conv_eps=TIMM_STD_CONV_EPS)
    default = timm_nfnet.model_cfgs[name]
    overlay = {k: list(v) if isinstance(v, tuple) else v for k, v in want.items() if getattr(default, k) != v}
    overlay.update({k: args[k] for k in _PASS_THROUGH if k in args})
    if not _same_parameters(architecture, args, name, overlay):
        return None
    return name, json.dumps(overlay)


def state_shapes(build, **kwargs) -> dict:
    """{name: (dtype, shape)} of the state dict of `build(**kwargs)`, built on the meta device (no memory).
    timm's NormFreeNet before 1.0.31 calls .tolist() on a tensor while it builds, which a meta tensor cannot
    answer: for it, accelerate's init_empty_weights (parameters on meta, made on the CPU first)."""
    import torch

    try:
        with torch.device("meta"):
            model = build(**kwargs)
    except NotImplementedError:
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):
            model = build(**kwargs)
    return {k: (v.dtype, tuple(v.shape)) for k, v in model.state_dict().items()}


def _same_parameters(ours: str, our_args: dict, theirs: str, their_args: dict) -> bool:
    """Both models have the same parameter and buffer names and shapes (built without memory)."""
    import timm

    try:
        return (state_shapes(timm.create_model, model_name=ours, num_classes=2, **our_args)
                == state_shapes(timm.create_model, model_name=theirs, num_classes=2, **their_args))
    except Exception:  # noqa: BLE001 - either side failing to build means they are not the same network
        return False


def timm_native(architecture: str, model_args: dict) -> Optional[tuple[str, dict]]:
    """(timm architecture, model_args) of timm's own NormFreeNet for our `architecture`, or None where timm's
    `NfCfg` cannot describe it (a stem other than the F family's, per-stage group widths, strides ...)."""
    found = _timm_native(architecture, json.dumps(model_args, sort_keys=True))
    return None if found is None else (found[0], json.loads(found[1]))


def _unambiguous(architecture: str, model_args: dict) -> tuple[str, dict]:
    """Our architecture under a name plain timm does not know: `nfnet_zoo_custom` with every field that differs
    from its defaults, for an nfnet_fN (plain timm's `nfnet_fN` is another network, and would load into it)."""
    from .nfnet import NFNetCfg
    from .variants import CUSTOM, TIMM_OWN, VARIANTS

    if architecture not in TIMM_OWN:
        return architecture, model_args
    names = {f.name for f in dataclasses.fields(NFNetCfg)} - set(_TRAINING_ONLY)
    full = dataclasses.replace(VARIANTS[architecture], **{k: tuple(v) if isinstance(v, list) else v
                                                        for k, v in model_args.items() if k in names})
    args = {k: list(v) if isinstance(v, tuple) else v for k in sorted(names)
            if (v := getattr(full, k)) != getattr(VARIANTS[CUSTOM], k)}
    return CUSTOM, {**args, **{k: model_args[k] for k in _PASS_THROUGH if k in model_args}}


def _data_fields(size: int) -> dict:
    from .variants import deepmind_crop_pct

    crop = deepmind_crop_pct(size)
    return {"input_size": [3, size, size], "test_input_size": [3, size, size], "crop_pct": crop,
            "test_crop_pct": crop, "crop_mode": "squash"}


def share_config(config: dict, *, eval_size: Optional[int] = None, notes: Optional[list[str]] = None) -> dict:
    """The shared form of a timm config.json (as `save_for_hf` wrote it for one of our models, or already shared).

    `eval_size`: the image size `evaluate` uses; it becomes pretrained_cfg's input size (with DeepMind's squash
    crop), so every loader's default preprocessing is the evaluation's. `notes` replace the pretrained_cfg's
    `notes`; with them its `tag` and `origin_url` go too (they described the starting weights, not this model).
    """
    arch, args = exact_architecture(config)
    out = {k: v for k, v in config.items() if k not in ("architecture", "model_args", SECTION)}
    pcfg = dict(config.get("pretrained_cfg") or {})
    if eval_size:
        if (pcfg.get("input_size") or [0])[-1] != eval_size:
            pcfg.pop("pool_size", None)  # the starting weights' pool size belongs to their input size
        pcfg.update(_data_fields(eval_size))
    if "num_classes" in config and pcfg.get("num_classes", config["num_classes"]) != config["num_classes"]:
        for key in ("label_names", "label_descriptions", "label_offset"):  # the starting weights' classes
            pcfg.pop(key, None)
        pcfg["num_classes"] = config["num_classes"]
    if notes is not None:
        for key in ("tag", "origin_url"):
            pcfg.pop(key, None)
        pcfg["notes"] = list(notes)
    native = timm_native(arch, args)
    name, model_args = native if native else _unambiguous(arch, args)
    out = {"architecture": name, **out, "model_args": model_args, "pretrained_cfg": pcfg}
    from .variants import VARIANTS

    if arch in VARIANTS:
        out[SECTION] = {"architecture": arch, "model_args": args}
    return out


def rewrite_shared(path, *, eval_size: Optional[int] = None, notes: Optional[list[str]] = None) -> dict:
    """Rewrite the config.json at `path` (as timm's `save_for_hf` just wrote it) in the shared form; returns it.
    `eval_size` defaults to the config's test size."""
    from pathlib import Path

    path = Path(path)
    config = json.loads(path.read_text(encoding="utf-8"))
    if eval_size is None:
        eval_size = _test_size(config)
    shared = share_config(config, eval_size=eval_size, notes=notes)
    path.write_text(json.dumps(shared, indent=2) + "\n", encoding="utf-8")
    return shared


def is_shared_form(config: dict) -> bool:
    """True when config.json is already what `share_config` writes (no num_classes in model_args, and an
    `nfnet_zoo` section for our architectures)."""
    from .variants import VARIANTS

    arch, _ = exact_architecture(config)
    has_section = isinstance(config.get(SECTION), dict)
    return "num_classes" not in (config.get("model_args") or {}) and (has_section or arch not in VARIANTS)


def shared_form(config: dict) -> dict:
    """`config` in the shared form; an older run folder's config.json (written before the shared form) is
    converted, its test size taken as the evaluation size."""
    if is_shared_form(config):
        return config
    return share_config(config, eval_size=_test_size(config))


def _test_size(config: dict) -> Optional[int]:
    """The test size a timm config.json's pretrained_cfg gives, if it gives one."""
    size = ((config.get("pretrained_cfg") or {}).get("test_input_size") or [None])[-1]
    return size if isinstance(size, int) else None


def pretrained_cfg_of(config: dict) -> dict:
    """The pretrained_cfg timm would give a model loaded from this config.json (labels and classes included),
    limited to the fields timm's `PretrainedCfg` has."""
    from timm.models import PretrainedCfg

    known = {f.name for f in dataclasses.fields(PretrainedCfg)}
    pcfg = {k: v for k, v in (config.get("pretrained_cfg") or {}).items() if k in known}
    for key in ("num_classes", "label_names", "label_descriptions"):
        if key in config:
            pcfg[key] = config[key]
    return pcfg


__all__ = ["state_shapes", "exact_architecture", "is_timm_own", "LOADING_ARGS", "timm_native", "share_config", "rewrite_shared", "is_shared_form", "shared_form", "pretrained_cfg_of", "SECTION"]
