"""Building blocks of a normalizer-free network, with DeepMind's numerics (`nfnets/base.py`).

- `WSConv2d`: Scaled Weight Standardisation (paper eq. 2 with a learnable gain), SAME padding.
- `GammaAct`: a nonlinearity times the gamma that keeps unit variance for N(0, 1) inputs.
- `SqueezeExcite`: SE with plain ReLU and a 2 * sigmoid gate.
- `StochDepth`: drop a whole sample's residual branch, without 1/keep rescaling.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

# Gammas of DeepMind's `base.nonlinearities`: E[f(x)^2]^-1/2 for x ~ N(0, 1).
NONLINEARITY_GAMMA = {
    "identity": 1.0,
    "celu": 1.270926833152771,
    "elu": 1.2716004848480225,
    "gelu": 1.7015043497085571,
    "leaky_relu": 1.70590341091156,
    "log_sigmoid": 1.9193484783172607,
    "relu": 1.7139588594436646,
    "relu6": 1.7131484746932983,
    "selu": 1.0008515119552612,
    "sigmoid": 4.803835391998291,
    "silu": 1.7881293296813965,
    "soft_sign": 2.338853120803833,
    "softplus": 1.9203323125839233,
    "tanh": 1.5939117670059204,
}

# tanh-GELU through the identity 0.5 * (1 + tanh(z)) = sigmoid(2z): x * sigmoid(K * (x + C x^3)).
# On CPUs aten's tanh (and so gelu(approximate="tanh")) is several times slower than sigmoid;
# four passes (an addcmul, then in place) beat it 2x and agree with it to float rounding (5e-7).
_GELU_K = 2.0 * math.sqrt(2.0 / math.pi)
_GELU_C = 0.044715


def _gelu_gate(x: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """sigmoid(K x (1 + C x^2)), so that tanh-GELU(x) = x * gate; in `out` if given."""
    t = torch.addcmul(x.new_full((), _GELU_K), x, x, value=_GELU_K * _GELU_C, out=out)  # K + K C x^2
    return t.mul_(x).sigmoid_()


def _gelu_tanh_no_grad(x: torch.Tensor) -> torch.Tensor:
    return _gelu_gate(x).mul_(x)


# glibc's largest mmap threshold: a fresh buffer above it is page-faulted in anew each time (~10 ms
# for F0's 34 MB activations at batch 8, 256 px, float32), so there one buffer fewer is worth most.
_MMAP_THRESHOLD = 32 << 20


def _gelu_tanh_padded(x: torch.Tensor, pad: tuple[int, int, int, int]) -> torch.Tensor:
    """F.pad(gelu_tanh(x), pad) for float32, computed into the padded buffer: no fill, no copy.

    Strided elementwise kernels are slow on narrow rows, so only the last pass writes into the
    buffer, unless x is large enough that the temporary itself costs more (page faults).
    """
    left, right, top, bottom = pad
    n, c, h, w = x.shape
    buf = torch.empty((n, c, h + top + bottom, w + left + right), dtype=x.dtype, device=x.device,
                      memory_format=_memory_format(_channels_last(x)))
    buf[:, :, :top].zero_()
    buf[:, :, top + h:].zero_()
    buf[:, :, top:top + h, :left].zero_()
    buf[:, :, top:top + h, left + w:].zero_()
    inner = buf[:, :, top:top + h, left:left + w]
    large = x.numel() * x.element_size() >= _MMAP_THRESHOLD
    torch.mul(_gelu_gate(x, out=inner if large else None), x, out=inner)
    return buf


class _GeluTanh(torch.autograd.Function):
    """tanh-GELU: the sigmoid form forward, aten's backward; saves only the input, as aten's does."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return _gelu_tanh_no_grad(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return torch.ops.aten.gelu_backward(grad, x, approximate="tanh")  # aten's backward is fast


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


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """JAX's default GELU (the tanh approximation), fast on CPUs.

    bfloat16/float16 on CPUs use aten's erf GELU, 3.5x faster: on those dtypes the two forms agree
    to rounding (erf gives the correctly rounded tanh-GELU for 97.6% of bfloat16 inputs, the
    four-pass sigmoid form for 96.7%), and F0's logits are as close to DeepMind's float64 ones.
    """
    if torch.compiler.is_compiling():  # Inductor fuses this into one kernel, with exp instead of tanh
        return x * torch.sigmoid(x * (_GELU_K + _GELU_K * _GELU_C * x * x))
    if x.device.type != "cpu":
        return F.gelu(x, approximate="tanh")  # GPUs have a fast kernel for it
    if x.dtype in (torch.bfloat16, torch.float16):
        return F.gelu(x)
    if torch.is_grad_enabled() and x.requires_grad:
        return _GeluTanh.apply(x)
    return _gelu_tanh_no_grad(x)


