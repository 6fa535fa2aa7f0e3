"""Each CPU kernel of `nfnet_zoo.cpu_kernels` against the reference computation it replaces.

Interleaved A/B micro-benchmarks on F0-sized tensors (batch 8, 256 px: stage 1 is 64x64, stage 2
16x16), fast kernel vs reference, REPEATS rounds; prints the median time of each and the median of
the per-round ratios. The two paths compute the same (tests/test_layers.py, tests/test_fast_kernels.py).

    PYTHONPATH=src python benchmarks/bench_kernels.py [--repeats 9] [--only gelu,cache,...]
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import nfnet_zoo  # noqa: F401
from nfnet_zoo import adaptive_clip_grad_, clipped_parameters, cpu_kernels, fast_kernels
from nfnet_zoo.models.cpu_kernels import WS_STATS
from nfnet_zoo.models.layers import GammaAct, WSConv2d, standardize_weight


def _time(fn, inner):
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner


def ab(name, fast, ref, repeats, inner=3, setup=lambda: None):
    fast(), ref()  # warm up
    tf, tr, ratios = [], [], []
    for _ in range(repeats):
        setup()
        a = _time(fast, inner)
        setup()
        b = _time(ref, inner)
        tf.append(a)
        tr.append(b)
        ratios.append(b / a)
    print(f"{name:44s} fast {statistics.median(tf) * 1e3:8.2f} ms  ref {statistics.median(tr) * 1e3:8.2f} ms  "
          f"gain {statistics.median(ratios):5.2f}x  (range {min(ratios):.2f}-{max(ratios):.2f})", flush=True)


def grad_of(fn, x):
    def run():
        x.grad = None
        fn(x).sum().backward()
    return run


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--only", default="")
    args = p.parse_args()
    only = set(filter(None, args.only.split(",")))
    r = args.repeats
    torch.manual_seed(0)
    want = lambda k: not only or k in only  # noqa: E731

    s2 = torch.randn(8, 768, 16, 16)  # F0 stage-2 bottleneck activation
    if want("gelu"):  # dropped kernels, measured again on demand: sigmoid-form tanh-GELU, bf16 erf GELU
        k, c = 2.0 * (2.0 / 3.141592653589793) ** 0.5, 0.044715
        sigmoid_form = lambda t: torch.sigmoid(t * (k + k * c * t * t)).mul_(t)  # noqa: E731
        ab("[dropped] sigmoid-form tanh-GELU (fp32, 8x768x16x16)", lambda: sigmoid_form(s2),
           lambda: F.gelu(s2, approximate="tanh"), r, inner=20)
        b16 = s2.bfloat16()
        ab("[dropped] erf GELU for bf16", lambda: F.gelu(b16), lambda: F.gelu(b16, approximate="tanh"), r, inner=20)
    if want("padded"):
        s1 = torch.randn(8, 256, 64, 64)  # F0 stage-1 input of the strided 3x3
        act, conv = GammaAct("gelu"), WSConv2d(256, 256, 3, stride=2, groups=2).eval().requires_grad_(False)
        with torch.no_grad():
            pad = (0, 1, 0, 1)
            ab("GELU into the padded buffer (8x256x64x64)", lambda: cpu_kernels._gelu_tanh_padded(s1, pad),
               lambda: F.pad(F.gelu(s1, approximate="tanh"), pad), r)
            ab("padded GELU + strided conv", lambda: cpu_kernels._act_conv(act, conv, s1, act.gamma),
               lambda: cpu_kernels.ws_conv2d(conv, F.gelu(s1, approximate="tanh"), act.gamma), r)
    if want("cache"):
        conv = WSConv2d(768, 768, 3, groups=6).eval()
        with torch.no_grad():
            ab("eval weight cache: 3x3 conv (8x768x16x16)", lambda: cpu_kernels.ws_conv2d(conv, s2),
               lambda: F.conv2d(s2, standardize_weight(conv.weight, conv.gain, conv.eps), conv.bias, 1, 1, 1, 6),
               r, inner=5)
    if want("ws_backward"):
        for shape in ((768, 128, 3, 3), (1536, 768, 1, 1)):
            w = torch.randn(shape, requires_grad=True)
            g = torch.ones(shape[0], 1, 1, 1, requires_grad=True)
            dy = torch.randn(shape)

            def fast():
                torch.autograd.grad(cpu_kernels._WeightStandardization.apply(w, g, 1.0, 1e-4), (w, g), dy)

            def ref():
                torch.autograd.grad(standardize_weight(w, g, 1e-4), (w, g), dy)
            ab(f"standardisation fwd+bwd {shape}", fast, ref, r, inner=10)
    if want("residual"):
        sc, out = torch.randn(8, 1536, 16, 16), torch.randn(8, 1536, 16, 16)
        se = torch.rand(8, 1536, 1, 1) * 2
        skip = torch.tensor(0.7)
        with torch.no_grad():
            ab("residual, no grad (8x1536x16x16)", lambda: cpu_kernels._residual(sc, out.clone(), se * (skip * 0.2)),
               lambda: (sc + 0.2 * skip * (se * out.clone())), r, inner=10)
        o, s, k = out.clone().requires_grad_(), se.clone().requires_grad_(), skip.clone().requires_grad_()

        def fast():
            torch.autograd.grad(cpu_kernels._residual(sc, o, s * (k * 0.2)).sum(), (o, s, k))

        def ref():
            torch.autograd.grad((sc + 0.2 * k * (s * o)).sum(), (o, s, k))
        ab("residual, forward+backward", fast, ref, r, inner=5)
    if want("mean"):
        b = torch.randn(8, 1536, 16, 16).bfloat16()
        ab("bf16 spatial mean (8x1536x16x16)", lambda: cpu_kernels._spatial_mean(b), lambda: b.mean((2, 3)), r, inner=20)
    if want("agc"):
        import timm

        model = timm.create_model("nfnet_f0")
        params = clipped_parameters(model)
        for q in params:
            q.grad = torch.randn_like(q) * 1e-6 * q.detach().norm() / q.numel() ** 0.5  # clipping rare
        grads = [q.grad.clone() for q in params]
        convs = [m for m in model.modules() if isinstance(m, WSConv2d)]

        def restore(stats):
            for q, g0 in zip(params, grads):
                q.grad.copy_(g0)
                q.__dict__.pop(WS_STATS, None)
            if stats:
                with torch.no_grad():
                    for m in convs:
                        cpu_kernels._WeightStandardization.apply(m.weight, m.gain, 1.0, m.eps)

        def clip(stats, fast):
            def run():
                restore(stats)
                with fast_kernels(fast):
                    t = time.perf_counter()
                    adaptive_clip_grad_(params, 0.01)
                    return time.perf_counter() - t
            return run

        for label, a, b in (("AGC on F0: norms from the forward's WS stats", clip(True, True), clip(False, True)),
                            ("AGC on F0: CPU row rewrite vs foreach", clip(False, True), clip(False, False))):
            ta, tb = [], []
            for _ in range(r):
                ta.append(a())
                tb.append(b())
            ratios = [y / x for x, y in zip(ta, tb)]
            print(f"{label:44s} fast {statistics.median(ta) * 1e3:8.2f} ms  ref {statistics.median(tb) * 1e3:8.2f} ms  "
                  f"gain {statistics.median(ratios):5.2f}x  (range {min(ratios):.2f}-{max(ratios):.2f})", flush=True)
    if want("model"):
        import timm

        model = timm.create_model("nfnet_f0").eval()
        x = torch.randn(8, 3, 256, 256)

        def run(fast):
            def f():
                with fast_kernels(fast), torch.no_grad():
                    model(x)
            return f
        ab("F0 eval forward fp32 (8x3x256x256), all kernels", run(True), run(False), max(3, r // 3), inner=1)


if __name__ == "__main__":
    torch.set_num_threads(torch.get_num_threads())
    main()
