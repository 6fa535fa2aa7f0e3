"""AGC speed: nfnet_zoo.adaptive_clip_grad_ vs timm's adaptive_clip_grad on the same nfnet_f0 gradients.

Both clip the same tensors (every parameter but the classifier weight) of one backward pass at batch 8,
192 px (F0's training size); each repeat restores the gradients first, and the two run interleaved so
machine noise hits both. Also timed: one full training step (forward, backward, AGC, SGD step), and a
floor: reading every parameter and gradient once (what any AGC must do).

At initialisation the skip gains are 0, so every residual branch has an exactly zero gradient; the
benchmark sets them to U(0.5, 1.5), as DeepMind's reference data does, to get gradients like those
of a model in training.

    python benchmarks/bench_agc.py            # prints the figures
    from bench_agc import run_benchmark       # returns them as a dict
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F


def _median_ms(fns: dict[str, Callable[[], object]], reset: Callable[[], None], repeats: int,
               warmup: int = 2) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            reset()
            start = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def run_benchmark(model_name: str = "nfnet_f0", batch_size: int = 8, img_size: int = 192, repeats: int = 15,
                  step_repeats: int = 3, clipping: float = 0.01) -> dict:
    """Times AGC (ours, timm's) and a training step; returns milliseconds, ratios and context."""
    import timm
    from timm.utils.agc import adaptive_clip_grad

    from nfnet_zoo import adaptive_clip_grad_, clipped_parameters, weight_decay_groups

    torch.manual_seed(0)
    model = timm.create_model(model_name).train()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("skipinit_gain"):
                p.uniform_(0.5, 1.5)
    x = torch.randn(batch_size, 3, img_size, img_size)
    y = torch.randint(0, model.num_classes, (batch_size,))
    F.cross_entropy(model(x), y).backward()
    params = clipped_parameters(model)
    grads = [p.grad.clone() for p in params]

    def reset():
        torch._foreach_copy_([p.grad for p in params], grads)

    def read_once():  # every parameter and gradient
        for p in params:
            p.detach().sum()
            p.grad.sum()

    stats = adaptive_clip_grad_(params, clipping)
    reset()
    agc_ms = _median_ms({
        "ours": lambda: adaptive_clip_grad_(params, clipping),
        "timm": lambda: adaptive_clip_grad(params, clipping),
        "ours_every_unit_clipped": lambda: adaptive_clip_grad_(params, 1e-9),
        "read_params_and_grads": read_once,
    }, reset, repeats)

    optimizer = torch.optim.SGD(weight_decay_groups(model, 2e-5), lr=0.1, momentum=0.9, nesterov=True)

    def train_step():
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        adaptive_clip_grad_(params, clipping)
        optimizer.step()

    step_ms = _median_ms({"step": train_step}, lambda: None, step_repeats, warmup=1)["step"]
    return {
        "model": model_name, "batch_size": batch_size, "img_size": img_size,
        "tensors_clipped": len(params), "numel": sum(p.numel() for p in params),
        "units": stats.units, "fraction_of_units_clipped": stats.clipped_fraction(),
        "ours_ms": agc_ms["ours"], "timm_ms": agc_ms["timm"],
        "ours_every_unit_clipped_ms": agc_ms["ours_every_unit_clipped"],
        "read_params_and_grads_ms": agc_ms["read_params_and_grads"],
        "train_step_ms": step_ms,
        "speedup_vs_timm": agc_ms["timm"] / agc_ms["ours"],
        "ours_pct_of_step": 100 * agc_ms["ours"] / step_ms,
        "timm_pct_of_step": 100 * agc_ms["timm"] / step_ms,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "repeats": repeats,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="nfnet_f0")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=192)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--step-repeats", type=int, default=3)
    args = parser.parse_args()
    r = run_benchmark(args.model, args.batch_size, args.img_size, args.repeats, args.step_repeats)
    print(f"torch {r['torch']}, {r['threads']} threads; {r['model']} batch {r['batch_size']} at "
          f"{r['img_size']} px; {r['tensors_clipped']} tensors, {r['numel'] / 1e6:.1f}M values, "
          f"{r['units']} units, {100 * r['fraction_of_units_clipped']:.1f}% clipped; "
          f"median of {r['repeats']}")
    print(f"  AGC nfnet_zoo        {r['ours_ms']:8.1f} ms  ({r['ours_pct_of_step']:.2f}% of a step)")
    print(f"  AGC timm             {r['timm_ms']:8.1f} ms  ({r['timm_pct_of_step']:.2f}% of a step)")
    print(f"  timm / nfnet_zoo     {r['speedup_vs_timm']:8.2f} x")
    print(f"  nfnet_zoo, every unit clipped   {r['ours_every_unit_clipped_ms']:8.1f} ms")
    print(f"  read params + grads once        {r['read_params_and_grads_ms']:8.1f} ms")
    print(f"  training step (fwd, bwd, AGC, SGD) {r['train_step_ms']:8.1f} ms")


if __name__ == "__main__":
    main()