# JAX's defaults: jax.nn.gelu is the tanh approximation; leaky_relu slope 0.01.
_NONLINEARITY_FN = {
    "identity": lambda x: x,
    "celu": F.celu,
    "elu": F.elu,
    "gelu": gelu_tanh,
    "leaky_relu": lambda x: F.leaky_relu(x, 0.01),
    "log_sigmoid": F.logsigmoid,
    "relu": F.relu,
    "relu6": F.relu6,
    "selu": F.selu,
    "sigmoid": torch.sigmoid,
    "silu": F.silu,
    "soft_sign": F.softsign,
    "softplus": F.softplus,
    "tanh": torch.tanh,
}


class GammaAct(nn.Module):
    """`f(x) * gamma`, DeepMind's scaled nonlinearity (tanh-approximate GELU by default).

    With `folded=True` the module computes `f(x)` alone and the gamma is applied by the next conv
    (`WSConv2d.input_scale`): one elementwise pass less, identical up to float rounding.
    """

    def __init__(self, activation: str = "gelu", folded: bool = False):
        super().__init__()
        if activation not in _NONLINEARITY_FN:
            raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(_NONLINEARITY_FN)}")
        self.activation = activation
        self.fn = _NONLINEARITY_FN[activation]
        self.gamma = NONLINEARITY_GAMMA[activation]
        self.folded = folded

    def forward(self, x: torch.Tensor, pad: Optional[tuple[int, int, int, int]] = None) -> torch.Tensor:
        """`f(x) * gamma`; with `pad` (F.pad's order) the result comes zero-padded for the next conv."""
        if pad is None:
            return self.fn(x) if self.folded else self.fn(x) * self.gamma
        if (self.fn is gelu_tanh and self.folded and x.device.type == "cpu" and x.dtype == torch.float32
                and not torch.compiler.is_compiling()):
            if torch.is_grad_enabled() and x.requires_grad:
                return _GeluTanhPadded.apply(x, pad)
            return _gelu_tanh_padded(x, pad)
        return F.pad(self(x), pad)

    def extra_repr(self) -> str:
        return f"{self.activation}, gamma={self.gamma}" + (" (folded into the next conv)" if self.folded else "")


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow/JAX 'SAME' padding (before, after) of one spatial dimension: extra pixel goes after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


# Attribute under which the standardisation leaves (version, mean, var * fan_in) of each unit on its
# weight; `adaptive_clip_grad_` turns them into the weight's unit norms instead of reading it again.
WS_STATS = "_nfnet_zoo_ws_stats"


def _channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


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
    """W_hat = (W - mean) * rsqrt(max(var * fan_in, eps)) * gain * input_scale, per output unit.

    Written out because autograd through var_mean and four elementwise ops costs a training step
    many passes over all weights; this takes four fast forward passes and aten's batch-norm backward. Statistics
    are order-free within a unit, so a channels_last weight is worked on in its own layout: its
    standardised weight and gradient stay channels_last, with no conversion in the conv or autograd.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, gain: torch.Tensor, input_scale: float, eps: float) -> torch.Tensor:
        channels_last = _channels_last(weight)
        w = _units(weight, channels_last)
        # Two-pass variance from fast kernels (aten's var_mean is ~10x slower on CPUs, vecdot 2x).
        mean = w.mean(1, keepdim=True)
        centered = w - mean
        var_n = torch.linalg.vector_norm(centered, 2, 1, keepdim=True).square_()  # var * fan_in
        if not torch.compiler.is_compiling():
            # AGC needs ||W_i||^2 = var_n + fan_in * mean^2: this pass has already read the weight.
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
    """The standardisation's gradient through aten's batch-norm backward: one fused kernel, 5-10x faster.

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
    # Checking for clamped units is free on CPUs only (elsewhere a sync; under compile data-dependent).
    if torch.compiler.is_compiling() or w.device.type != "cpu" or not bool(unclamped.all()):
        k = (gamma * invstd.square() * d_gamma / n).view(-1, 1) * ~unclamped  # gamma invstd^2 mean(dy xhat)
        d_w.addcmul_(w, k).sub_(k * mean)
    d_gain = (d_gamma * (ctx.input_scale / root_n)).view(ctx.gain_shape)
    return _as_weight(d_w, weight, ctx.channels_last), d_gain, None, None


