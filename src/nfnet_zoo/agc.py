"""Adaptive Gradient Clipping (AGC, paper section 4) and DeepMind's `SGD_AGC` recipe.

For each unit i of a parameter W with gradient G (DeepMind's `optim.py`):

    max_norm_i = clipping * max(||W_i||, eps)
    G_i <- G_i * max_norm_i / max(||G_i||, 1e-6)      only where ||G_i|| > max_norm_i

A unit is one output unit of a weight (a slice along dim 0, norm over the other dims); a tensor with
at most one non-unit dimension (a bias, a gain of shape (C, 1, 1, 1), a scalar skip gain) is one
unit, as DeepMind's `unitwise_norm`.

DeepMind's optimizer (`SGD_AGC` with the NFNet experiment's partition) in PyTorch:

    optimizer = torch.optim.SGD(weight_decay_groups(model, 2e-5), lr=lr, momentum=0.9, nesterov=True)
    clipped = clipped_parameters(model)           # after fully_shard / accelerator.prepare
    loss.backward()
    adaptive_clip_grad_(clipped, clipping=0.01)    # 1. clip all but the classifier weight
    optimizer.step()                               # 2. g += wd * w, not on gains, skip gains, biases
                                                   # 3. m = 0.9 * m + g;  w -= lr * (g + 0.9 * m)

Clip the gradient the optimizer will use: after fp16 unscaling, once per optimizer step on the
accumulated gradient, after DDP's all-reduce; in an Accelerate loop `unscale_and_clip_` does that.
Under FSDP2 (`fully_shard`) the clipping works on the local shards (call `prepare_for_fsdp2` first);
FSDP1 and DeepSpeed flatten parameters and are refused by `assert_agc_supported`. Those three, and
how a sharded tensor's norms are summed over processes, are in `agc_distributed`.
"""
from __future__ import annotations

import fnmatch
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, NamedTuple, Optional, Union

import torch
from torch import nn

from .errors import NFNetZooError

_GRAD_NORM_FLOOR = 1e-6  # DeepMind's max(||G||, 1e-6): a division guard, inert unless clipping * eps < 1e-6


@dataclass(frozen=True)
class AGCStats:
    """What one `adaptive_clip_grad_` call did; `clipped` stays on the device until you ask."""

    clipped: torch.Tensor  # 0-d integer tensor: units whose gradient was rescaled
    units: int             # units seen (under FSDP2: those of this process's shards)

    def clipped_fraction(self) -> float:
        """Fraction of units clipped (reads `clipped`: a device sync on accelerators)."""
        return self.clipped.item() / self.units if self.units else 0.0


@torch.no_grad()
def adaptive_clip_grad_(parameters: Union[torch.Tensor, Iterable[torch.Tensor]], clipping: float = 0.01,
                        eps: float = 1e-3) -> AGCStats:
    """Clip gradients unit-wise in place, as DeepMind's AGC (see the module docstring).

    `parameters`: the tensors to clip, usually `clipped_parameters(model)` (parameters without a
    gradient are skipped). `clipping` is the paper's lambda; `eps` floors the weight norm so that
    zero-initialised parameters can move. Norms are taken in float32 (float64 for float64 tensors)
    whatever the gradient dtype. Works on plain tensors (single device, DDP after backward) and,
    once `agc_distributed` is imported (`prepare_for_fsdp2` does), on FSDP2 DTensors sharded on
    dim 0. Returns `AGCStats` without synchronising the device.
    """
    if not (clipping > 0 and eps > 0):
        raise NFNetZooError(f"AGC needs clipping > 0 and eps > 0, got clipping={clipping}, eps={eps}; "
                            "the paper uses clipping=0.01 (batch 4096: 0.01-0.02) and eps=1e-3")
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return AGCStats(torch.zeros((), dtype=torch.long), 0)
    clipped, units = [], 0
    for (_, dtype), batch in _batches(params).items():
        clipped.append(_clip_batch(batch, dtype, clipping, eps))
        units += sum(batch.grads_and_units()[1])
    total = clipped[0]
    for count in clipped[1:]:  # batches on other devices
        total = total + count.to(total.device)
    return AGCStats(total, units)


def _clip_batch(batch: _Batch, dtype: torch.dtype, clipping: float, eps: float) -> torch.Tensor:
    """The formula on every unit of the batch at once; returns how many units were clipped."""
    w_norm, g_norm = _norms(batch, dtype)             # ||W_i||, ||G_i||
    max_norm = w_norm.clamp_min_(eps).mul_(clipping)  # clipping * max(||W_i||, eps)
    trigger = g_norm > max_norm                       # only where ||G_i|| > max_norm_i
    # G_i <- G_i * max_norm_i / max(||G_i||, 1e-6)
    scale = torch.where(trigger, max_norm / g_norm.clamp_min(_GRAD_NORM_FLOOR), 1.0)
    grads, units = batch.grads_and_units()
    torch._foreach_mul_(grads, [_unit_view(s, g) for s, g in zip(scale.split(units), grads)])
    return trigger.sum()


