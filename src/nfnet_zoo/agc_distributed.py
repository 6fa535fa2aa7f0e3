"""AGC in distributed training and Accelerate: what `agc` needs to know beyond one process's tensors.

- FSDP2 (`fully_shard`) shards each parameter on dim 0 as a DTensor. Each process clips its shard:
  a unit-wise tensor's shard holds whole units; a tensor normed as a whole (a bias, a gain) gets its
  norm from the squared norms of its shards, summed over the processes. Importing this module
  registers that with `agc` (`agc.register_sharding`).
- `prepare_for_fsdp2`: 0-d parameters (skip gains) cannot be sharded; they become (1,) and are 0-d
  again in state dicts.
- `assert_agc_supported`: FSDP1 and DeepSpeed flatten parameters, so unit-wise norms cannot be
  taken; they are refused.
- `unscale_and_clip_`: AGC in an Accelerate loop, once per optimizer step after unscaling.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
from torch import nn

from .agc import AGCStats, Shard, _unwrap, adaptive_clip_grad_, register_sharding
from .errors import NFNetZooError
from nfnet_zoo_cli.versions import FSDP2_ACCELERATE, too_old


# --- FSDP2's DTensor shards ----------------------------------------------------------------
def _dtensor_type() -> Optional[type]:
    # A DTensor can only exist once its module is imported; skipping the import keeps startup fast.
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


@dataclass(frozen=True)
class _SumOverShards:
    """All-reduce (sum) over the mesh dims a tensor is sharded on; equal for tensors sharded alike."""

    mesh: Any
    dims: tuple[int, ...]

    def __call__(self, squares: torch.Tensor) -> None:
        import torch.distributed as dist

        for dim in self.dims:
            dist.all_reduce(squares, group=self.mesh.get_group(dim))


def _dtensor_shard(p: torch.Tensor) -> Optional[Shard]:
    """A DTensor's local (parameter, gradient) and how to sum whole-tensor norms over its shards."""
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(p, dtensor):
        return None
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
    return Shard(p.to_local(), p.grad.to_local(), _SumOverShards(p.device_mesh, tuple(dims)) if dims else None)


register_sharding(_dtensor_shard)


# --- FSDP1 and DeepSpeed: refused ------------------------------------------------------------
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


# --- Accelerate ------------------------------------------------------------------------------
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


# --- FSDP2's 0-d parameters ------------------------------------------------------------------
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


__all__ = ["assert_agc_supported", "unscale_and_clip_", "prepare_for_fsdp2"]
