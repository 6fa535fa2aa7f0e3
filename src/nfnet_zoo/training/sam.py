"""`--sam RHO`: sharpness-aware minimisation (Foret et al. 2021) in the NFNet paper's cheaper form.

Per optimizer step: the ascent gradient g on the first ceil(--sam-fraction x B) images of the step's first
micro-batch (the NFNet paper computes the ascent step on a part of the batch, for +20-40% time instead of 2x),
e = rho g / ||g|| (one norm over all trainable parameters), w <- w + e; every micro-batch of the step then
takes its descent gradient at w + e; w is restored (copied back, bit for bit) before AGC and the optimizer step,
which move w with that gradient. Choices, and why:
- AGC clips the descent gradient only, where it always does (before the step, classifier weight excluded): it
  bounds the update relative to the weights; the ascent step is normalised to length rho already, and clipping it
  unit-wise would only turn its direction away from Foret et al.'s.
- Several processes: each computes its own e from its own images (no all-reduce of the ascent gradient: Foret
  et al.'s m-sharpness, which they found to generalise better than the whole batch's and is what a
  per-accelerator implementation does; it also saves a communication); the descent gradients are averaged as
  always.
- fp16 loss scaling: the ascent gradient is the scaled one; the scale cancels in g / ||g||. A step whose scaled
  ascent gradient overflowed (a non-finite norm) is not perturbed; the scaler then treats the step as usual.
- bf16 autocast: the prepared model's forward autocasts, the ascent forward too; the norm is taken in float32.
No optimizer wrapper (as Foret et al.'s reference): it would hide the step from Accelerate's accumulation and
GradScaler, which this loop keeps.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from ..errors import NFNetZooError


class SAM:
    """The ascent step and the restore around one optimizer step (see the module docstring)."""

    def __init__(self, rho: float, fraction: float):
        self.rho, self.fraction = rho, fraction
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] = []  # (parameter, its value at w) while perturbed
        self.perturbed = False  # between `ascend` and `restore`: the micro-batches of one optimizer step

    def ascend(self, accelerator, model: nn.Module, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor) -> None:
        """Compute e on this process's first ceil(fraction x len(x)) images and move the weights to w + e. The
        gradients are left empty, for the descent step's backward."""
        params = [p for p in model.parameters() if p.requires_grad]
        if any(p.grad is not None for p in params):
            raise NFNetZooError("SAM's ascent step needs empty gradients; call it first in an optimizer step")
        n = max(1, math.ceil(self.fraction * len(x)))
        with accelerator.no_sync(model):  # this process's own e (m-sharpness)
            accelerator.backward(loss_fn(model(x[:n]), y[:n]))
        grads = [(p, p.grad) for p in params if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for _, g in grads]))
        finite = torch.isfinite(norm) & (norm > 0)  # an overflowed fp16 ascent: no perturbation (no device sync)
        scale = self.rho / norm
        with torch.no_grad():
            for p, g in grads:
                self._saved.append((p, p.detach().clone()))
                p.add_(torch.where(finite, g.float() * scale, 0.0).to(p.dtype))
                p.grad = None
        self.perturbed = True

    def restore(self) -> None:
        """Put back the weights w (copies, not w + e - e, which rounding would change)."""
        with torch.no_grad():
            for p, w in self._saved:
                p.copy_(w)
        self._saved = []
        self.perturbed = False


def build_sam(cfg, accelerator) -> "SAM | None":
    """SAM for --sam RHO > 0, else None; refused where the weights are sharded (FSDP, DeepSpeed): e's norm would
    then need a sum over shards that this does not take."""
    if not cfg.sam:
        return None
    if getattr(accelerator.state, "fsdp_plugin", None) is not None or getattr(accelerator.state,
                                                                              "deepspeed_plugin", None) is not None:
        raise NFNetZooError("--sam needs whole weights on each process (one process or DDP), not FSDP or DeepSpeed; "
                            "leave --sam out or train with DDP")
    return SAM(cfg.sam, cfg.sam_fraction)


__all__ = ["SAM", "build_sam"]
