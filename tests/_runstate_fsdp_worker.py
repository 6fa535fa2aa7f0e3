"""Two CPU processes (gloo) save and resume the run state (runstate.py) of an FSDP2-sharded NFNet; spawned by
tests/test_runstate.py.

Usage: python tests/_runstate_fsdp_worker.py DIR. Trains 3 steps, saves DIR/run/state, trains 2 more (the
reference); then a model with other initial weights and scrambled generators loads the state and trains the
same 2 steps. Rank 0 writes DIR/result.json: whether the two ends are equal, bit for bit.
"""
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

WORLD = 2


class _Processes:
    """The part of accelerate.Accelerator that runstate.py uses, over torch.distributed (Accelerate runs FSDP2
    only on accelerators, so the CPU test drives torch's fully_shard directly)."""

    def __init__(self, rank):
        self.process_index, self.is_main_process, self.num_processes, self.scaler = rank, rank == 0, WORLD, None

    def wait_for_everyone(self):
        dist.barrier()


def _sharded(seed, mesh):
    import timm
    from timm.scheduler import create_scheduler_v2
    from torch.distributed.fsdp import fully_shard

    from nfnet_zoo import prepare_for_fsdp2, weight_decay_groups

    torch.manual_seed(seed)
    model = prepare_for_fsdp2(timm.create_model("nfnet_zoo_tiny", num_classes=3, drop_rate=0.3))
    for stage in model.stages:
        fully_shard(stage, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(weight_decay_groups(model, 1e-4), lr=0.1, momentum=0.9, nesterov=True)
    sched, _ = create_scheduler_v2(opt, sched="cosine", num_epochs=2, warmup_epochs=1, step_on_epochs=False,
                                   updates_per_epoch=5)
    return model, opt, sched


def _steps(model, opt, sched, start, n):
    for i in range(start, start + n):
        x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 3, (4,))  # each process's generator: restored
        F.cross_entropy(model(x), y).backward()  # dropout draws from the generator too
        opt.step()
        opt.zero_grad()
        sched.step_update(i + 1)


def _full(model):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _run(rank, out):
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        from nfnet_zoo.training.runstate import load_run_state, save_run_state
        torch.set_num_threads(1)
        mesh = init_device_mesh("cpu", (WORLD,))
        processes, run = _Processes(rank), out / "run"
        run.mkdir(exist_ok=True)
        model, opt, sched = _sharded(0, mesh)
        torch.manual_seed(10 + rank)
        _steps(model, opt, sched, 0, 3)
        save_run_state(processes, run, model, opt, sched, {"step": 3})
        _steps(model, opt, sched, 3, 2)
        reference = _full(model)

        model, opt, sched = _sharded(1, mesh)  # other weights, other generators: all must come from the state
        progress = load_run_state(processes, run, model, opt, sched, {"step": 0})
        _steps(model, opt, sched, progress["step"], 2)
        resumed = _full(model)
        if rank == 0:
            manifest = json.loads((run / "state" / "manifest.json").read_text())
            (out / "result.json").write_text(json.dumps({
                "equal": reference.keys() == resumed.keys() and all(torch.equal(reference[k], resumed[k])
                                                                    for k in reference),
                "tensors": len(reference), "progress": progress, "files": sorted(manifest["files"])}))
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
