"""The variant table (DeepMind's `nfnet_params`), pretrained configs, and timm registration.

`import nfnet_zoo` runs this module: it registers `nfnet_f0`..`nfnet_f7` (replacing timm's weightless
entries of those names), the wider `nfnet_f0_plus`..`nfnet_f7_plus`, and `nfnet_zoo_tiny`.
timm's own `dm_nfnet_*` are left untouched.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._builder import resolve_pretrained_cfg

from . import nfnet_zoo as _timm_module
from ..errors import NFNetZooError
from .nfnet import NFNet, NFNetCfg
from nfnet_zoo_cli.versions import FLOORS, too_old

PAPER = "arXiv:2102.06171"
PAPER_NAME = "High-Performance Large-Scale Image Recognition Without Normalization"
ORIGIN = "https://github.com/google-deepmind/deepmind-research/tree/master/nfnets"

_F_WIDTHS = (256, 512, 1536, 1536)
_PLUS_WIDTHS = (384, 768, 2048, 2048)
# DeepMind's nfnet_params: depth multiplier k, train/test resolution, dropout, RandAugment level.
_F_TABLE = {
    0: (1, 192, 256, 0.2, "405"),
    1: (2, 224, 320, 0.3, "410"),
    2: (3, 256, 352, 0.4, "410"),
    3: (4, 320, 416, 0.4, "415"),
    4: (5, 384, 512, 0.5, "415"),
    5: (6, 416, 544, 0.5, "415"),
    6: (7, 448, 576, 0.5, "415"),
    7: (8, 480, 608, 0.5, "415"),
}
# DeepMind's reported ImageNet top-1 / top-5 of the released F0-F6 checkpoints (paper, Table 3).
DM_ACCURACY = {0: (83.6, 96.8), 1: (84.7, 97.1), 2: (85.1, 97.3), 3: (85.7, 97.5),
               4: (85.9, 97.6), 5: (86.0, 97.6), 6: (86.5, 97.9)}

VARIANTS: dict[str, NFNetCfg] = {}
RANDAUG_LEVEL: dict[str, str] = {}
for _i, (_k, _train, _test, _drop, _ra) in _F_TABLE.items():
    for _suffix, _widths in (("", _F_WIDTHS), ("_plus", _PLUS_WIDTHS)):
        _name = f"nfnet_f{_i}{_suffix}"
        VARIANTS[_name] = NFNetCfg(depths=tuple(d * _k for d in (1, 2, 6, 3)), widths=_widths,
                                   drop_rate=_drop, train_size=_train, test_size=_test)
        RANDAUG_LEVEL[_name] = _ra
# Not from the paper: a 1.1M-parameter NFNet for tests and CPU demos (same block, narrow and shallow).
VARIANTS["nfnet_zoo_tiny"] = NFNetCfg(depths=(1, 1, 2, 1), widths=(32, 64, 128, 256), group_width=16,
                                      drop_rate=0.1, stochdepth_rate=0.05, train_size=64, test_size=64)

# Not from the paper: an NFNet of any shape, F0's fields overridden by keyword. Shared configs name it where timm's
# own NFNet cannot express an nfnet_fN of another shape, since plain timm's `nfnet_fN` is a different network.
CUSTOM = "nfnet_zoo_custom"
VARIANTS[CUSTOM] = NFNetCfg()


def deepmind_crop_pct(size: int) -> float:
    """DeepMind's evaluation crop: squash-resize to size + 32 (bicubic), centre-crop size."""
    return size / (size + 32)


def _cfg(name: str, **kwargs: Any) -> dict[str, Any]:
    v = VARIANTS[name]
    return {
        "num_classes": 1000, "input_size": (3, v.train_size, v.train_size),
        "test_input_size": (3, v.test_size, v.test_size), "pool_size": (v.train_size // 32,) * 2,
        "crop_pct": deepmind_crop_pct(v.test_size), "test_crop_pct": deepmind_crop_pct(v.test_size),
        "crop_mode": "squash", "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.conv1", "classifier": "head.fc", "paper_ids": PAPER, "paper_name": PAPER_NAME,
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    **{f"nfnet_f{i}.dm_in1k": _cfg(
        f"nfnet_f{i}", hf_hub_id=f"timm/dm_nfnet_f{i}.dm_in1k", license="apache-2.0", origin_url=ORIGIN,
        notes=(f"DeepMind's released F{i} ImageNet-1k weights; reported top-1 {DM_ACCURACY[i][0]}, "
               f"top-5 {DM_ACCURACY[i][1]}",),
    ) for i in range(7)},
    "nfnet_f7": _cfg("nfnet_f7"),
    **{f"nfnet_f{i}_plus": _cfg(f"nfnet_f{i}_plus") for i in range(8)},
    "nfnet_zoo_tiny": _cfg("nfnet_zoo_tiny", notes=("not from the paper: a tiny NFNet for tests and demos",)),
    CUSTOM: _cfg(CUSTOM, notes=("not from the paper: an NFNet of any shape (F0's fields, each overridable)",)),
})

