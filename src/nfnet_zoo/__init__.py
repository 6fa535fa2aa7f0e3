"""nfnet-zoo: DeepMind-faithful NFNets in timm's model factory.

Importing this package registers the NFNet variants with timm, so that
`timm.create_model("nfnet_f1", pretrained=True)` builds DeepMind's F1 with its ImageNet weights.
"""
from .agc import (AGCStats, adaptive_clip_grad_, assert_agc_supported, clipped_parameters,
                  prepare_for_fsdp2, unscale_and_clip_, weight_decay_groups)
from .cpu_kernels import fast_kernels
from .convert import convert_haiku_checkpoint, load_haiku_checkpoint
from .errors import NFNetZooError
from .inference import optimize_for_inference
from .finetune import FinetuneConfig, evaluate, finetune, predict
from .hub import PushResult, publish_checkpoint, push_to_hub, write_model_card, write_zoo_cards
from .nfnet import NFNet, NFNetCfg
from .variants import DM_ACCURACY, VARIANTS, list_pretrained_names

__version__ = "0.1.0"

__all__ = ["NFNet", "NFNetCfg", "NFNetZooError", "VARIANTS", "DM_ACCURACY", "list_pretrained_names",
           "convert_haiku_checkpoint", "load_haiku_checkpoint", "optimize_for_inference", "fast_kernels",
           "AGCStats", "adaptive_clip_grad_", "assert_agc_supported", "clipped_parameters",
           "prepare_for_fsdp2", "unscale_and_clip_", "weight_decay_groups",
           "push_to_hub", "publish_checkpoint", "PushResult", "write_model_card", "write_zoo_cards",
           "finetune", "FinetuneConfig", "evaluate", "predict"]
