"""The CPU kernels held to the reference layers, and the one seam that chooses between them.

Each case runs the same model twice, `fast_kernels(True)` and `fast_kernels(False)`, with the same
seed (stochastic depth and dropout draw the same masks) and compares logits and gradients.
"""
import copy
import os
import subprocess
import sys
import threading

import pytest
import timm
import torch
import torch.nn.functional as F

import nfnet_zoo  # noqa: F401
from nfnet_zoo import cpu_kernels, fast_kernels
from _weights import pretrained_like_

CL = torch.channels_last


def _model(dtype=torch.float32, **kwargs):
    torch.manual_seed(0)
    m = pretrained_like_(timm.create_model("nfnet_zoo_tiny", num_classes=5, drop_path_rate=0.5, **kwargs))
    return m.to(dtype)


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _run(model, x, fast, grad_mode, hooks=None):
    """Logits, and with grad_mode 'grad' the gradients of input and parameters, under one path."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(grad_mode == "grad")
    ctx = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[grad_mode]
    torch.manual_seed(7)
    with fast_kernels(fast), ctx():
        y = model(x)
        if grad_mode == "grad":
            F.cross_entropy(y.float(), torch.arange(len(y)) % 5).backward()
    grads = [x.grad] + [p.grad for p in model.parameters()] if grad_mode == "grad" else []
    return y.detach().clone(), grads


@pytest.mark.parametrize("fmt", ["nchw", "channels_last"])
@pytest.mark.parametrize("size", [64, 61])  # odd: uneven SAME padding and odd pools at every stride
@pytest.mark.parametrize("mode,grad_mode", [("train", "grad"), ("eval", "grad"), ("eval", "no_grad"),
                                            ("eval", "inference_mode"), ("train", "no_grad")])
def test_fast_equals_reference_float32(fmt, size, mode, grad_mode):
    model = _model().train(mode == "train")
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    if fmt == "channels_last":
        model, x = model.to(memory_format=CL), x.contiguous(memory_format=CL)
    for _ in range(2):  # the second eval pass reads the weight cache
        fast_y, fast_g = _run(model, x, True, grad_mode)
    ref_y, ref_g = _run(model, x, False, grad_mode)
    assert _rel(fast_y, ref_y) < 1e-5
    if mode == "train":  # the masks were drawn: some samples dropped some blocks
        with torch.no_grad(), fast_kernels(False):
            assert _rel(model.eval()(x), ref_y) > 1e-3
    for (n, _), a, b in zip([("input", None)] + list(model.named_parameters()), fast_g, ref_g):
        assert _rel(a, b) < 2e-4, n


@pytest.mark.parametrize("setup", ["bf16_model", "bf16_autocast"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_fast_equals_reference_bfloat16(setup, mode):
    dtype = torch.bfloat16 if setup == "bf16_model" else torch.float32
    model = _model(dtype).train(mode == "train")
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=setup == "bf16_autocast"):
        fast_y, fast_g = _run(model, x, True, "grad")
        ref_y, ref_g = _run(model, x, False, "grad")
    exact_y, exact_g = _run(copy.deepcopy(model).double(), x.double(), False, "grad")  # same values, float64
    # The fast path is as close to the float64 computation as the reference is, give or take rounding.
    assert _rel(ref_y, exact_y) < 0.05 and _rel(fast_y, exact_y) < max(2 * _rel(ref_y, exact_y), 0.02)
    # Gradients as one vector: a bf16 rounding may flip a ReLU of a small SE and change that
    # tensor's few entries in either path; what is held is the whole step's direction and size.
    def flat(grads):
        return torch.cat([g.double().flatten() for g in grads])

    fast, ref, exact = flat(fast_g), flat(ref_g), flat(exact_g)
    ref_err = ((ref - exact).norm() / exact.norm()).item()
    assert ref_err < 0.05 and ((fast - exact).norm() / exact.norm()).item() < max(2 * ref_err, 0.02)
    assert _rel(fast_g[0], exact_g[0]) < max(2 * _rel(ref_g[0], exact_g[0]), 0.05)  # the input gradient


@pytest.mark.parametrize("where", ["module", "global"])
@pytest.mark.parametrize("grad_mode", ["no_grad", "inference_mode", "grad"])
def test_hooks_see_and_keep_the_reference_tensors(where, grad_mode):
    # Hooks keep every module's output by reference: the in-place residual must not overwrite any.
    model = _model().eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    kept = {}

    def run(fast):
        seen, handles = {}, []

        def keep(name):
            return lambda m, i, o: seen.setdefault(name, o)

        names = {m: n for n, m in model.named_modules()}
        if where == "global":
            handles.append(torch.nn.modules.module.register_module_forward_hook(
                lambda m, i, o: seen.setdefault(names[m], o)))
        else:
            handles += [m.register_forward_hook(keep(n)) for n, m in model.named_modules()]
        try:
            y, _ = _run(model, x, fast, grad_mode)
        finally:
            for h in handles:
                h.remove()
        return y, {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in seen.items()}, seen

    fast_y, fast_seen_copy, fast_seen = run(True)
    ref_y, ref_seen_copy, _ = run(False)
    assert set(fast_seen_copy) == set(ref_seen_copy)
    for name, value in fast_seen.items():
        if isinstance(value, torch.Tensor):
            assert _rel(value, ref_seen_copy[name]) < 1e-5, name  # what the hook holds, now
    torch.testing.assert_close(fast_y, ref_y, rtol=1e-5, atol=1e-6)


# --- the seam: where the fast kernels may run --------------------------------------------------
def test_active_only_for_plain_cpu_tensors_in_eager_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.func import grad, vmap

    x = torch.randn(2, 3)
    assert cpu_kernels.active(x)
    with fast_kernels(False):
        assert not cpu_kernels.active(x)
    assert cpu_kernels.active(x)
    assert not cpu_kernels.active(torch.empty(2, device="meta"))
    seen = []

    def probe(t):
        seen.append(cpu_kernels.active(t))
        return t.sum()

    vmap(probe)(x)
    grad(probe)(x)
    torch.compile(probe, backend="eager", fullgraph=True)(x)
    torch.fx.symbolic_trace(probe)
    torch.jit.trace(probe, (x,), check_trace=False)  # the check reruns it eagerly
    with FakeTensorMode() as mode:
        probe(mode.from_tensor(x))

    class Probe(torch.nn.Module):
        def forward(self, t):
            return probe(t)

    torch.export.export(Probe(), (x,))
    assert seen and not any(seen), seen


def test_environment_variable_switches_the_kernels_off():
    code = "import nfnet_zoo, torch; from nfnet_zoo import cpu_kernels; print(cpu_kernels.active(torch.ones(1)))"
    for value, expected in (("0", "False"), ("1", "True")):
        env = {**os.environ, "NFNET_ZOO_FAST_KERNELS": value}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert out.stdout.strip() == expected, (value, out.stderr[-500:])


# --- the eval-mode weight cache -----------------------------------------------------------------
def test_cache_serves_threads_with_different_autocast_dtypes():
    model = _model().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), fast_kernels(False):
        want32 = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want16 = model(x)
    errors = []

    def serve(dtype, want):
        try:
            for _ in range(15):
                with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype == torch.bfloat16):
                    got = model(x)
                assert got.dtype == want.dtype and _rel(got, want) < (1e-5 if dtype == torch.float32 else 2e-2)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=serve, args=a) for a in
               [(torch.float32, want32), (torch.bfloat16, want16)] * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:2]
    assert {t.dtype for t in cpu_kernels.cache_entries(model.stem.conv1)} == {torch.float32, torch.bfloat16}


def test_cache_notices_data_swaps():
    model = _model().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model(x)
        for scale in (2.0, 0.5, 3.0):  # repeated swaps: an old address must never be mistaken for new
            for p in model.parameters():  # new values: the standardisation is scale-invariant
                p.data = torch.randn_like(p) * scale if p.ndim == 4 else p.data * scale
            fresh = copy.deepcopy(model)
            with fast_kernels(False):
                want = fresh(x)
            assert _rel(model(x), want) < 1e-4


@pytest.mark.parametrize("frozen", [True, False])
def test_saliency_after_cached_and_inference_mode_use(frozen):
    model = _model().eval().requires_grad_(not frozen)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        model(x)  # the cache now holds inference tensors
    with torch.no_grad():
        model(x)
    grads = []
    for fast in (True, False):
        xg = x.clone().requires_grad_()
        with fast_kernels(fast):
            model(xg)[:, 1].sum().backward()
        grads.append(xg.grad)
    assert _rel(grads[0], grads[1]) < 1e-4