_ARCH_FIELDS = {f.name for f in dataclasses.fields(NFNetCfg)}


def _as_field(value: Any) -> Any:
    # config.json stores tuples as lists; the frozen cfg wants tuples.
    return tuple(value) if isinstance(value, list) else value


# timm's own nfnet_f0..f7, kept before registration replaces them: a different network (NormFreeNet without
# skip gains) whose checkpoints must still load as what they are after `import nfnet_zoo`.
TIMM_OWN: dict[str, Any] = {}
TIMM_OWN_NOTE = ("holds timm's own {name} (a NormFreeNet without skip gains), not DeepMind's NFNet of that name; "
                 "loaded with timm's {name}")


def only_skip_gains_missing(missing: list[str], unexpected: list[str]) -> bool:
    """The key difference between a checkpoint of timm's own nfnet_fN and our (and DeepMind's) NFNet."""
    return bool(missing) and not unexpected and all(k.endswith(".skipinit_gain") for k in missing)


def _load_error_is_timm_own(error: RuntimeError) -> bool:
    import re
    text = str(error)
    if "size mismatch" in text or "Unexpected key(s)" in text or "Missing key(s)" not in text:
        return False
    return only_skip_gains_missing(re.findall(r'"([^"]+)"', text.split("Missing key(s)", 1)[1]), [])


def timm_own_fields() -> set[str]:
    """Fields of timm's own `NfCfg` that ours lack: arguments that only a config of timm's nfnet_fN carries."""
    from timm.models.nfnet import NfCfg
    return {f.name for f in dataclasses.fields(NfCfg)} - _ARCH_FIELDS


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> NFNet:
    given = dict(kwargs)
    if variant in TIMM_OWN and set(kwargs) & timm_own_fields():  # e.g. channels=...: timm's own nfnet_fN
        warnings.warn("these arguments are of timm's own NfCfg: the model " + TIMM_OWN_NOTE.format(name=variant),
                      stacklevel=3)
        return TIMM_OWN[variant](pretrained=pretrained, **given)
    overrides = {k: _as_field(kwargs.pop(k)) for k in list(kwargs) if k in _ARCH_FIELDS}
    cfg = dataclasses.replace(VARIANTS[variant], **overrides)
    if pretrained:
        resolved = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"),
                                          kwargs.get("pretrained_cfg_overlay"))
        if not resolved.has_weights:
            raise NFNetZooError(
                f"{variant} has no released pretrained weights; use pretrained=False, or one of "
                f"{', '.join(list_pretrained_names())}")
    try:
        return build_model_with_cfg(NFNet, variant, pretrained, model_cfg=cfg,
                                    feature_cfg=dict(feature_cls="getter"), **kwargs)
    except RuntimeError as e:
        if not (pretrained and variant in TIMM_OWN and _load_error_is_timm_own(e)):
            raise
    warnings.warn("these pretrained weights " + TIMM_OWN_NOTE.format(name=variant), stacklevel=3)
    return TIMM_OWN[variant](pretrained=True, **given)


def list_pretrained_names() -> list[str]:
    """Registered `name.tag` pairs of this package that carry released weights."""
    return [f"{name}.{tag}" for name, dc in default_cfgs.items()
            for tag, c in dc.cfgs.items() if tag and c.has_weights]


def _entrypoint(name: str):
    def fn(pretrained: bool = False, **kwargs: Any) -> NFNet:
        return _create(name, pretrained=pretrained, **kwargs)
    fn.__name__ = fn.__qualname__ = name
    fn.__module__ = _timm_module.__name__  # timm's module name for these models (see nfnet_zoo.py)
    v = VARIANTS[name]
    fn.__doc__ = (f"{name}: depths {v.depths}, widths {v.widths}, train {v.train_size}px, "
                  f"test {v.test_size}px.")
    return fn


def _register_all() -> None:
    old = too_old("timm", FLOORS["timm"])
    if old:  # from Python there is no command to stop: one line, and the models may not work
        warnings.warn(f"nfnet-zoo: {old}", stacklevel=2)
    _timm_module.default_cfgs = default_cfgs  # register_model reads the pretrained configs there
    # timm ships weightless nfnet_f0..f7 entries; replacing them is the point, so only that
    # overwrite warning is silenced.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Overwriting nfnet_f\d in registry", category=UserWarning)
        for name in VARIANTS:
            if timm.is_model(name) and name not in TIMM_OWN and not getattr(
                    timm.models.model_entrypoint(name), "__module__", "").startswith(__package__):
                TIMM_OWN[name] = timm.models.model_entrypoint(name)
            setattr(_timm_module, name, register_model(_entrypoint(name)))


_register_all()

__all__ = ["VARIANTS", "CUSTOM", "TIMM_OWN", "DM_ACCURACY", "RANDAUG_LEVEL", "list_pretrained_names", "default_cfgs", "deepmind_crop_pct"]
