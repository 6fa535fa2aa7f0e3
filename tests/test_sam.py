"""--sam: one SAM step of the training loop (finetune._train_step) against a SAM step written here with plain
autograd from Foret et al.'s definition (e = rho g / ||g||, gradient at w + e, step from w), with the ascent on a
fraction of the batch, gradient accumulation, AGC on the descent gradient, and two processes (each its own e)."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from _procs import wait
from _tiny_nfnet import batch, sgd, tiny
from nfnet_zoo import clipped_parameters
from nfnet_zoo.training.sam import SAM

WORKER = Path(__file__).parent / "_sam_dist_worker.py"


def loop_step(x, y, rho, fraction=1.0, accum=1, clipping=0.0, mixed_precision="no"):
    """The loop's own step on the tiny model: `accum` micro-batches, one optimizer step; the weights after it."""
    import importlib

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    ft = importlib.import_module("nfnet_zoo.training.finetune")
    if "RANK" not in os.environ:  # one process: a state another test left behind is not this one's
        AcceleratorState._reset_state()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accum, mixed_precision=mixed_precision)
    model = tiny(0)
    model, optimizer = accelerator.prepare(model, sgd(model))
    t = SimpleNamespace(accelerator=accelerator, model=model, optimizer=optimizer, mixup=None,
                        cfg=SimpleNamespace(channels_last=False, clipping=clipping),
                        train_loss_fn=torch.nn.CrossEntropyLoss(), progress=SimpleNamespace(add_clip=lambda f: None),
                        clip_params=clipped_parameters(model) if clipping else None,
                        sam=SAM(rho, fraction) if rho is not None else None, frozen=False)
    for xb, yb in zip(x.chunk(accum), y.chunk(accum)):
        ft._train_step(t, xb, yb)
    assert t.sam is None or not t.sam.perturbed
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def reference_step(x, y, rho, fraction=1.0, accum=1, clipping=0.0, autocast=None):
    """SAM by hand: plain autograd, the paper's formulas; `autocast`: the forwards under torch.autocast (CPU)."""
    import contextlib
    model = tiny(0)
    forward = model

    def model(inputs):
        with torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext():
            return forward(inputs).float()
    model.get_classifier = forward.get_classifier
    optimizer = sgd(forward)
    params = list(forward.parameters())
    chunks = list(zip(x.chunk(accum), y.chunk(accum)))
    x0, y0 = chunks[0]
    n = math.ceil(fraction * len(x0))
    g = torch.autograd.grad(F.cross_entropy(model(x0[:n]), y0[:n]), params)
    norm = torch.sqrt(sum((gi.double() ** 2).sum() for gi in g))
    w = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, gi in zip(params, g):
            p.add_((rho * gi.double() / norm).float())
    total = [torch.zeros_like(p) for p in params]
    for xb, yb in chunks:
        for acc, gi in zip(total, torch.autograd.grad(F.cross_entropy(model(xb), yb) / accum, params)):
            acc += gi
    with torch.no_grad():
        for p, wi, gi in zip(params, w, total):
            p.copy_(wi)
            p.grad = gi
    if clipping:
        _agc([p for p in params if p is not model.get_classifier().weight], clipping)
    optimizer.step()
    return forward.state_dict()


@torch.no_grad()
def _agc(params, clipping, eps=1e-3):
    """The paper's AGC as DeepMind's optim.py: units along dim 0; a tensor with at most one dimension above 1 (a
    bias, a gain of shape (C, 1, 1, 1)) is one unit."""
    for p in params:
        dims = tuple(range(p.dim())) if sum(s > 1 for s in p.shape) <= 1 else tuple(range(1, p.dim()))
        w_norm = torch.linalg.vector_norm(p, dim=dims, keepdim=True).clamp(min=eps)
        g_norm = torch.linalg.vector_norm(p.grad, dim=dims, keepdim=True)
        most = clipping * w_norm
        p.grad.copy_(torch.where(g_norm > most, p.grad * most / g_norm.clamp(min=1e-6), p.grad))


def _close(a, b, atol):
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=atol, rtol=0) for k in a)


