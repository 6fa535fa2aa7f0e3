"""Two CPU processes (gloo) train with AGC under DDP and FSDP2; spawned by tests/test_agc_distributed.py.

Usage: python tests/_agc_dist_worker.py DIR. Reads DIR/inputs.pt (model kwargs, initial state dict,
global batches, hyper-parameters), writes DIR/result.pt from rank 0.
"""
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

WORLD = 2


def _model(inputs):
    import timm

    import nfnet_zoo  # noqa: F401  (registers the variants)

    model = timm.create_model("nfnet_zoo_tiny", **inputs["model_kwargs"])
    model.load_state_dict(inputs["state_dict"])
    return model


def _optimizer(model, inputs):
    from nfnet_zoo import weight_decay_groups

    return torch.optim.SGD(weight_decay_groups(model, inputs["weight_decay"]), lr=inputs["lr"],
                           momentum=0.9, nesterov=True)


def _ddp(rank, inputs):
    # DDP with two accumulation micro-batches per step: clip once, after the all-reduce.
    from torch.nn.parallel import DistributedDataParallel

    from nfnet_zoo import adaptive_clip_grad_, clipped_parameters

    model = DistributedDataParallel(_model(inputs))
    optimizer = _optimizer(model, inputs)
    clipped = clipped_parameters(model)
    fractions = []
    for x, y in inputs["batches"]:
        x, y = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
        optimizer.zero_grad()
        with model.no_sync():
            (F.cross_entropy(model(x[:2]), y[:2]) / 2).backward()
        (F.cross_entropy(model(x[2:]), y[2:]) / 2).backward()
        fractions.append(adaptive_clip_grad_(clipped, inputs["clipping"]).clipped_fraction())
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.module.state_dict().items()}, fractions


def _fsdp2(rank, inputs):
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         set_model_state_dict)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from nfnet_zoo import adaptive_clip_grad_, clipped_parameters, prepare_for_fsdp2

    def sharded(ram_efficient=False):
        model = prepare_for_fsdp2(_model(inputs))
        mesh = init_device_mesh("cpu", (WORLD,))
        if ram_efficient:  # as Accelerate's cpu_ram_efficient_loading: shard on meta, load rank 0's weights
            full = model.state_dict()
            model = model.to("meta")
        for stage in model.stages:
            fully_shard(stage, mesh=mesh)
        fully_shard(model, mesh=mesh)
        if ram_efficient:
            from accelerate.utils.fsdp_utils import fsdp2_load_full_state_dict

            fsdp2_load_full_state_dict(SimpleNamespace(is_main_process=rank == 0), model, full)
        return model

    model = sharded()
    optimizer = _optimizer(model, inputs)
    clipped = clipped_parameters(model)  # after fully_shard: it replaces the parameters
    units = []
    for x, y in inputs["batches"]:
        x, y = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        units.append(adaptive_clip_grad_(clipped, inputs["clipping"]).units)
        optimizer.step()
    full = StateDictOptions(full_state_dict=True)
    state = get_model_state_dict(model, options=full)
    # Accelerate's loading path, then the gathered checkpoint loaded back into a sharded model.
    again = sharded(ram_efficient=True)
    initial = get_model_state_dict(again, options=full)
    assert all(torch.equal(initial[k], v) for k, v in inputs["state_dict"].items())
    set_model_state_dict(again, dict(state), options=full)  # it replaces the dict's values
    reloaded = get_model_state_dict(again, options=full)
    assert all(torch.equal(reloaded[k], state[k]) for k in state)
    return state, units


def _fsdp1_refused(inputs):
    from torch.distributed.fsdp import FullyShardedDataParallel

    from nfnet_zoo import NFNetZooError, assert_agc_supported, prepare_for_fsdp2

    # FSDP1 refuses 0-d parameters too; prepare_for_fsdp2 lets it wrap the model.
    model = FullyShardedDataParallel(prepare_for_fsdp2(_model(inputs)), device_id=torch.device("cpu"))
    try:
        assert_agc_supported(model)
    except NFNetZooError as e:
        return str(e)
    return None


def _run(rank, out):
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        inputs = torch.load(out / "inputs.pt", weights_only=False)
        result = {"ddp": _ddp(rank, inputs), "fsdp2": _fsdp2(rank, inputs), "fsdp1": _fsdp1_refused(inputs)}
        if rank == 0:
            torch.save(result, out / "result.pt")
    finally:
        dist.destroy_process_group()
    # No interpreter teardown, as nfnet-zoo under torchrun (cli.exit_process): 1 two-process run in 5 to 8 aborted
    # there (SIGABRT in C++ static destruction) after its last line had run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    out_dir = Path(sys.argv[1]).resolve()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_run, args=(out_dir,), nprocs=WORLD, join=True)
