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
FSDP1 and DeepSpeed flatten parameters and are refused by `assert_agc_supported`.
"""
from __future__ import annotations

import fnmatch
import functools
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Union

import torch
from torch import nn

from .errors import NFNetZooError
from .versions import FSDP2_ACCELERATE, too_old

_GRAD_NORM_FLOOR = 1e-6  # DeepMind's max(||G||, 1e-6): a division guard, inert unless clipping * eps < 1e-6


@dataclass(frozen=True)
class AGCStats:
    """What one `adaptive_clip_grad_` call did; `clipped` stays on the device until you ask."""

    clipped: torch.Tensor  # 0-d integer tensor: units whose gradient was rescaled
    units: int             # units seen (under FSDP2: those of this process's shards)

    def clipped_fraction(self) -> float:
        """Fraction of units clipped (reads `clipped`: a device sync on accelerators)."""
        return self.clipped.item() / self.units if self.units else 0.0


@functools.lru_cache(maxsize=1024)  # called for every tensor of every step; a model has few shapes
def _is_unitwise(shape: torch.Size) -> bool:
    # More than one non-unit dimension: one norm per slice of dim 0; else one norm for the tensor.
    return sum(s != 1 for s in shape) > 1


def _dtensor_type() -> Optional[type]:
    # A DTensor can only exist once its module is imported; skipping the import keeps startup fast.
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def _local(p: torch.Tensor, dtensor: type) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """A DTensor's local (parameter, gradient) and the mesh dims to reduce whole-tensor norms over."""
    if not isinstance(p.grad, dtensor) or p.grad.placements != p.placements:
        raise NFNetZooError("a sharded parameter has a gradient laid out differently from itself; "
                            "clip after backward of a model wrapped only by fully_shard (FSDP2)")
    dims = []
    for i, placement in enumerate(p.placements):
        if placement.is_partial() or (placement.is_shard() and placement.dim != 0):
            raise NFNetZooError(f"AGC needs parameters sharded on dim 0 (FSDP2's default), got "
                                f"{p.placements}; do not pass shard_placement_fn to fully_shard")
        if placement.is_shard():
            dims.append(i)
    return p.to_local(), p.grad.to_local(), (p.device_mesh, tuple(dims)) if dims else ()


class _Group:
    """Tensors whose norms are computed together: same device and norm dtype."""

    def __init__(self) -> None:
        self.unit_p: list[torch.Tensor] = []    # tensors normed per slice of dim 0
        self.unit_g: list[torch.Tensor] = []
        self.units: list[int] = []              # slices of dim 0 held here (a shard's share under FSDP2)
        self.whole_p: list[torch.Tensor] = []   # tensors normed as a whole
        self.whole_g: list[torch.Tensor] = []
        self.sharded: dict[tuple, list[int]] = {}  # (mesh, mesh dims) -> indices into whole_*

    def gradients_and_units(self) -> tuple[list[torch.Tensor], list[int]]:
        """Every gradient, with its count of units, in the order of the norms `_clip_group` builds."""
        return self.unit_g + self.whole_g, self.units + [1] * len(self.whole_g)


def _plan(params: list[torch.Tensor]) -> dict[tuple, _Group]:
    groups: dict[tuple, _Group] = {}
    dtensor = _dtensor_type()
    for p in params:
        if dtensor is not None and isinstance(p, dtensor):
            p_local, g_local, reduce = _local(p, dtensor)
        else:
            p_local, g_local, reduce = p, p.grad, ()
        norm_dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        group = groups.get((g_local.device, norm_dtype))
        if group is None:
            group = groups[(g_local.device, norm_dtype)] = _Group()
        if _is_unitwise(p.shape):  # the global shape: a shard holds whole units
            group.unit_p.append(p_local)
            group.unit_g.append(g_local)
            group.units.append(g_local.shape[0])
        else:
            if reduce:
                group.sharded.setdefault(reduce, []).append(len(group.whole_p))
            group.whole_p.append(p_local)
            group.whole_g.append(g_local)
    return groups


_NORM_DIMS = {n: tuple(range(1, n)) for n in range(2, 12)}


