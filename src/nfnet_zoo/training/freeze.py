"""`--freeze-epochs N`: only the classifier trains for the first N epochs (a linear probe), then everything, as
fastai's `fine_tune(freeze_epochs=N)`: each phase has its own warmup and schedule.

The backbone is frozen by dropping its gradients after each backward (`drop_frozen_grads`), not by
`requires_grad`: torch's and timm's optimizers skip a parameter whose `.grad` is None (no weight decay, no
momentum or Adam state, no step), AGC skips it too, and an EMA of weights that do not move stays their exact copy,
so the frozen weights stay bit for bit. Every process still computes and all-reduces the backbone's gradients
during the frozen epochs: DDP's reducer expects a gradient for every parameter it was built with, and toggling
`requires_grad` after `prepare` would need `find_unused_parameters` (a graph walk every step) for the whole run.
The price is the backward pass through the backbone, which a linear probe does not need.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ..agc import classifier_parameters


def backbone_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter but the classifier's (by identity, as AGC finds it); call it after `accelerator.prepare`,
    which replaces parameters under FSDP2."""
    head = {id(p) for p in classifier_parameters(model)}
    return [p for p in model.parameters() if id(p) not in head]


def drop_frozen_grads(frozen: list[nn.Parameter]) -> None:
    """Forget the gradients of the frozen parameters, so that neither AGC nor the optimizer touches them."""
    for p in frozen:
        p.grad = None


class PhasedSchedule:
    """Two timm schedules over one optimizer, as one: `frozen` for the first `boundary` updates, then `unfrozen`,
    from its own update 0 (its warmup again: the backbone starts moving at a low learning rate)."""

    def __init__(self, frozen: Any, unfrozen: Any, boundary: int):
        self.frozen, self.unfrozen, self.boundary = frozen, unfrozen, boundary

    def step_update(self, num_updates: int) -> None:
        if num_updates < self.boundary:
            self.frozen.step_update(num_updates)
        else:
            self.unfrozen.step_update(num_updates - self.boundary)

    def state_dict(self) -> dict:
        return {"frozen": self.frozen.state_dict(), "unfrozen": self.unfrozen.state_dict(), "boundary": self.boundary}

    def load_state_dict(self, state: dict) -> None:
        self.frozen.load_state_dict(state["frozen"])
        self.unfrozen.load_state_dict(state["unfrozen"])
        self.boundary = state["boundary"]


__all__ = ["backbone_parameters", "drop_frozen_grads", "PhasedSchedule"]
