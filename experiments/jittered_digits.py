"""Jittered digits: scikit-learn's 1,797 handwritten digits, redrawn as many RGB images as asked for.

Why not the digits themselves: 1,437 training images give one update an epoch at batch 1,024, and a
plain 8x8 digit is learnt in a few hundred steps at any batch size, so the arms of the ablation could
not be told apart. Each image here places one digit at a random scale, rotation and position on a
16x16 canvas, in a random colour on a random background, with pixel noise.

Training images come only from the digits of scikit-learn's training split and validation images only
from the held-out ones (the split of `nfnet-zoo demo`), so no validation digit is ever seen in training.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

SIZE = 16
CLASSES = 10


def _source_digits(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    train, val = train_test_split(np.arange(len(digits.images)), test_size=0.2, random_state=0,
                                  stratify=digits.target)
    idx = train if split == "train" else val
    images = torch.tensor(digits.images[idx] / 16.0, dtype=torch.float32).unsqueeze(1)  # N,1,8,8 in [0,1]
    return images, torch.tensor(digits.target[idx], dtype=torch.int64)


def _affine(n: int, g: torch.Generator) -> torch.Tensor:
    """Canvas-to-digit sampling grids: scale 1.1-1.9 (digit height 9-15 px), +-20 degrees, any position
    that keeps most of the digit on the canvas."""
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=g)  # noqa: E731
    scale = u(1.1, 1.9) * 8 / SIZE            # the digit's share of the canvas
    angle = u(-20, 20) * math.pi / 180
    shift = (1 - scale).unsqueeze(1) * (2 * torch.rand(n, 2, generator=g) - 1)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)  # N,2,2
    offset = -(theta @ shift.unsqueeze(2))
    return torch.cat([theta, offset], 2)


def make(split: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """N images (N,3,16,16, standardised per channel over the set) and labels of SPLIT ('train' or
    'val'); the same SPLIT, N and SEED give the same tensors. Each source digit is used once before any
    is used again, so the classes keep the source's near-even shares."""
    g = torch.Generator().manual_seed(seed * 2 + (split == "val"))
    digits, labels = _source_digits(split)
    pick = torch.cat([torch.randperm(len(digits), generator=g) for _ in range(n // len(digits) + 1)])[:n]
    grid = F.affine_grid(_affine(n, g), (n, 1, SIZE, SIZE), align_corners=False)
    ink = F.grid_sample(digits[pick], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    fg, bg = torch.rand(n, 3, 1, 1, generator=g), torch.rand(n, 3, 1, 1, generator=g)
    fg = torch.where((fg - bg).abs() < 0.3, 1 - bg, fg)  # keep the digit visible against its background
    x = bg + (fg - bg) * ink + 0.08 * torch.randn(n, 3, SIZE, SIZE, generator=g)
    x = (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True)
    return x.contiguous(), labels[pick].contiguous()