# --- unit-wise norms, batched by device and norm dtype ---------------------------------------
@functools.lru_cache(maxsize=1024)  # called for every tensor of every step; a model has few shapes
def _is_unitwise(shape: torch.Size) -> bool:
    # More than one non-unit dimension: one norm per slice of dim 0; else one norm for the tensor.
    return sum(s != 1 for s in shape) > 1


@dataclass
class _Batch:
    """Tensors whose norms are computed together: same device and norm dtype."""

    unit_w: list[torch.Tensor] = field(default_factory=list)   # normed per slice of dim 0
    unit_g: list[torch.Tensor] = field(default_factory=list)
    units: list[int] = field(default_factory=list)             # slices of dim 0 held here
    whole_w: list[torch.Tensor] = field(default_factory=list)  # normed as a whole
    whole_g: list[torch.Tensor] = field(default_factory=list)
    sharded: dict[Callable, list[int]] = field(default_factory=dict)  # sum_over_shards -> whole_* indices

    def grads_and_units(self) -> tuple[list[torch.Tensor], list[int]]:
        """Every gradient with its count of units, in the order of `_norms`."""
        return self.unit_g + self.whole_g, self.units + [1] * len(self.whole_g)


def _batches(params: list[torch.Tensor]) -> dict[tuple, _Batch]:
    batches: dict[tuple, _Batch] = {}
    for p in params:
        w, g, sum_over_shards = _shard(p)
        norm_dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        batch = batches.setdefault((g.device, norm_dtype), _Batch())
        if _is_unitwise(p.shape):  # the global shape: a shard holds whole units
            batch.unit_w.append(w)
            batch.unit_g.append(g)
            batch.units.append(g.shape[0])
        else:
            if sum_over_shards is not None:
                batch.sharded.setdefault(sum_over_shards, []).append(len(batch.whole_w))
            batch.whole_w.append(w)
            batch.whole_g.append(g)
    return batches


_NORM_DIMS = {n: tuple(range(1, n)) for n in range(2, 12)}