# Tolerance: the global norm is summed in another order (per-tensor norms, then their norm); ~1e-8 relative on e.
@pytest.mark.parametrize("fraction, accum, clipping", [(1.0, 1, 0.0), (0.25, 1, 0.0), (0.5, 2, 0.0), (0.5, 2, 0.01)])
def test_a_sam_step_is_the_hand_written_one(fraction, accum, clipping):
    x, y = batch(8)
    ours = loop_step(x, y, 0.5, fraction, accum, clipping)
    assert _close(ours, reference_step(x, y, 0.5, fraction, accum, clipping), atol=1e-6)
    plain = loop_step(x, y, None, accum=accum, clipping=clipping)
    assert not _close(ours, plain, atol=1e-3)  # rho 0.5 moves the step measurably: the test can fail


def test_a_sam_step_under_bf16_autocast_is_the_hand_written_one_under_autocast():
    x, y = batch(8)
    ours = loop_step(x, y, 0.5, 0.5, 2, 0.01, mixed_precision="bf16")
    ref = reference_step(x, y, 0.5, 0.5, 2, 0.01, autocast=torch.bfloat16)
    assert _close(ours, ref, atol=1e-5)
    assert not _close(ours, reference_step(x, y, 0.5, 0.5, 2, 0.01), atol=1e-4)  # bf16 was used


def test_rho_zero_is_the_plain_step_bit_for_bit():
    x, y = batch(8)
    a, b = loop_step(x, y, 0.0, 0.5, 2), loop_step(x, y, None, accum=2)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_each_perturb_by_their_own_images(tmp_path):
    """Each process's e from its own half of the batch (m-sharpness), the descent gradients averaged (DDP)."""
    x, y = batch(8)
    torch.save({"x": x, "y": y}, tmp_path / "inputs.pt")
    r = wait(subprocess.Popen([sys.executable, str(WORKER), str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True), timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    from safetensors.torch import load_file
    got = load_file(tmp_path / "result.safetensors")
    # by hand: per process p, e_p from its own first half-fraction; the step takes mean_p grad L_p(w + e_p)
    model = tiny(0)
    params, names = list(model.parameters()), [n for n, _ in model.named_parameters()]
    w = [p.detach().clone() for p in params]
    total = [torch.zeros_like(p) for p in params]
    for xs, ys in zip(x.chunk(2), y.chunk(2)):
        with torch.no_grad():  # each process starts from w
            for p, wi in zip(params, w):
                p.copy_(wi)
        g = torch.autograd.grad(F.cross_entropy(model(xs[:2]), ys[:2]), params)
        norm = torch.sqrt(sum((gi.double() ** 2).sum() for gi in g))
        with torch.no_grad():
            for p, wi, gi in zip(params, w, g):
                p.copy_(wi + (0.5 * gi.double() / norm).float())
        for acc, gi in zip(total, torch.autograd.grad(F.cross_entropy(model(xs), ys) / 2, params)):
            acc += gi
    optimizer = sgd(model)
    with torch.no_grad():
        for p, wi, gi in zip(params, w, total):
            p.copy_(wi)
            p.grad = gi
    optimizer.step()
    ref = {n: p.detach() for n, p in zip(names, params)}
    assert _close({n: got[n] for n in names}, ref, atol=1e-6)
    # the whole batch's e (one process, its first 2 + 2 images differ from each half's first 2) gives another step
    whole = loop_step(x, y, 0.5, 0.5)
    assert not _close({n: whole[n] for n in names}, ref, atol=1e-4)



class _ScalingAccelerator:
    """What SAM sees of fp16 training: backward of the loss times the GradScaler's scale (no GPU needed)."""

    def __init__(self, scale):
        self.scale = scale

    def backward(self, loss):
        (loss * self.scale).backward()

    def no_sync(self, model):
        import contextlib
        return contextlib.nullcontext()


def test_the_loss_scale_cancels_in_the_ascent_step_and_an_overflow_skips_it():
    x, y = batch(8)
    moved = {}
    for scale in (1.0, 2.0 ** 16, float("inf")):
        model = tiny(0)
        before = [p.detach().clone() for p in model.parameters()]
        sam = SAM(0.5, 0.5)
        sam.ascend(_ScalingAccelerator(scale), model, torch.nn.CrossEntropyLoss(), x, y)
        assert sam.perturbed and all(p.grad is None for p in model.parameters())
        moved[scale] = [p.detach() - b for p, b in zip(model.parameters(), before)]
        sam.restore()
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # w back bit for bit
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(moved[1.0], moved[2.0 ** 16]))
    assert math.isclose(math.sqrt(sum((d.double() ** 2).sum().item() for d in moved[1.0])), 0.5, rel_tol=1e-5)
    assert all(torch.equal(d, torch.zeros_like(d)) for d in moved[float("inf")])
