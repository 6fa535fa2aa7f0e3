"""`optimize_for_inference`: one call that prepares an NFNet (or any timm model) for serving."""
from __future__ import annotations

from typing import Optional

import contextlib

import torch
from torch import nn


class _Prepared(nn.Module):
    """Runs the model without autograd, in the chosen memory format and autocast dtype; float32 out.

    No-grad is entered here, outside the compiled region: Inductor decides whether to freeze
    (fold the weight standardisation into constants) from the grad mode and its `freezing` setting
    at the time it compiles, which is the call (`torch.compile(options=...)` does not reach it).
    """

    def __init__(self, model: nn.Module, channels_last: bool, dtype: Optional[torch.dtype], freeze: bool):
        super().__init__()
        self.model, self.channels_last, self.dtype, self.freeze = model, channels_last, dtype, freeze

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        freezing = contextlib.nullcontext()
        if self.freeze:
            from torch._inductor import config as inductor_config

            freezing = inductor_config.patch(freezing=True)
        with torch.no_grad(), freezing, torch.autocast(x.device.type, dtype=self.dtype or torch.float32,
                                                       enabled=self.dtype is not None):
            out = self.model(x)
        return out.float()


def optimize_for_inference(model: nn.Module, *, channels_last: bool = True,
                           dtype: Optional[torch.dtype] = None, compile: bool = False) -> nn.Module:
    """Prepare `model` for inference in one call and return the module to call.

    - eval mode with parameters frozen (`requires_grad=False`), and the returned module runs under
      `torch.no_grad()`: on a CPU the standardised weights of every `WSConv2d` are computed once
      and cached;
    - channels_last memory format (faster convolutions on CPUs and GPUs), inputs converted for you;
    - `dtype=torch.bfloat16` (or float16 on GPUs): autocast, with weights standardised in float32
      and cached in the low precision once;
    - `compile=True`: `torch.compile` with Inductor's freezing, which folds the weight
      standardisation into constants.
    The returned module gives no gradients: for saliency maps call `model` itself. Without
    `compile`, changing the weights afterwards is safe (the cache notices); with it, the weights are
    baked into the compiled graph: call this again after changing them. `model.train()` (and
    `requires_grad_(True)`) makes the model trainable again.
    """
    model.eval().requires_grad_(False)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        model = torch.compile(model)
    return _Prepared(model, channels_last, dtype, freeze=compile)
