"""Two CPU processes (gloo, Accelerate's DDP) take one SAM step of the training loop on their halves of a batch;
spawned by tests/test_sam.py. Usage: python tests/_sam_dist_worker.py DIR: reads DIR/inputs.pt ({"x", "y"}),
writes DIR/result.safetensors (the weights after the step) from rank 0."""
import os
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

WORLD = 2


def _run(rank, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["SAM_TEST_PORT"])
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).parent))
    from safetensors.torch import save_file
    from test_sam import loop_step
    inputs = torch.load(out / "inputs.pt", weights_only=True)
    x, y = inputs["x"].chunk(WORLD)[rank], inputs["y"].chunk(WORLD)[rank]
    state = loop_step(x, y, 0.5, 0.5)  # e from this process's first 2 of its 4 images
    if rank == 0:
        save_file({k.removeprefix("module."): v.contiguous() for k, v in state.items()}, str(out / "result.safetensors"))
    import torch.distributed as dist
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no interpreter teardown (see tests/_agc_dist_worker.py)


if __name__ == "__main__":
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ["SAM_TEST_PORT"] = str(s.getsockname()[1])
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_run, args=(Path(sys.argv[1]).resolve(),), nprocs=WORLD, join=True)
