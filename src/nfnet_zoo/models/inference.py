"""`optimize_for_inference`: one call that prepares an NFNet (or any timm model) for serving.

The one speed path of the package. A `WSConv2d` standardises its weight on every forward pass; a
served model's weights do not change, so the copy returned here holds each standardised weight,
computed once by the reference's own `standardize_weight`: the same convolution on the same
values, hence the same bits as the model it came from (tests/test_model.py). Its gain on this
machine is measured by `make bench` (BENCHMARKS.md, "The speed path on and off").
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .layers import WSConv2d, pad_same


class StandardizedConv2d(nn.Conv2d):
    """A `WSConv2d` with its standardised weight computed once, for serving: `weight` holds
    gain * standardise(W); no `gain` parameter. Convolves exactly as `WSConv2d` does."""

    @classmethod
    @torch.no_grad()
    def from_ws_conv(cls, conv: WSConv2d) -> "StandardizedConv2d":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "transposed",
                     "output_padding", "groups", "padding_mode", "_reversed_padding_repeated_twice"):
            setattr(new, name, getattr(conv, name))
        weight = conv.standardized_weight()
        new.weight = nn.Parameter(weight.contiguous(memory_format=_format_of(conv.weight)), requires_grad=False)
        new.bias = conv.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] > 1:
            x = pad_same(x, self.kernel_size[0], self.stride[0])
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", padding=SAME, standardized once"


def _format_of(t: torch.Tensor) -> torch.memory_format:
    channels_last = t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format


def standardize_once(model: nn.Module) -> nn.Module:
    """A copy of `model` for inference whose `WSConv2d`s are `StandardizedConv2d`s; the copy shares every
    other parameter and buffer with `model`, which is left as it was (and stays trainable)."""
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    served = copy.deepcopy(model, memo=dict(shared))
    for parent in served.modules():
        for name, child in parent.named_children():
            if isinstance(child, WSConv2d):
                setattr(parent, name, StandardizedConv2d.from_ws_conv(child))
    return served.eval()


class _Prepared(nn.Module):
    """Runs the model without autograd, in the chosen memory format and autocast dtype; float32 out.

    No-grad is entered here, outside the compiled region: Inductor decides whether to freeze
    (fold constants) from the grad mode and its `freezing` setting at the time it compiles, which
    is the call (`torch.compile(options=...)` does not reach it).
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

    - eval mode, parameters frozen (`requires_grad=False`), and the returned module runs under
      `torch.no_grad()`;
    - channels_last memory format (faster convolutions on CPUs and GPUs), inputs converted for you;
    - every `WSConv2d`'s standardised weight computed once (`standardize_once`): the returned module
      holds a copy of the conv weights (the rest is shared with `model`) and gives the bits `model`
      gives in the same memory format and dtype;
    - `dtype=torch.bfloat16` (or float16 on GPUs): autocast, weights standardised in float32;
    - `compile=True`: `torch.compile` with Inductor's freezing, which folds the weights into constants.
    The returned module gives no gradients: for saliency maps call `model` itself. Its weights are a
    snapshot: after changing `model`'s, call this again. `model.train()` (and `requires_grad_(True)`)
    makes `model` trainable again.
    """
    model.eval().requires_grad_(False)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    served = standardize_once(model)
    if compile:
        served = torch.compile(served)
    return _Prepared(served, channels_last, dtype, freeze=compile)


class fast_kernels:
    """Deprecated, does nothing: the CPU kernels it switched were removed in 0.2, so that every runtime
    gives the reference's bits (BENCHMARKS.md says what they had bought). Kept so old code still runs."""

    def __init__(self, enabled: bool):
        warnings.warn("nfnet_zoo.fast_kernels does nothing since 0.2: the CPU kernels were removed; "
                      "optimize_for_inference is the speed path", DeprecationWarning, stacklevel=2)

    def __enter__(self) -> "fast_kernels":
        return self

    def __exit__(self, *exc) -> None:
        return None


__all__ = ["optimize_for_inference", "standardize_once", "StandardizedConv2d", "fast_kernels"]