class WSConv2d(nn.Conv2d):
    """Conv2d with Scaled Weight Standardisation and SAME padding, as DeepMind's `WSConv2D`.

    W_hat = gain * (W - mean(W)) / sqrt(max(var(W) * fan_in, eps)), statistics over (I, kH, kW) of
    each output unit with the biased variance; the bias is added after the convolution.
    Parameters (`weight` OIHW, `bias` (O,), `gain` (O, 1, 1, 1)) have timm's names and shapes.

    `input_scale` is a constant the input is multiplied by (an activation's gamma, a block's beta):
    it is folded into the per-unit scale of the standardisation, which costs nothing.

    In eval mode, when no gradient is wanted, the standardised weight (in the autocast dtype, if
    any) is computed once and reused until a parameter changes: in-place updates bump the tensor
    version, and `to()` or `load_state_dict` change it too. `train()` drops the cached copy.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1, eps: float = 1e-4):
        # Stride 1 pads symmetrically, so the conv pads itself; strided convs pad per input size.
        padding = (kernel_size - 1) // 2 if stride == 1 else 0
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         groups=groups, bias=True)
        self.gain = nn.Parameter(torch.ones(out_channels, 1, 1, 1))
        self.eps = eps
        self.input_scale = 1.0
        self._cache: tuple | None = None
        nn.init.kaiming_normal_(self.weight, nonlinearity="linear")  # haiku VarianceScaling(1, fan_in)
        nn.init.zeros_(self.bias)

    def train(self, mode: bool = True) -> "WSConv2d":
        self._cache = None
        return super().train(mode)

    def standardized_weight(self) -> torch.Tensor:
        return _WeightStandardization.apply(self.weight, self.gain, self.input_scale, self.eps)

    def _weight(self, x: torch.Tensor) -> torch.Tensor:
        w, g = self.weight, self.gain
        if (self.training or torch.compiler.is_compiling()
                or (torch.is_grad_enabled() and (w.requires_grad or g.requires_grad))):
            self._cache = None
            return self.standardized_weight()
        # Under autocast keep the weight in the dtype the conv will run in: no cast per call.
        autocast = x.device.type in ("cpu", "cuda", "xpu", "mps") and torch.is_autocast_enabled(x.device.type)
        dtype = torch.get_autocast_dtype(x.device.type) if autocast else w.dtype
        key = (w._version, g._version, w.data_ptr(), g.data_ptr(), w.dtype, w.device, dtype, self.input_scale)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self.standardized_weight().to(dtype))
        return self._cache[1]

    def _same_padding(self, x: torch.Tensor) -> tuple[int, int, int, int]:
        """SAME padding of a strided conv for this input, in F.pad's order (left, right, top, bottom)."""
        ph = same_padding(x.shape[-2], self.kernel_size[0], self.stride[0])
        pw = same_padding(x.shape[-1], self.kernel_size[1], self.stride[1])
        return pw[0], pw[1], ph[0], ph[1]

    def asymmetric_padding(self, x: torch.Tensor) -> Optional[tuple[int, int, int, int]]:
        """SAME padding in F.pad's order when it is uneven (a strided conv, some input sizes), else None."""
        if self.stride[0] == 1:
            return None
        pad = self._same_padding(x)
        return None if pad[0] == pad[1] and pad[2] == pad[3] else pad

    def forward(self, x: torch.Tensor, padded: bool = False) -> torch.Tensor:
        """The convolution; `padded=True`: `x` already carries its SAME padding (see `activate_and_conv`)."""
        weight = self._weight(x)
        if padded:
            return F.conv2d(x, weight, self.bias, self.stride, 0, 1, self.groups)
        if self.stride[0] == 1:
            return F.conv2d(x, weight, self.bias, 1, self.padding, 1, self.groups)
        left, right, top, bottom = self._same_padding(x)
        if left == right and top == bottom:  # even padding: the conv pads itself
            return F.conv2d(x, weight, self.bias, self.stride, (top, left), 1, self.groups)
        return F.conv2d(F.pad(x, (left, right, top, bottom)), weight, self.bias, self.stride, 0, 1, self.groups)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", padding=SAME, standardized"


