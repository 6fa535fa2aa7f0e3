"""The reference layers against independent formulas.

References: the float64 tanh-GELU formula, TensorFlow's SAME-padding rule, DeepMind's weight
standardisation written per unit in float64 (its gradient by autograd through that loop).
"""
import math

import pytest
import torch

from nfnet_zoo.models.layers import GammaAct, StochDepth, avg_pool_same, pad_same, same_padding, standardize_weight

CL = torch.channels_last


def _tanh_gelu_f64(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _deepmind_standardization(w, g, input_scale, eps):
    # DeepMind's WSConv2D.standardize_weight, one unit at a time in float64.
    rows = []
    for unit, gain in zip(w.double(), g.double().flatten()):
        mean, var = unit.mean(), ((unit - unit.mean()) ** 2).mean()
        rows.append((unit - mean) * gain * input_scale * torch.clamp(var * unit.numel(), min=eps) ** -0.5)
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
@pytest.mark.parametrize("magnitude", [1.0, 1e-4, "some"])  # 1e-4: var * fan_in under eps, the clamped branch
def test_standardisation_gradient_is_deepminds(fmt, magnitude):
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3, dtype=torch.float64)
    if magnitude == "some":
        w[::2] *= 1e-4  # every other unit clamped: the variance term vanishes there
    else:
        w *= magnitude
    w = w.contiguous(memory_format=fmt).requires_grad_()
    g = (1 + 0.2 * torch.randn(8, 1, 1, 1, dtype=torch.float64)).requires_grad_()
    ours = standardize_weight(w, g, 1e-4) * 1.7
    theirs = _deepmind_standardization(w, g, 1.7, 1e-4)  # autograd through DeepMind's per-unit loop
    torch.testing.assert_close(ours, theirs)
    dy = torch.randn_like(theirs)
    for a, b in zip(torch.autograd.grad(ours, (w, g), dy), torch.autograd.grad(theirs, (w, g), dy)):
        torch.testing.assert_close(a, b)
