"""nfnet-zoo: DeepMind-faithful NFNets in timm's model factory.

Importing this package registers the NFNet variants with timm (it imports timm to do so), so that
`timm.create_model("nfnet_f1", pretrained=True)` builds DeepMind's F1 with its ImageNet weights.
The other public names load their module on first use (PEP 562): training, the Hub and the data
pipeline cost nothing until called.
"""
from __future__ import annotations

import importlib

from .errors import NFNetZooError
from .models import variants as _variants  # registers the variants with timm

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "NFNet": "models.nfnet", "NFNetCfg": "models.nfnet",
    "VARIANTS": "models.variants", "DM_ACCURACY": "models.variants", "list_pretrained_names": "models.variants",
    "convert_haiku_checkpoint": "models.convert", "load_haiku_checkpoint": "models.convert",
    "optimize_for_inference": "models.inference", "fast_kernels": "models.inference", "load_model": "models.load",
    "AGCStats": "agc", "adaptive_clip_grad_": "agc", "clipped_parameters": "agc", "weight_decay_groups": "agc",
    "assert_agc_supported": "agc_distributed", "prepare_for_fsdp2": "agc_distributed",
    "unscale_and_clip_": "agc_distributed",
    "push_to_hub": "hub.push", "publish_checkpoint": "hub.push", "PushResult": "hub.push",
    "write_model_card": "models.cards", "write_zoo_cards": "models.cards",
    "finetune": "training.finetune", "FinetuneConfig": "training.recipe",
    "evaluate": "evaluation", "predict": "evaluation", "iter_predictions": "evaluation",
    "export_model": "export",
}
__all__ = ["NFNetZooError", *_PUBLIC]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