def activate_and_conv(act: GammaAct, conv: WSConv2d, x: torch.Tensor) -> torch.Tensor:
    """conv(act(x)); where the conv's SAME padding is uneven, the activation writes the padded input."""
    pad = conv.asymmetric_padding(x)
    return conv(act(x)) if pad is None else conv(act(x, pad=pad), padded=True)


def spatial_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over height and width, as (N, C).

    bfloat16/float16 on CPUs go through a matmul with ones (fp32 accumulation): aten's reduction
    first copies the whole tensor to float32, up to 20x slower.
    """
    if x.dtype not in (torch.bfloat16, torch.float16) or x.device.type != "cpu" or torch.compiler.is_compiling():
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


class _AvgPool2x2(torch.autograd.Function):
    """2x2 average pool, stride 2, of an even-sized NCHW tensor: aten's NCHW kernel is 3-4x slower."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q = x.view(n, c, h // 2, 2, w // 2, 2)
        rows = q[:, :, :, 0] + q[:, :, :, 1]
        return (rows[..., 0] + rows[..., 1]).mul_(0.25)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        n, c, h, w = grad.shape
        return (grad * 0.25)[:, :, :, None, :, None].expand(n, c, h, 2, w, 2).reshape(n, c, 2 * h, 2 * w)


def avg_pool_same(x: torch.Tensor) -> torch.Tensor:
    """2x2 average pool, stride 2, SAME: windows at an odd edge average only the real pixels."""
    if (x.device.type == "cpu" and x.shape[-2] % 2 == 0 and x.shape[-1] % 2 == 0 and x.is_contiguous()
            and not torch.compiler.is_compiling()):
        return _AvgPool2x2.apply(x)
    return F.avg_pool2d(x, 2, 2, ceil_mode=True, count_include_pad=False)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excite with plain ReLU; returns the gate 2 * sigmoid(.) (the 2 keeps variance)."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        # 1x1 convs hold the weights (timm's key names and (out, in, 1, 1) shapes); they run as linears
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(F.linear(spatial_mean(x), self.fc1.weight.flatten(1), self.fc1.bias))
        return (2.0 * torch.sigmoid(F.linear(h, self.fc2.weight.flatten(1), self.fc2.bias)))[:, :, None, None]


class StochDepth(nn.Module):
    """Keep or drop each sample's residual branch with probability 1 - rate; no 1/keep rescaling."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate <= 0.0:
            return x
        keep = 1.0 - self.rate
        mask = torch.floor(keep + torch.rand((x.shape[0], 1, 1, 1), dtype=x.dtype, device=x.device))
        return x * mask

    def extra_repr(self) -> str:
        return f"rate={self.rate:.4f}"


def hidden_width(channels: int, ratio: float) -> int:
    """SE hidden width as DeepMind computes it: int(channels * ratio), at least 1."""
    return max(1, int(channels * ratio))


def bottleneck_width(out_ch: int, in_ch: int, expansion: float, group_width: int, big_width: bool) -> int:
    """Grouped-conv width: int(width * expansion) rounded DOWN to a multiple of the group width."""
    width = int((out_ch if big_width else in_ch) * expansion)
    return group_width * max(1, width // group_width)


__all__ = ["GammaAct", "gelu_tanh", "WSConv2d", "SqueezeExcite", "StochDepth", "same_padding",
           "activate_and_conv", "spatial_mean", "avg_pool_same", "NONLINEARITY_GAMMA", "hidden_width",
           "bottleneck_width"]
