"""Building blocks of a normalizer-free network, as DeepMind's `nfnets/base.py`: the reference path.

Each equation is written once, with plain PyTorch ops:
- `standardize_weight`: Scaled Weight Standardisation (paper eq. 2, with a learnable gain);
  `WSConv2d` convolves with it, with TensorFlow's SAME padding.
- `GammaAct`: gamma * f(x), gamma chosen so that unit-variance Gaussian inputs keep unit variance.
- `SqueezeExcite`: SE with plain ReLU and a 2 * sigmoid gate.
- `StochDepth`: drop a whole sample's residual branch, without 1/keep rescaling.
Every device and runtime runs exactly this (eager, `torch.compile`, FX, TorchScript, `torch.func`,
`torch.export`), so all of them give the same bits. For serving, `inference.optimize_for_inference`
computes each standardised weight once instead of every forward (the same bits again).
"""

from typing import List, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

# Gammas of DeepMind's `base.nonlinearities`: 1 / std(f(x)) for x ~ N(0, 1).
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

# JAX's defaults: jax.nn.gelu is the tanh approximation; leaky_relu slope 0.01. Modules, not
# functions, so that TorchScript compiles them.
_NONLINEARITY = {
    "identity": nn.Identity,
    "celu": nn.CELU,
    "elu": nn.ELU,
    "gelu": lambda: nn.GELU(approximate="tanh"),
    "leaky_relu": lambda: nn.LeakyReLU(0.01),
    "log_sigmoid": nn.LogSigmoid,
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "selu": nn.SELU,
    "sigmoid": nn.Sigmoid,
    "silu": nn.SiLU,
    "soft_sign": nn.Softsign,
    "softplus": nn.Softplus,
    "tanh": nn.Tanh,
}


class GammaAct(nn.Module):
    """gamma * f(x), DeepMind's scaled nonlinearity (tanh-approximate GELU by default)."""

    def __init__(self, activation: str = "gelu"):
        super().__init__()
        if activation not in _NONLINEARITY:
            raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(_NONLINEARITY)}")
        self.activation = activation
        self.act = _NONLINEARITY[activation]()
        self.gamma = NONLINEARITY_GAMMA[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x) * self.gamma

    def extra_repr(self) -> str:
        return f"{self.activation}, gamma={self.gamma}"


def same_padding(size: int, kernel: int, stride: int) -> Tuple[int, int]:
    """TensorFlow/JAX 'SAME' padding (before, after) of one spatial dimension: extra pixel goes after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def pad_same(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """Zero-pad `x` as SAME does for a square `kernel` and `stride` (an FX leaf: sizes are data)."""
    top, bottom = same_padding(x.shape[-2], kernel, stride)
    left, right = same_padding(x.shape[-1], kernel, stride)
    pads: List[int] = [left, right, top, bottom]
    return F.pad(x, pads)


torch.fx.wrap("pad_same")


def standardize_weight(weight: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    """gain * (W - mean(W)) / sqrt(max(var(W) * fan_in, eps)), per output unit (DeepMind's `WSConv2D`).

    Statistics over (I, kH, kW) of each output unit, with the biased variance.
    """
    var, mean = torch.var_mean(weight, dim=[1, 2, 3], keepdim=True, correction=0)
    fan_in = weight[0].numel()
    scale = torch.rsqrt(torch.clamp(var * fan_in, min=eps)) * gain
    return weight * scale - mean * scale


class WSConv2d(nn.Conv2d):
    """Conv2d with Scaled Weight Standardisation and SAME padding, as DeepMind's `WSConv2D`.

    Parameters (`weight` OIHW, `bias` (O,), `gain` (O, 1, 1, 1)) have timm's names and shapes;
    the bias is added after the convolution.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1, eps: float = 1e-4, device=None, dtype=None):
        # Stride 1 pads symmetrically, so the conv pads itself; strided convs pad per input size.
        padding = (kernel_size - 1) // 2 if stride == 1 else 0
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         groups=groups, bias=True, device=device, dtype=dtype)
        self.gain = nn.Parameter(torch.ones(out_channels, 1, 1, 1, device=device, dtype=dtype))
        self.eps = eps
        nn.init.kaiming_normal_(self.weight, nonlinearity="linear")  # haiku VarianceScaling(1, fan_in)
        nn.init.zeros_(self.bias)

    def standardized_weight(self) -> torch.Tensor:
        return standardize_weight(self.weight, self.gain, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] > 1:
            x = pad_same(x, self.kernel_size[0], self.stride[0])
        return F.conv2d(x, self.standardized_weight(), self.bias, self.stride, self.padding, self.dilation,
                        self.groups)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", padding=SAME, standardized"


def avg_pool_same(x: torch.Tensor) -> torch.Tensor:
    """2x2 average pool, stride 2, SAME: windows at an odd edge average only the real pixels."""
    return F.avg_pool2d(x, 2, 2, ceil_mode=True, count_include_pad=False)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excite with plain ReLU; returns the gate 2 * sigmoid(.) (the 2 keeps variance)."""

    def __init__(self, channels: int, hidden: int, device=None, dtype=None):
        super().__init__()
        # 1x1 convs hold the weights (timm's key names and (out, in, 1, 1) shapes).
        self.fc1 = nn.Conv2d(channels, hidden, 1, device=device, dtype=dtype)
        self.fc2 = nn.Conv2d(hidden, channels, 1, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc1(x.mean((2, 3), keepdim=True)))
        return 2.0 * torch.sigmoid(self.fc2(h))


class StochDepth(nn.Module):
    """Keep or drop each sample's residual branch with probability 1 - rate; no 1/keep rescaling.

    The keep mask is drawn in float32 whatever the activation dtype: in bfloat16 a keep
    probability of 0.998 rounds to 1 and nothing would ever drop. (timm's DropPath draws in the
    activation dtype.)
    """

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate <= 0.0:
            return x
        keep = torch.rand((x.shape[0], 1, 1, 1), dtype=torch.float32, device=x.device) >= self.rate
        return x * keep.to(x.dtype)

    def extra_repr(self) -> str:
        return f"rate={self.rate:.4f}"


def hidden_width(channels: int, ratio: float) -> int:
    """SE hidden width as DeepMind computes it: int(channels * ratio), at least 1."""
    return max(1, int(channels * ratio))


def bottleneck_width(out_ch: int, in_ch: int, expansion: float, group_width: int, big_width: bool) -> int:
    """Grouped-conv width: int(width * expansion) rounded DOWN to a multiple of the group width."""
    width = int((out_ch if big_width else in_ch) * expansion)
    return group_width * max(1, width // group_width)


__all__ = ["GammaAct", "WSConv2d", "SqueezeExcite", "StochDepth", "standardize_weight", "same_padding",
           "pad_same", "avg_pool_same", "NONLINEARITY_GAMMA", "hidden_width", "bottleneck_width"]
