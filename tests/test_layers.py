"""The CPU fast paths of layers.py against the plain PyTorch computations they replace.

References: `F.gelu(approximate="tanh")` and the float64 tanh-GELU formula, `F.pad`, `F.avg_pool2d`,
`Tensor.mean`, and DeepMind's weight standardisation written with autograd-visible ops.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from nfnet_zoo.layers import (GammaAct, WSConv2d, _WeightStandardization, activate_and_conv, avg_pool_same,
                              gelu_tanh, spatial_mean)

CL = torch.channels_last


def _tanh_gelu_f64(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def test_bfloat16_gelu_rounds_like_tanh_gelu():
    # Every bfloat16 value in [-10, 10] against the correctly rounded float64 tanh-GELU.
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    x = every[torch.isfinite(every) & (every.float().abs() <= 10)]
    exact = _tanh_gelu_f64(x)
    got = gelu_tanh(x)
    assert got.dtype == torch.bfloat16
    assert (got != exact.bfloat16()).float().mean() < 0.03  # differ from correct rounding: 2.4%
    # Off by at most one bfloat16 step (2^-7 relative) wherever the value is not vanishingly small.
    big = exact.abs() > 0.05
    rel = ((got.double() - exact).abs() / exact.abs())[big]
    assert rel.max() <= 2 ** -7


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL])
@pytest.mark.parametrize("size", [(16, 16), (15, 16), (16, 17)])
def test_activation_written_into_padded_buffer(fmt, size):
    act, conv = GammaAct("gelu", folded=True), WSConv2d(6, 4, 3, stride=2)
    x = torch.randn(2, 6, *size).contiguous(memory_format=fmt).requires_grad_()
    pad = conv.asymmetric_padding(x)
    if size == (15, 16):
        assert pad == (0, 1, 1, 1)  # odd height: symmetric rows, uneven columns
    expected = F.pad(F.gelu(x, approximate="tanh"), pad)
    with torch.no_grad():
        torch.testing.assert_close(act(x, pad=pad), expected, rtol=0, atol=1e-6)
        assert act(x, pad=pad).is_contiguous(memory_format=fmt)
    out = act(x, pad=pad)
    dy = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, x, dy)[0], torch.autograd.grad(expected, x, dy)[0])
    # The conv on the pre-padded input equals the conv that pads for itself.
    with torch.no_grad():
        torch.testing.assert_close(activate_and_conv(act, conv, x), conv(act(x)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL])
@pytest.mark.parametrize("size", [(8, 12), (7, 9)])
def test_average_pool_matches_aten(fmt, size):
    x = torch.randn(2, 5, *size, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_()
    ours, ref = avg_pool_same(x), F.avg_pool2d(x, 2, 2, ceil_mode=True, count_include_pad=False)
    torch.testing.assert_close(ours, ref)
    dy = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(ours, x, dy)[0], torch.autograd.grad(ref, x, dy)[0])


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_spatial_mean(fmt, dtype):
    x = (torch.randn(3, 16, 24, 20) + 2).to(dtype).contiguous(memory_format=fmt).requires_grad_()
    ref = x.double().mean((2, 3))
    got = spatial_mean(x)
    assert got.shape == (3, 16)
    tol = 1e-6 if dtype == torch.float32 else 2 ** -7  # two bfloat16 roundings: the sum, the scaling
    assert ((got.double() - ref).abs() / ref.abs()).max() < tol
    (g,) = torch.autograd.grad(got.float().sum(), x)
    torch.testing.assert_close(g.float(), torch.full(x.shape, 1 / (24 * 20)), rtol=2 ** -8, atol=0)


def _reference_standardization(w, g, input_scale, eps):
    # DeepMind's WSConv2D.standardize_weight, written with autograd-visible ops
    var = torch.var(w, dim=(1, 2, 3), keepdim=True, correction=0)
    mean = torch.mean(w, dim=(1, 2, 3), keepdim=True)
    scale = torch.rsqrt(torch.clamp(var * w[0].numel(), min=eps)) * g * input_scale
    return w * scale - mean * scale


@pytest.mark.parametrize("magnitude", [1.0, 1e-4])  # 1e-4: var * fan_in under eps, the clamped branch
def test_weight_standardization_gradients(magnitude):
    torch.manual_seed(0)
    w = (torch.randn(6, 4, 3, 3, dtype=torch.float64) * magnitude).requires_grad_()
    g = (1 + 0.2 * torch.randn(6, 1, 1, 1, dtype=torch.float64)).requires_grad_()
    ours = _WeightStandardization.apply(w, g, 1.7, 1e-4)
    ref = _reference_standardization(w, g, 1.7, 1e-4)
    torch.testing.assert_close(ours, ref)
    dy = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(ours, (w, g), dy), torch.autograd.grad(ref, (w, g), dy))


def test_fast_gelu_is_jax_gelu():
    x = (torch.randn(4096, dtype=torch.float64) * 4).requires_grad_()
    torch.testing.assert_close(gelu_tanh(x), F.gelu(x, approximate="tanh"))
    dy = torch.randn_like(x)
    torch.testing.assert_close(torch.autograd.grad(gelu_tanh(x), x, dy)[0],
                               torch.autograd.grad(F.gelu(x, approximate="tanh"), x, dy)[0])
    with torch.no_grad():
        torch.testing.assert_close(gelu_tanh(x.float()), F.gelu(x.float(), approximate="tanh"), rtol=0, atol=1e-6)


@pytest.mark.parametrize("grad_fmt", [torch.contiguous_format, CL])
def test_channels_last_weight_standardisation_keeps_its_layout(grad_fmt):
    torch.manual_seed(0)
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64).contiguous(memory_format=CL).requires_grad_()
    g = (1 + 0.2 * torch.randn(6, 1, 1, 1, dtype=torch.float64)).requires_grad_()
    ours = _WeightStandardization.apply(w, g, 1.7, 1e-4)
    ref = _reference_standardization(w, g, 1.7, 1e-4)
    assert ours.is_contiguous(memory_format=CL) and not ours.is_contiguous()
    torch.testing.assert_close(ours, ref)
    dy = torch.randn_like(ref).contiguous(memory_format=grad_fmt)
    d_ours, d_ref = torch.autograd.grad(ours, (w, g), dy), torch.autograd.grad(ref, (w, g), dy)
    torch.testing.assert_close(d_ours, d_ref)
    assert d_ours[0].is_contiguous(memory_format=CL)  # the parameter's layout: autograd keeps it as is


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL])
def test_standardisation_gradient_with_some_units_clamped(fmt):
    # Units whose var * fan_in falls under eps have a constant scale: their gradient has no variance
    # term, which the batch-norm backward would otherwise subtract.
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3, dtype=torch.float64)
    w[::2] *= 1e-4  # var * fan_in ~ 4e-7 < eps for every other unit
    w = w.contiguous(memory_format=fmt).requires_grad_()
    g = (1 + 0.2 * torch.randn(8, 1, 1, 1, dtype=torch.float64)).requires_grad_()
    ours = _WeightStandardization.apply(w, g, 0.8, 1e-4)
    ref = _reference_standardization(w, g, 0.8, 1e-4)
    dy = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(ours, (w, g), dy), torch.autograd.grad(ref, (w, g), dy))