def _unit_norms(tensors: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    # torch has no foreach reduction along a dim, so this is one reduction kernel per weight tensor.
    return [torch.linalg.vector_norm(t, 2, _NORM_DIMS[t.ndim], dtype=dtype) for t in tensors]


def _reduce_sharded_norms(group: _Group, p_norms: torch.Tensor, g_norms: torch.Tensor) -> None:
    """Whole-tensor norms of sharded tensors: all-reduce the squared sums over the shards."""
    import torch.distributed as dist

    for (mesh, dims), index in group.sharded.items():
        idx = torch.tensor(index, device=p_norms.device)
        squares = torch.cat([p_norms[idx], g_norms[idx]]).square_()
        for dim in dims:
            dist.all_reduce(squares, group=mesh.get_group(dim))
        squares.sqrt_()
        p_norms[idx], g_norms[idx] = squares.split(len(index))


def _unit_view(scale: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    # One scale per slice of dim 0 (a 0-d gradient has one unit).
    return scale.view(-1, *(1,) * (g.ndim - 1)) if g.ndim else scale.view(())


def _clip_group(group: _Group, dtype: torch.dtype, clipping: float, eps: float) -> torch.Tensor:
    parts_p, parts_g = [], []
    parts_p += _unit_norms(group.unit_p, dtype)
    parts_g += _unit_norms(group.unit_g, dtype)
    if group.whole_p:
        wp = torch.stack(torch._foreach_norm(group.whole_p, 2, dtype=dtype))
        wg = torch.stack(torch._foreach_norm(group.whole_g, 2, dtype=dtype))
        if group.sharded:
            _reduce_sharded_norms(group, wp, wg)
        parts_p.append(wp)
        parts_g.append(wg)
    p_norm, g_norm = torch.cat(parts_p), torch.cat(parts_g)
    max_norm = p_norm.clamp_min_(eps).mul_(clipping)
    trigger = g_norm > max_norm
    scale = torch.where(trigger, max_norm / g_norm.clamp_min(_GRAD_NORM_FLOOR), 1.0)

    grads, sizes = group.gradients_and_units()
    torch._foreach_mul_(grads, [_unit_view(s, g) for s, g in zip(scale.split(sizes), grads)])
    return trigger.sum()


@torch.no_grad()
def adaptive_clip_grad_(parameters: Union[torch.Tensor, Iterable[torch.Tensor]], clipping: float = 0.01,
                        eps: float = 1e-3) -> AGCStats:
    """Clip gradients unit-wise in place, as DeepMind's AGC (see the module docstring).

    `parameters`: the tensors to clip, usually `clipped_parameters(model)` (parameters without a
    gradient are skipped). `clipping` is the paper's lambda; `eps` floors the weight norm so that
    zero-initialised parameters can move. Norms are taken in float32 (float64 for float64 tensors)
    whatever the gradient dtype. Works on plain tensors (single device, DDP after backward) and on
    FSDP2 DTensors sharded on dim 0. Returns `AGCStats` without synchronising the device.
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
    for (_, dtype), group in _plan(params).items():
        clipped.append(_clip_group(group, dtype, clipping, eps))
        units += sum(group.gradients_and_units()[1])
    total = clipped[0]
    for count in clipped[1:]:  # groups on other devices
        total = total + count.to(total.device)
    return AGCStats(total, units)


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


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Parameter groups for `torch.optim.SGD(..., momentum=0.9, nesterov=True)` = DeepMind's `SGD_AGC`.

    No weight decay on the parameters `model.no_weight_decay()` names (for our NFNet: gains, skip
    gains and biases, the classifier bias included) nor, for any timm model, on tensors with at most
    one dimension or named `*.bias`; `weight_decay` on everything else, the classifier weight
    included. timm's `create_optimizer_v2(model, "sgd", ...)` builds the same groups. With AGC applied
    to the gradients before `optimizer.step()`, torch's SGD then computes DeepMind's update:
    `g = clip(g) + wd * w;  m = momentum * m + g;  w -= lr * (g + momentum * m)`.
    """
    from timm.optim import param_groups_weight_decay

    model = _unwrap(model)
    no_decay = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=no_decay)


# --- distributed training and Accelerate ---------------------------------------------------
def _flattening_wrapper(target: Any) -> Optional[str]:
    """Name of the wrapper that flattens `target`'s parameters (FSDP1, DeepSpeed), or None."""
    if hasattr(target, "distributed_type") and hasattr(target, "state"):  # an accelerate Accelerator
        kind = str(getattr(target.distributed_type, "value", target.distributed_type))
        if kind == "DEEPSPEED":
            return "DeepSpeed"
        if kind == "FSDP":
            plugin = getattr(target.state, "fsdp_plugin", None)
            if getattr(plugin, "fsdp_version", 1) != 2:
                return "FSDP1"
        return None
    for module in target.modules():
        names = {c.__name__ for c in type(module).__mro__}
        if "FullyShardedDataParallel" in names:
            return "FSDP1"
        if "DeepSpeedEngine" in names:
            return "DeepSpeed"
    for p in target.parameters():
        if getattr(p, "_is_flat_param", False):
            return "FSDP1"
        if hasattr(p, "ds_id"):  # DeepSpeed ZeRO-3 partitions parameters in place
            return "DeepSpeed"
    return None


def assert_agc_supported(target: Any) -> None:
    """Refuse AGC where parameters are flattened: FSDP1 (FlatParameter) and DeepSpeed.

    `target`: an `accelerate.Accelerator` (checks its distributed configuration) or a model,
    wrapped or not. Unit-wise norms need each parameter's own shape; raises `NFNetZooError`
    naming what to use instead.
    """
    wrapper = _flattening_wrapper(target)
    if wrapper:
        fix = "use FSDP2 (FullyShardedDataParallelPlugin(fsdp_version=2) / torch fully_shard) or DDP"
        old = too_old("accelerate", FSDP2_ACCELERATE) if hasattr(target, "distributed_type") else None
        if wrapper == "FSDP1" and old:  # this accelerate cannot make FSDP2 (fsdp_version: 2 is ignored)
            fix = f"use DDP, or FSDP2 (fsdp_version=2), which needs a newer accelerate: {old}"
        raise NFNetZooError(f"AGC needs each parameter's own shape for its unit-wise norms, but {wrapper} "
                            f"flattens parameters; {fix}")


def unscale_and_clip_(accelerator: Any, parameters: Iterable[torch.Tensor], clipping: float = 0.01,
                      eps: float = 1e-3) -> Optional[AGCStats]:
    """AGC in an Accelerate loop: call right after `accelerator.backward(loss)`, before `optimizer.step()`.

    On gradient-accumulation micro-steps (`accelerator.sync_gradients` false) it does nothing and
    returns None, so the accumulated gradient is clipped once. On the syncing step it refuses FSDP1
    and DeepSpeed, unscales fp16 gradients (`accelerator.unscale_gradients()`; a step GradScaler
    skips for inf/nan stays skipped) and clips `parameters`, usually `clipped_parameters(model)`
    built after `accelerator.prepare`. Raises `NFNetZooError` if none of them has a gradient.
    """
    if not accelerator.sync_gradients:
        return None
    assert_agc_supported(accelerator)
    accelerator.unscale_gradients()
    stats = adaptive_clip_grad_(parameters, clipping, eps)
    if stats.units == 0:
        raise NFNetZooError("none of the parameters given to AGC has a gradient; build "
                            "clipped_parameters(model) after accelerator.prepare(model), which replaces "
                            "parameters under FSDP2")
    return stats


def _squeeze_scalars(names: tuple[str, ...]):
    def hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
        dtensor = _dtensor_type()
        for name in names:
            value = state_dict.get(prefix + name)
            # Only sharded values: Accelerate's cpu_ram_efficient_loading shards the unsharded (1,) ones.
            if dtensor is not None and isinstance(value, dtensor) and value.device.type != "meta":
                state_dict[prefix + name] = value.full_tensor().reshape(())
    return hook


def _unsqueeze_scalars(names: tuple[str, ...]):
    def hook(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        dtensor = _dtensor_type()
        for name in names:
            value, param = state_dict.get(prefix + name), getattr(module, name)
            if value is None or value.shape != ():
                continue
            value = value.reshape(1)
            if dtensor is not None and isinstance(param, dtensor) and not isinstance(value, dtensor):
                from torch.distributed.tensor import distribute_tensor

                # Every rank holds the full value: slice locally, no communication.
                value = distribute_tensor(value.to(param.device), param.device_mesh, param.placements,
                                          src_data_rank=None)
            state_dict[prefix + name] = value
    return hook


def prepare_for_fsdp2(model: nn.Module) -> nn.Module:
    """Make `model` shardable by `fully_shard` (FSDP2): its 0-d parameters (skip gains) become (1,).

    Call before `fully_shard` / `accelerator.prepare` (its `cpu_ram_efficient_loading` included),
    before the first optimizer step. The parameters keep their identity; forward results, AGC (still
    one unit) and weight decay are unchanged. Once sharded, `state_dict()` (hence
    `get_model_state_dict`, `accelerator.get_state_dict`) gives the skip gains 0-d again, so saved
    checkpoints stay timm-compatible; gathering them is a collective, so call it on every rank.
    `load_state_dict()` accepts 0-d and (1,) skip gains. Returns the same model.
    """
    for module in _unwrap(model).modules():
        names = tuple(n for n, p in module.named_parameters(recurse=False) if p.ndim == 0)
        if not names:
            continue
        # (1,) rather than FSDP2's ignored_params: ignored gains would get no gradient all-reduce.
        for name in names:
            param = getattr(module, name)
            param.data = param.data.reshape(1)  # same Parameter object: optimizers built before stay valid
        module.register_state_dict_post_hook(_squeeze_scalars(names))
        module.register_load_state_dict_pre_hook(_unsqueeze_scalars(names))
    return model


__all__ = ["AGCStats", "adaptive_clip_grad_", "clipped_parameters", "weight_decay_groups",
           "assert_agc_supported", "unscale_and_clip_", "prepare_for_fsdp2"]
