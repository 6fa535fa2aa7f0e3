"""Building blocks of a normalizer-free network, with DeepMind's numerics (`nfnets/base.py`).

- `WSConv2d`: Scaled Weight Standardisation (paper eq. 2 with a learnable gain), SAME padding.
- `GammaAct`: a nonlinearity times the gamma that keeps unit variance for N(0, 1) inputs.
- `SqueezeExcite`: SE with plain ReLU and a 2 * sigmoid gate.
- `StochDepth`: drop a whole sample's residual branch, without 1/keep rescaling.
"""
from __future__ import annotations

import math

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


def _gelu_tanh_no_grad(x: torch.Tensor) -> torch.Tensor:
    t = torch.addcmul(x.new_full((), _GELU_K), x, x, value=_GELU_K * _GELU_C)  # K + K C x^2
    return t.mul_(x).sigmoid_().mul_(x)


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


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """JAX's default GELU (the tanh approximation), fast on CPUs."""
    if torch.compiler.is_compiling():  # Inductor fuses this into one kernel, with exp instead of tanh
        return x * torch.sigmoid(x * (_GELU_K + _GELU_K * _GELU_C * x * x))
    if x.device.type != "cpu":
        return F.gelu(x, approximate="tanh")  # GPUs have a fast kernel for it
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) if self.folded else self.fn(x) * self.gamma

    def extra_repr(self) -> str:
        return f"{self.activation}, gamma={self.gamma}" + (" (folded into the next conv)" if self.folded else "")


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow/JAX 'SAME' padding (before, after) of one spatial dimension: extra pixel goes after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class _WeightStandardization(torch.autograd.Function):
    """W_hat = (W - mean) * rsqrt(max(var * fan_in, eps)) * gain * input_scale, per output unit.

    Written out because autograd through var_mean and four elementwise ops costs a training step
    many passes over all weights; this takes four fast forward and four backward passes.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, gain: torch.Tensor, input_scale: float, eps: float) -> torch.Tensor:
        w = weight.reshape(weight.shape[0], -1)
        # Two-pass variance from fast kernels (aten's var_mean is ~10x slower on CPUs).
        mean = w.mean(1, keepdim=True)
        centered = w - mean
        var_n = torch.linalg.vecdot(centered, centered).unsqueeze(1)  # var * fan_in
        rstd = torch.rsqrt(torch.clamp(var_n, min=eps))
        g = gain.reshape(-1, 1) * input_scale
        ctx.save_for_backward(weight, mean, rstd, g, var_n >= eps)
        ctx.input_scale, ctx.gain_shape = input_scale, gain.shape
        return centered.mul_(rstd * g).view_as(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, mean, rstd, g, unclamped = ctx.saved_tensors
        w, dy = weight.reshape(weight.shape[0], -1), grad.reshape(weight.shape[0], -1)
        n = w.shape[1]
        sum_dy = dy.sum(1, keepdim=True)
        sum_dy_xc = torch.linalg.vecdot(dy, w).unsqueeze(1) - mean * sum_dy  # sum dy * (w - mean)
        d_gain = (sum_dy_xc * rstd * ctx.input_scale).view(ctx.gain_shape)
        # d/dw of g * (w - mean) * (sum (w - mean)^2)^-1/2; the variance term vanishes where clamped.
        a = g * rstd
        b = -(a * rstd.square() * sum_dy_xc) * unclamped
        c = -a * sum_dy / n - b * mean
        d_weight = torch.addcmul(c, w, b).addcmul_(dy, a).view_as(weight)
        return d_weight, d_gain, None, None


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self._weight(x)
        if self.stride[0] == 1:
            return F.conv2d(x, weight, self.bias, 1, self.padding, 1, self.groups)
        ph = same_padding(x.shape[-2], self.kernel_size[0], self.stride[0])
        pw = same_padding(x.shape[-1], self.kernel_size[1], self.stride[1])
        if ph[0] == ph[1] and pw[0] == pw[1]:
            return F.conv2d(x, weight, self.bias, self.stride, (ph[0], pw[0]), 1, self.groups)
        x = F.pad(x, (pw[0], pw[1], ph[0], ph[1]))
        return F.conv2d(x, weight, self.bias, self.stride, 0, 1, self.groups)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", padding=SAME, standardized"


class SqueezeExcite(nn.Module):
    """Squeeze-and-excite with plain ReLU; returns the gate 2 * sigmoid(.) (the 2 keeps variance)."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        # 1x1 convs rather than Linear: timm's key names and (out, in, 1, 1) shapes.
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.mean((2, 3), keepdim=True)
        return 2.0 * torch.sigmoid(self.fc2(F.relu(self.fc1(h))))


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
           "NONLINEARITY_GAMMA", "hidden_width", "bottleneck_width"]
