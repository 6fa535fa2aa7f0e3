"""Weights that look trained, for tests that compare forward passes (shared by several test files)."""
import torch
from torch import nn


@torch.no_grad()
def pretrained_like_(model: nn.Module) -> nn.Module:
    """Residual branches on (skip gains 1), gains and biases away from their init, as in a trained
    NFNet; draws from torch's global generator, so seed it first. Returns `model`."""
    for n, p in model.named_parameters():
        if n.endswith("skipinit_gain"):
            p.fill_(1.0)
        elif n.endswith(".gain"):
            p.mul_(1 + 0.2 * torch.randn_like(p))
        elif n.endswith(".bias"):
            p.normal_(0, 0.1)
    return model
