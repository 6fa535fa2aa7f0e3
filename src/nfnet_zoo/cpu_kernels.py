"""CPU kernels: the reference layers' computation with fewer passes over memory, behind one switch.

`layers.py` and `nfnet.py` are the reference: plain PyTorch ops, what GPUs, `torch.compile`, FX,
TorchScript, `torch.func` and `torch.export` run. On a CPU in plain eager mode the modules hand
their forward to the functions below, which compute the same (to float rounding) faster.
`active(x)` is the one place that decides; `fast_kernels(False)` or `NFNET_ZOO_FAST_KERNELS=0`
turns them all off.

Gains beside each kernel: kernel vs the reference computation it replaces, on F0-sized tensors
(batch 8, 256 px), medians of 9 interleaved rounds on 2 shared cores (torch 2.14.1):
`PYTHONPATH=src python benchmarks/bench_kernels.py`.
"""
from __future__ import annotations

import math
import os
import threading
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import _symbolic_trace
from torch.utils._python_dispatch import _get_current_dispatch_mode

# FX symbolic tracing (is_fx_tracing also answers for torch.export, and logs a warning saying so).
_fx_tracing = getattr(_symbolic_trace, "is_fx_symbolic_tracing", _symbolic_trace.is_fx_tracing)
_exporting = getattr(torch.compiler, "is_exporting", lambda: False)  # older torch: export shows as fake tensors
_ENABLED = os.environ.get("NFNET_ZOO_FAST_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


class fast_kernels:
    """Turn the CPU kernels on or off: `fast_kernels(False)` for good, or `with fast_kernels(False): ...`.

    Off, every device runs the reference layers (for debugging, and for tests of both paths).
    The environment variable `NFNET_ZOO_FAST_KERNELS=0` sets the initial state. Process-wide.
    """

    def __init__(self, enabled: bool):
        global _ENABLED
        self.previous, _ENABLED = _ENABLED, bool(enabled)

    def __enter__(self) -> "fast_kernels":
        return self

    def __exit__(self, *exc) -> None:
        global _ENABLED
        _ENABLED = self.previous


def enabled() -> bool:
    """Whether the CPU kernels are switched on (they still run only where `active` allows)."""
    return _ENABLED


def active(x: torch.Tensor) -> bool:
    """The one choice: fast kernels for this input, or the reference layers.

    Every tracer and transform is ruled out before `x` is looked at, so that tracing never meets
    data-dependent control flow; then only plain CPU tensors qualify.
    """
    if (not _ENABLED or _fx_tracing() or torch.jit.is_tracing() or torch.compiler.is_compiling()
            or _exporting() or torch._C._are_functorch_transforms_active()
            or _get_current_dispatch_mode() is not None):
        return False
    return type(x) is torch.Tensor and x.device.type == "cpu"


def _hooked(module: nn.Module) -> bool:
    """Whether a hook could see inside `module`: fused kernels would change what it sees or holds."""
    g = torch.nn.modules.module
    if (g._global_forward_hooks or g._global_forward_pre_hooks or g._global_backward_hooks
            or g._global_backward_pre_hooks):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
               for m in module.modules())


