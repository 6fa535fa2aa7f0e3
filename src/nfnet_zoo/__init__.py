"""nfnet-zoo: DeepMind-faithful NFNets in timm's model factory.

Importing this package registers the NFNet variants with timm, so that
`timm.create_model("nfnet_f1", pretrained=True)` builds DeepMind's F1 with its ImageNet weights.

The import itself is light (no torch, timm, PIL or huggingface_hub), so that `nfnet-zoo --help`
answers at once: the public names below load their module on first use, and the registration runs
now if timm is already imported, else right after `import timm` (timm's registry cannot be read
before that).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types

from .errors import NFNetZooError

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "NFNet": "nfnet", "NFNetCfg": "nfnet",
    "VARIANTS": "variants", "DM_ACCURACY": "variants", "list_pretrained_names": "variants",
    "convert_haiku_checkpoint": "convert", "load_haiku_checkpoint": "convert",
    "optimize_for_inference": "inference", "fast_kernels": "cpu_kernels",
    "AGCStats": "agc", "adaptive_clip_grad_": "agc", "assert_agc_supported": "agc", "clipped_parameters": "agc",
    "prepare_for_fsdp2": "agc", "unscale_and_clip_": "agc", "weight_decay_groups": "agc",
    "push_to_hub": "hub", "publish_checkpoint": "hub", "PushResult": "hub", "write_model_card": "hub",
    "write_zoo_cards": "hub",
    "finetune": "finetune", "FinetuneConfig": "recipe", "evaluate": "evaluate", "predict": "evaluate",
    "load_model": "evaluate",
}
__all__ = ["NFNetZooError", *_PUBLIC]
_REGISTRY_MODULE = "variants"  # importing it registers the variants with timm


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


class _Package(types.ModuleType):
    # `finetune` and `evaluate` name both a submodule and its function; importing the submodule sets the
    # package attribute to the module, and the function must stay what `nfnet_zoo.finetune` is.
    def __setattr__(self, name: str, value) -> None:
        if name in ("finetune", "evaluate") and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


class _RegisterAfterTimm(importlib.abc.MetaPathFinder):
    """Hands out timm's spec (found by the other finders) with a loader that registers the variants
    right after timm has run; availability checks (`importlib.util.find_spec("timm")`) import nothing."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "timm":
            return None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                        spec.loader = _RegisteringLoader(spec.loader)
                    return spec
        return None


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        module.__loader__ = module.__spec__.loader = self.loader  # timm sees its own loader
        self.loader.exec_module(module)
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisterAfterTimm)]
        importlib.import_module(f"{__name__}.{_REGISTRY_MODULE}")


if "timm" in sys.modules:
    importlib.import_module(f"{__name__}.{_REGISTRY_MODULE}")
elif not any(isinstance(f, _RegisterAfterTimm) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTimm())
