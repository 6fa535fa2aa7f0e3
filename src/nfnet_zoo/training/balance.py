"""`--class-balance`: training on data whose classes are unequally represented.

`loss`: cross-entropy with class weights w_c = N / (K * n_c) (N training images, K classes, n_c of class c:
scikit-learn's "balanced"), so the weights average 1 over the training set and the loss keeps its scale (and the
learning rate its meaning). `sampler`: the data's BalancedSampler (nfnet_zoo.data), each class drawn equally often.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def class_weights(labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """w_c = N / (K * n_c); a class without training images gets 0 (it is never a target)."""
    if not len(labels):
        raise ValueError("class weights need the training labels")
    counts = torch.bincount(torch.as_tensor(list(labels), dtype=torch.long), minlength=num_classes).double()
    return torch.where(counts > 0, len(labels) / (num_classes * counts.clamp(min=1)), 0.0).float()


class WeightedCrossEntropy(nn.Module):
    """loss_i = -sum_c w_c t_ic log p_ic, averaged over the batch (divided by its size, not by the sum of the
    weights, so that the mean of w is 1 over the training set keeps the loss's scale). t is the target
    distribution: a label smoothed as timm's LabelSmoothingCrossEntropy does ((1 - eps) on the label + eps / K on
    every class), or mixup/cutmix's soft targets as they come (they hold their smoothing). For a label this is
    torch's F.cross_entropy(weight=w, label_smoothing=eps, reduction="none") per sample; each class's share of a
    mixed target is weighted by its own class's weight."""

    def __init__(self, weight: torch.Tensor, smoothing: float = 0.0):
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)
        self.smoothing = smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = logits.float().log_softmax(-1)
        if target.dim() == 1:
            k = logits.shape[-1]
            target = torch.full_like(logp, self.smoothing / k).scatter_add_(
                1, target[:, None], torch.full_like(logp[:, :1], 1 - self.smoothing))
        return -(target * self.weight.to(logp.device) * logp).sum(-1).mean()


__all__ = ["class_weights", "WeightedCrossEntropy"]