def _norms(batch: _Batch, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """||W_i|| and ||G_i|| of every unit of the batch."""
    # torch has no foreach reduction along a dim, so this is one reduction kernel per weight tensor.
    w = [torch.linalg.vector_norm(t, 2, _NORM_DIMS[t.ndim], dtype=dtype) for t in batch.unit_w]
    g = [torch.linalg.vector_norm(t, 2, _NORM_DIMS[t.ndim], dtype=dtype) for t in batch.unit_g]
    if batch.whole_w:
        whole_w = torch.stack(torch._foreach_norm(batch.whole_w, 2, dtype=dtype))
        whole_g = torch.stack(torch._foreach_norm(batch.whole_g, 2, dtype=dtype))
        for sum_over_shards, index in batch.sharded.items():  # a whole tensor's norm from its shards
            idx = torch.tensor(index, device=whole_w.device)
            squares = torch.cat([whole_w[idx], whole_g[idx]]).square_()
            sum_over_shards(squares)
            whole_w[idx], whole_g[idx] = squares.sqrt_().split(len(index))
        w.append(whole_w)
        g.append(whole_g)
    return torch.cat(w), torch.cat(g)


def _unit_view(scale: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    # One scale per slice of dim 0 (a 0-d gradient has one unit).
    return scale.view(-1, *(1,) * (g.ndim - 1)) if g.ndim else scale.view(())


# --- sharded parameters: the one extension point --------------------------------------------
class Shard(NamedTuple):
    """This process's part of a parameter and its gradient, laid out alike and holding whole units."""

    param: torch.Tensor
    grad: torch.Tensor
    # Sums squared norms over the processes in place (hashable: tensors sharing it are summed at
    # once); None when the whole tensor is here.
    sum_over_shards: Optional[Callable[[torch.Tensor], None]] = None


# Functions giving the `Shard` of a sharded parameter, or None when they do not know its type.
_SHARDINGS: list[Callable[[torch.Tensor], Optional[Shard]]] = []


def register_sharding(local_shard: Callable[[torch.Tensor], Optional[Shard]]) -> None:
    """Teach AGC a sharded tensor type (`agc_distributed` registers FSDP2's DTensor on import)."""
    if local_shard not in _SHARDINGS:
        _SHARDINGS.append(local_shard)


def _shard(p: torch.Tensor) -> Shard:
    for local_shard in _SHARDINGS:
        shard = local_shard(p)
        if shard is not None:
            return shard
    if type(p).__module__.startswith("torch.distributed"):
        raise NFNetZooError(f"AGC got a sharded parameter ({type(p).__name__}) but does not know its shards; "
                            "import nfnet_zoo.agc_distributed (prepare_for_fsdp2 and unscale_and_clip_ "
                            "live there) before clipping")
    return Shard(p, p.grad)


# --- which parameters: clipped, decayed ----------------------------------------------------
def _unwrap(model: nn.Module) -> nn.Module:
    # DDP keeps the model in `.module`, torch.compile in `._orig_mod`; names then match the model's.
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _classifiers(model: nn.Module) -> Optional[list[nn.Module]]:
    """The classifier module(s) by identity, or None when the model names none."""
    if hasattr(model, "get_classifier"):
        found = model.get_classifier()
    else:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        names = cfg.get("classifier")
        if not names:
            return None
        names = (names,) if isinstance(names, str) else tuple(names)
        try:
            found = [model.get_submodule(n) for n in names]
        except AttributeError:
            return None
    found = found if isinstance(found, (list, tuple)) else [found]
    return [m for m in found if isinstance(m, nn.Module)] if found else None


def classifier_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the classifier (`model.get_classifier()`, or `pretrained_cfg["classifier"]`), by identity;
    empty for a headless model. Raises `NFNetZooError` when the model names no classifier."""
    model = _unwrap(model)
    heads = _classifiers(model)
    if heads is None:
        raise NFNetZooError(f"cannot identify the classifier of {type(model).__name__} (no get_classifier() or "
                            "pretrained_cfg['classifier'])")
    return [p for m in heads for p in m.parameters()]


def clipped_parameters(model: nn.Module, exclude: Union[str, Iterable[str]] = ()) -> list[nn.Parameter]:
    """The parameters AGC clips: every trainable parameter except the classifier's weight.

    As DeepMind's NFNet experiment: the final linear layer's weight is not clipped, its bias is.
    The classifier is found by identity from `model.get_classifier()` (timm's interface; tuples such
    as DeiT's two heads work) or else from `model.pretrained_cfg["classifier"]`; its parameters with
    more than one dimension are excluded, whatever the model family. A headless model
    (`num_classes=0`) has nothing to exclude. `exclude` adds glob patterns (`fnmatch.fnmatchcase`)
    matched against names from `model.named_parameters()`, e.g. `("head.*", "*.pos_embed")`.

    Call it after `fully_shard` or `accelerator.prepare`, which replace parameters under FSDP2.
    Raises `NFNetZooError` when no classifier can be identified and no `exclude` is given, or when a
    pattern matches no parameter.
    """
    model = _unwrap(model)
    patterns = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    heads = _classifiers(model)
    if heads is None and not patterns:
        raise NFNetZooError(f"cannot identify the classifier of {type(model).__name__} (no get_classifier() "
                            "or pretrained_cfg['classifier']); pass exclude=['<classifier>.weight'] naming "
                            "the parameters AGC must not clip")
    excluded = {id(p) for m in heads or () for p in m.parameters() if p.ndim > 1}
    named = list(model.named_parameters())
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n, _ in named):
            raise NFNetZooError(f"exclude pattern {pattern!r} matches no parameter of "
                                f"{type(model).__name__}; use glob patterns over the names of "
                                "model.named_parameters()")
    return [p for n, p in named if p.requires_grad and id(p) not in excluded
            and not any(fnmatch.fnmatchcase(n, pattern) for pattern in patterns)]


def weight_decay_groups(model: nn.Module, weight_decay: float, layer_decay: Optional[float] = None
                        ) -> list[dict[str, Any]]:
    """Parameter groups for `torch.optim.SGD(..., momentum=0.9, nesterov=True)` = DeepMind's `SGD_AGC`.

    No weight decay on the parameters `model.no_weight_decay()` names (for our NFNet: gains, skip
    gains and biases, the classifier bias included) nor, for any timm model, on tensors with at most
    one dimension or named `*.bias`; `weight_decay` on everything else, the classifier weight
    included. timm's `create_optimizer_v2(model, "sgd", ...)` builds the same groups. With AGC applied
    to the gradients before `optimizer.step()`, torch's SGD then computes DeepMind's update:
    `g = clip(g) + wd * w;  m = momentum * m + g;  w -= lr * (g + momentum * m)`.

    `layer_decay`: timm's `param_groups_layer_decay` instead, the same decayed set split by layer (the model's
    `group_matcher`), each group with the `lr_scale` timm's schedulers multiply the learning rate by.
    """
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay

    model = _unwrap(model)
    no_decay = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    if layer_decay is not None:
        return param_groups_layer_decay(model, weight_decay, no_weight_decay_list=no_decay, layer_decay=layer_decay)
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=no_decay)


__all__ = ["AGCStats", "adaptive_clip_grad_", "classifier_parameters", "clipped_parameters", "weight_decay_groups", "Shard",
           "register_sharding"]
