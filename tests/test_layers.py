"""The reference layers against independent formulas, and each CPU kernel against the reference.

References: the float64 tanh-GELU formula, TensorFlow's SAME-padding rule, DeepMind's weight
standardisation written per unit in float64, `F.avg_pool2d`, `Tensor.mean`.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from nfnet_zoo import cpu_kernels
from nfnet_zoo.models.layers import (GammaAct, StochDepth, WSConv2d, avg_pool_same, pad_same, same_padding,
                              standardize_weight)

CL = torch.channels_last


def _tanh_gelu_f64(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _deepmind_standardization(w, g, input_scale, eps):
    # DeepMind's WSConv2D.standardize_weight, one unit at a time in float64.
    rows = []
    for unit, gain in zip(w.double(), g.double().flatten()):
        mean, var = unit.mean(), ((unit - unit.mean()) ** 2).mean()
        rows.append((unit - mean) * gain * input_scale / max(float(var) * unit.numel(), eps) ** 0.5)
    return torch.stack(rows)


# --- the reference layers ---------------------------------------------------------------------
def test_reference_standardisation_is_deepminds():
    torch.manual_seed(0)
    w, g = torch.randn(6, 4, 3, 3), 1 + 0.2 * torch.randn(6, 1, 1, 1)
    w[1] *= 1e-4  # var * fan_in under eps: the clamped unit
    torch.testing.assert_close(standardize_weight(w, g, 1e-4).double(), _deepmind_standardization(w, g, 1.0, 1e-4))


@pytest.mark.parametrize("size,stride,expected", [(15, 2, (1, 1)), (16, 2, (0, 1)), (16, 1, (1, 1)), (1, 2, (1, 1))])
def test_same_padding_is_tensorflows(size, stride, expected):
    # TF: out = ceil(size / stride); total = max((out - 1) * stride + k - size, 0), extra pixel after.
    assert same_padding(size, 3, stride) == expected
    x = torch.ones(1, 1, size, size)
    padded = pad_same(x, 3, stride)
    assert padded.shape[-1] == size + sum(expected) and padded[0, 0, 0, 0] == (0 if expected[0] else 1)


def test_gamma_act_is_gamma_times_jax_gelu():
    x = torch.randn(4096, dtype=torch.float64) * 4
    torch.testing.assert_close(GammaAct("gelu")(x), 1.7015043497085571 * _tanh_gelu_f64(x))
    # gamma = 1 / std(f(x)) for x ~ N(0, 1): unit variance out (DeepMind's definition of the constant)
    z = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for name in ("gelu", "relu", "silu", "leaky_relu"):
        assert GammaAct(name)(z).var().item() == pytest.approx(1.0, abs=5e-3), name


def test_stochastic_depth_draws_in_float32():
    # In bfloat16 the keep probability 0.998 rounds to 1: a bf16 draw never drops anything.
    x = torch.ones(20000, 1, 1, 1)
    sd = StochDepth(0.002).train()
    torch.manual_seed(0)
    kept32 = sd(x)
    torch.manual_seed(0)
    kept16 = sd(x.bfloat16())
    assert kept16.dtype == torch.bfloat16 and torch.equal(kept16.float(), kept32)
    assert 10 < (kept16 == 0).sum() < 80  # ~40 expected


# --- each CPU kernel against the reference -----------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL])
@pytest.mark.parametrize("size", [(16, 16), (15, 16), (16, 17)])
def test_kernels_activation_written_into_padded_buffer(fmt, size, dtype):
    act, conv = GammaAct("gelu"), WSConv2d(6, 4, 3, stride=2).to(dtype)
    x = torch.randn(2, 6, *size).to(dtype).contiguous(memory_format=fmt).requires_grad_()
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    with cpu_kernels.fast_kernels(False):
        expected = conv(act(x))
    got = cpu_kernels._act_conv(act, conv, x, act.gamma)
    torch.testing.assert_close(got, expected, **tol)
    dy = torch.randn_like(got)
    if dtype == torch.float32:  # bf16 gradients: tests/test_fast_kernels.py, against float64
        for a, b in zip(torch.autograd.grad(got, (x, conv.weight), dy),
                        torch.autograd.grad(expected, (x, conv.weight), dy)):
            torch.testing.assert_close(a, b, **tol)
    pad = cpu_kernels._same_pad(conv, x)
    with torch.no_grad():
        buf = cpu_kernels._gelu_tanh_padded(x, pad)
        torch.testing.assert_close(buf, F.pad(F.gelu(x, approximate="tanh"), pad), **tol)
        assert buf.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("size", [(8, 12), (7, 9)])
def test_average_pool_is_same_padded_without_counting_the_padding(size):
    # haiku's avg_pool(window 2, stride 2, SAME): an edge window averages only its real pixels.
    x = torch.randn(2, 5, *size, dtype=torch.float64)
    got = avg_pool_same(x)
    h, w = size
    for i in range(-(-h // 2)):
        for j in range(-(-w // 2)):
            torch.testing.assert_close(got[..., i, j], x[..., 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean((-2, -1)))


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_spatial_mean(fmt, dtype):
    x = (torch.randn(3, 16, 24, 20) + 2).to(dtype).contiguous(memory_format=fmt).requires_grad_()
    ref = x.double().mean((2, 3))
    got = cpu_kernels._spatial_mean(x)
    assert got.shape == (3, 16)
    tol = 1e-6 if dtype == torch.float32 else 2 ** -7  # two bfloat16 roundings: the sum, the scaling
    assert ((got.double() - ref).abs() / ref.abs()).max() < tol
    (g,) = torch.autograd.grad(got.float().sum(), x)
    torch.testing.assert_close(g.float(), torch.full(x.shape, 1 / (24 * 20)), rtol=2 ** -8, atol=0)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL])
@pytest.mark.parametrize("magnitude", [1.0, 1e-4, "some"])  # 1e-4: var * fan_in under eps, the clamped branch
def test_kernels_standardisation_and_its_gradient(fmt, magnitude):
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3, dtype=torch.float64)
    if magnitude == "some":
        w[::2] *= 1e-4  # every other unit clamped: batch norm's variance term must be added back
    else:
        w *= magnitude
    w = w.contiguous(memory_format=fmt).requires_grad_()
    g = (1 + 0.2 * torch.randn(8, 1, 1, 1, dtype=torch.float64)).requires_grad_()
    ours = cpu_kernels._WeightStandardization.apply(w, g, 1.7, 1e-4)
    ref = standardize_weight(w, g, 1e-4) * 1.7
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(ours.detach(), _deepmind_standardization(w.detach(), g.detach(), 1.7, 1e-4))
    if fmt == CL:
        assert ours.is_contiguous(memory_format=CL) and not ours.is_contiguous()
    for grad_fmt in (torch.contiguous_format, CL):
        dy = torch.randn_like(ref).contiguous(memory_format=grad_fmt)
        d_ours, d_ref = torch.autograd.grad(ours, (w, g), dy, retain_graph=True), torch.autograd.grad(ref, (w, g), dy, retain_graph=True)
        torch.testing.assert_close(d_ours, d_ref)
        assert d_ours[0].is_contiguous(memory_format=fmt)  # the parameter's layout: autograd keeps it as is


def test_kernels_low_precision_standardisation_gradient():
    # bf16 weights take the closed-form backward (batch norm's is for float32/64 only).
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3)
    w[::2] *= 1e-4
    g = 1 + 0.2 * torch.randn(8, 1, 1, 1)
    wb, gb = w.bfloat16().requires_grad_(), g.bfloat16().requires_grad_()
    w64, g64 = wb.detach().double().requires_grad_(), gb.detach().double().requires_grad_()
    ours = cpu_kernels._WeightStandardization.apply(wb, gb, 1.7, 1e-4)
    ref = standardize_weight(w64, g64, 1e-4) * 1.7
    torch.testing.assert_close(ours.double(), ref, rtol=2 ** -7, atol=1e-2)
    dy = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(ours, (wb, gb), dy.bfloat16()), torch.autograd.grad(ref, (w64, g64), dy)):
        assert ((a.double() - b).abs().max() / b.abs().max()) < 3e-2