def _autograd(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


# Dropped after measuring on torch 2.14 (benchmarks/bench_kernels.py, medians of 9 interleaved
# rounds): the sigmoid-form tanh-GELU (0.17x: aten's tanh-GELU is vectorised now), the erf GELU
# for bf16 (0.8x-3.6x from round to round: no steady gain, and it left DeepMind's tanh form), and
# the 2x2 average pool (0.98x forward, 1.14x forward+backward, ranges across 1).


def _activation(act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """f(x) of a `GammaAct`, without its gamma (the caller folds the gamma into the next conv)."""
    return act.act(x)


# --- the padded activation: 1.46x on F.pad(GELU(x)), 1.09x with its strided conv (8x256x64x64) -------
# Where SAME padding is uneven (strided convs on even sizes), F.pad costs a fill and a copy of the
# whole activation; the GELU writes straight into the padded buffer instead.
def _channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def _gelu_tanh_padded(x: torch.Tensor, pad: tuple[int, int, int, int]) -> torch.Tensor:
    """F.pad(tanh-GELU(x), pad), computed into the padded buffer: no fill, no copy."""
    left, right, top, bottom = pad
    n, c, h, w = x.shape
    buf = torch.empty((n, c, h + top + bottom, w + left + right), dtype=x.dtype, device=x.device,
                      memory_format=_memory_format(_channels_last(x)))
    buf[:, :, :top].zero_()
    buf[:, :, top + h:].zero_()
    buf[:, :, top:top + h, :left].zero_()
    buf[:, :, top:top + h, left + w:].zero_()
    torch.ops.aten.gelu.out(x, approximate="tanh", out=buf[:, :, top:top + h, left:left + w])
    return buf


class _GeluTanhPadded(torch.autograd.Function):
    """F.pad(tanh-GELU(x), pad) written into one buffer (see `_gelu_tanh_padded`); aten's backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, pad: tuple[int, int, int, int]) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.pad = pad
        return _gelu_tanh_padded(x, pad)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        left, _, top, _ = ctx.pad
        # A contiguous copy first: aten's gelu_backward on the strided view is 5-10x slower.
        inner = grad[:, :, top:top + x.shape[2], left:left + x.shape[3]].contiguous(
            memory_format=_memory_format(_channels_last(x)))
        return torch.ops.aten.gelu_backward(inner, x, approximate="tanh"), None


def _same_pad(conv: nn.Conv2d, x: torch.Tensor) -> tuple[int, int, int, int]:
    from .layers import same_padding

    ph = same_padding(x.shape[-2], conv.kernel_size[0], conv.stride[0])
    pw = same_padding(x.shape[-1], conv.kernel_size[1], conv.stride[1])
    return pw[0], pw[1], ph[0], ph[1]


def _act_conv(act: nn.Module, conv: nn.Conv2d, x: torch.Tensor, scale: float) -> torch.Tensor:
    """conv(gamma * f(x)) with gamma folded into the conv (`scale`); uneven SAME padding written by the GELU."""
    if conv.stride[0] > 1 and act.activation == "gelu":
        pad = _same_pad(conv, x)
        if pad[0] != pad[1] or pad[2] != pad[3]:
            buf = _GeluTanhPadded.apply(x, pad) if _autograd(x) else _gelu_tanh_padded(x, pad)
            return ws_conv2d(conv, buf, scale, padded=True)
    return ws_conv2d(conv, _activation(act, x), scale)


# --- the standardisation's fused backward: 2.5x (768x128x3x3) to 3.0x (1536x768x1x1) forward+backward ---
# Attribute under which the standardisation leaves (version, mean, var * fan_in) of each unit on its
# weight; `adaptive_clip_grad_` turns them into the weight's unit norms instead of reading it again
# (1.27x on AGC over F0's parameters, noisy: 0.5x-3.8x from round to round).
WS_STATS = "_nfnet_zoo_ws_stats"


def _units(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A weight-shaped tensor as (units, fan_in) rows in its own memory order: a view, never a copy."""
    return (t.permute(0, 2, 3, 1) if channels_last else t).reshape(t.shape[0], -1)


def _as_weight(rows: torch.Tensor, like: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """Inverse of `_units`: the result has `like`'s shape and memory format."""
    if channels_last:
        o, i, kh, kw = like.shape
        return rows.view(o, kh, kw, i).permute(0, 3, 1, 2)
    return rows.view_as(like)


class _WeightStandardization(torch.autograd.Function):
    """`layers.standardize_weight` times `input_scale`, with a fused backward.

    Four fast forward passes (aten's var_mean is ~10x slower on CPUs) and aten's batch-norm backward
    instead of autograd through var_mean and four elementwise ops. Statistics are order-free within
    a unit, so a channels_last weight is worked on in its own layout. The forward leaves each unit's
    statistics on the weight for AGC (`WS_STATS`): ||W_i||^2 = var_i * n + n * mean_i^2.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, gain: torch.Tensor, input_scale: float, eps: float) -> torch.Tensor:
        channels_last = _channels_last(weight)
        w = _units(weight, channels_last)
        mean = w.mean(1, keepdim=True)
        centered = w - mean
        var_n = torch.linalg.vector_norm(centered, 2, 1, keepdim=True).square_()  # var * fan_in
        setattr(weight, WS_STATS, (weight._version, mean, var_n))
        rstd = torch.rsqrt(torch.clamp(var_n, min=eps))
        g = gain.reshape(-1, 1) * input_scale
        ctx.save_for_backward(weight, mean, rstd, g, var_n >= eps)
        ctx.input_scale, ctx.gain_shape, ctx.channels_last = input_scale, gain.shape, channels_last
        return _as_weight(centered.mul_(rstd * g), weight, channels_last)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, mean, rstd, g, unclamped = ctx.saved_tensors
        channels_last = ctx.channels_last
        if _channels_last(grad) != channels_last:  # rows of both must list a unit in the same order
            grad = grad.contiguous(memory_format=_memory_format(channels_last))
        w, dy = _units(weight, channels_last), _units(grad, channels_last)
        n = w.shape[1]
        if w.dtype in (torch.float32, torch.float64):
            return _bn_backward(ctx, weight, w, dy, mean, rstd, g, unclamped)
        sum_dy = dy.sum(1, keepdim=True)
        sum_dy_xc = torch.linalg.vecdot(dy, w).unsqueeze(1) - mean * sum_dy  # sum dy * (w - mean)
        d_gain = (sum_dy_xc * rstd * ctx.input_scale).view(ctx.gain_shape)
        # d/dw of g * (w - mean) * (sum (w - mean)^2)^-1/2; the variance term vanishes where clamped.
        a = g * rstd
        b = -(a * rstd.square() * sum_dy_xc) * unclamped
        c = -a * sum_dy / n - b * mean
        d_weight = torch.addcmul(c, w, b).addcmul_(dy, a)
        return _as_weight(d_weight, weight, channels_last), d_gain, None, None


def _bn_backward(ctx, weight, w, dy, mean, rstd, g, unclamped):
    """The standardisation's gradient through aten's batch-norm backward: one fused kernel.

    W_hat = gamma * (w - mean) * invstd per unit, with gamma = g / sqrt(n) and invstd = rstd * sqrt(n),
    is batch norm over each unit's n values. Where var * n is clamped to eps, invstd is a constant,
    so the variance term batch norm's gradient subtracts is added back.
    """
    n = w.shape[1]
    root_n = math.sqrt(n)
    gamma, invstd = (g / root_n).view(-1), (rstd * root_n).view(-1)
    d_w, d_gamma, _ = torch.ops.aten.native_batch_norm_backward(
        dy.unsqueeze(0), w.unsqueeze(0), gamma, None, None, mean.view(-1), invstd, True, 0.0, [True, True, False])
    d_w = d_w.squeeze(0)
    if not bool(unclamped.all()):  # free on the CPU
        k = (gamma * invstd.square() * d_gamma / n).view(-1, 1) * ~unclamped  # gamma invstd^2 mean(dy xhat)
        d_w.addcmul_(w, k).sub_(k * mean)
    d_gain = (d_gamma * (ctx.input_scale / root_n)).view(ctx.gain_shape)
    return _as_weight(d_w, weight, ctx.channels_last), d_gain, None, None


# --- the eval-mode cache of standardised weights: 1.6x on a grouped 3x3 conv (8x768x16x16, no grad) ---
# Per conv, one entry per (autocast dtype, input scale): serving threads with different autocast
# dtypes do not evict each other. An entry is valid while both parameters have the same storage,
# version, shape and dtype: in-place updates bump the version, `p.data = t` and `to()` change the
# storage; it keeps the old tensors alive, so their storage cannot be reused at the same address.
_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
_CACHE_LOCK = threading.Lock()


def _state(t: torch.Tensor) -> tuple:
    return t.data_ptr(), t._version, t.dtype, t.device, t.shape, t.stride()


def _cached_weight(conv: nn.Conv2d, x: torch.Tensor, input_scale: float) -> torch.Tensor:
    w, g = conv.weight, conv.gain
    autocast = torch.is_autocast_enabled("cpu")
    dtype = torch.get_autocast_dtype("cpu") if autocast and w.dtype == torch.float32 else w.dtype
    slot, state = (dtype, input_scale), (_state(w), _state(g))
    with _CACHE_LOCK:
        entry = _CACHE.setdefault(conv, {}).get(slot)
    if entry is not None and entry[0] == state:
        value = entry[3]
        # A weight made under inference_mode cannot be saved for backward (an input needing gradients).
        if not (value.is_inference() and torch.is_grad_enabled() and not torch.is_inference_mode_enabled()):
            return value
    with torch.no_grad():
        value = _WeightStandardization.apply(w, g, input_scale, conv.eps).to(dtype)
    with _CACHE_LOCK:
        _CACHE.setdefault(conv, {})[slot] = (state, w.detach(), g.detach(), value)
    return value


def clear_cache(conv: nn.Module) -> None:
    """Drop `conv`'s cached standardised weights (training mode does, as it changes the weights)."""
    with _CACHE_LOCK:
        _CACHE.pop(conv, None)


def cache_entries(conv: nn.Module) -> list[torch.Tensor]:
    """The standardised weights cached for `conv` (for tests and memory accounting)."""
    with _CACHE_LOCK:
        return [entry[3] for entry in _CACHE.get(conv, {}).values()]


def ws_conv2d(conv: nn.Conv2d, x: torch.Tensor, input_scale: float = 1.0, padded: bool = False) -> torch.Tensor:
    """`WSConv2d.forward` on `input_scale * x`; `padded`: `x` already carries its SAME padding."""
    if conv.training or _autograd(conv.weight, conv.gain):
        clear_cache(conv)
        weight = _WeightStandardization.apply(conv.weight, conv.gain, input_scale, conv.eps)
    else:
        weight = _cached_weight(conv, x, input_scale)
    if padded or conv.stride[0] == 1:
        return F.conv2d(x, weight, conv.bias, conv.stride, 0 if padded else conv.padding, 1, conv.groups)
    left, right, top, bottom = _same_pad(conv, x)
    if left == right and top == bottom:  # even padding: the conv pads itself
        return F.conv2d(x, weight, conv.bias, conv.stride, (top, left), 1, conv.groups)
    return F.conv2d(F.pad(x, (left, right, top, bottom)), weight, conv.bias, conv.stride, 0, 1, conv.groups)


# --- bf16 spatial mean: 2.1x on the SE's squeeze (bf16, 8x1536x16x16) ------------------------------
def _spatial_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over height and width as (N, C); bfloat16/float16 through a matmul with ones (fp32
    accumulation): aten's reduction first copies the whole tensor to float32, up to 20x slower."""
    if x.dtype not in (torch.bfloat16, torch.float16):
        return x.mean((2, 3))
    n, c, h, w = x.shape
    ones = x.new_ones(h * w)
    if x.is_contiguous():
        total = torch.matmul(x.view(n, c, h * w), ones)
    elif x.is_contiguous(memory_format=torch.channels_last):
        total = torch.matmul(ones, x.permute(0, 2, 3, 1).reshape(n, h * w, c))
    else:
        return x.mean((2, 3))
    return total * (1.0 / (h * w))


def _squeeze_excite(se: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`SqueezeExcite.forward` as (N, C, 1, 1): the 1x1 convs run as linears on the (N, C) mean."""
    h = F.relu(F.linear(_spatial_mean(x), se.fc1.weight.flatten(1), se.fc1.bias))
    return (2.0 * torch.sigmoid(F.linear(h, se.fc2.weight.flatten(1), se.fc2.bias)))[:, :, None, None]


# --- the residual: 2.3x without grad (in place), 2.0x forward+backward (8x1536x16x16) ---------------
class _Residual(torch.autograd.Function):
    """shortcut + out * gate, gate (N, C, 1, 1): addcmul's own backward spends a full pass on out * 1."""

    @staticmethod
    def forward(ctx, shortcut: torch.Tensor, out: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(out, gate)
        return torch.addcmul(shortcut, out, gate)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out, gate = ctx.saved_tensors
        d_out = grad * gate if ctx.needs_input_grad[1] else None
        d_gate = (grad * out).sum((2, 3), keepdim=True) if ctx.needs_input_grad[2] else None
        return grad, d_out, d_gate


def _residual(shortcut: torch.Tensor, out: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    if _autograd(shortcut, out, gate):
        return _Residual.apply(shortcut, out, gate)
    # No autograd and no hook (see `nf_block`): conv3's fresh output is ours to overwrite.
    return torch.addcmul(shortcut, out, gate, out=out)


# --- whole blocks: gammas and beta folded into the next conv's standardisation (free) -----------------
def nf_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`NFBlock.forward`; the caller has checked that no hook looks inside the block."""
    from .layers import avg_pool_same  # layers imports this module

    gamma = block.act1.gamma
    out = _activation(block.act1, x)  # times gamma * beta: applied by conv1 and the shortcut conv
    scale = gamma * block.beta
    shortcut = x
    if block.downsample is not None:
        pooled = avg_pool_same(out) if block.downsample.stride > 1 else out
        shortcut = ws_conv2d(block.downsample.conv, pooled, scale)
    out = ws_conv2d(block.conv1, out, scale)
    out = _act_conv(block.act2, block.conv2, out, gamma)
    if block.conv2b is not None:
        out = ws_conv2d(block.conv2b, _activation(block.act2b, out), gamma)
    out = ws_conv2d(block.conv3, _activation(block.act3, out), gamma)
    # SE gate, stochastic depth (per sample), skip gain and alpha are all per (sample, channel):
    # combined on the small gate, then one fused multiply-add on the full tensor.
    gate = block.drop_path(_squeeze_excite(block.attn_last, out)) * (block.skipinit_gain * block.alpha)
    return _residual(shortcut, out, gate)


def stem(layers: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The stem (conv, then (activation, conv) pairs) with each activation's gamma folded into its conv."""
    x = ws_conv2d(layers[0], x)
    for i in range(1, len(layers), 2):
        act = layers[i]
        x = _act_conv(act, layers[i + 1], x, act.gamma)
    return x


def block_active(block: nn.Module, x: torch.Tensor) -> bool:
    """Whether a whole block or stem may run fused: `active(x)` and no hook to see its insides."""
    return active(x) and not _hooked(block)


__all__ = ["fast_kernels", "enabled", "active", "block_active", "WS_STATS"]
