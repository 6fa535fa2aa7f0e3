"""One of N gloo processes (torchrun) streaming WebDataset shards as `nfnet-zoo finetune` does: it writes the sample
numbers its train stream gave each epoch (through 2 DataLoader workers, one all_reduce per batch as DDP's backward
does) and its validation share, and the validation loss of the loop's own `_validate_stream`, for tests/test_shards.py.

argv: DATA_DIR OUT_DIR BATCH_SIZE
"""
import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from _shards import read_back
from nfnet_zoo_cli import exit_process
from nfnet_zoo.data import load_image_data
from nfnet_zoo.data.shards import OnDevice, ShardStream
from nfnet_zoo.training.finetune import _validate_stream

data_dir, out, batch_size = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
accelerator = Accelerator(cpu=True)
rank, world = accelerator.process_index, accelerator.num_processes
data = load_image_data(data_dir)
numbers = lambda img: torch.tensor(read_back(img))  # (label, sample number)
stream = ShardStream(data, "train", numbers, seed=1, batch_size=batch_size, rank=rank, world=world,
                     batches=data.num_train // (batch_size * world))
loader = torch.utils.data.DataLoader(stream, batch_size=batch_size, num_workers=2)
epochs = []
for epoch in range(2):
    stream.epoch, seen = epoch, []
    for x, y in loader:
        torch.distributed.all_reduce(torch.ones(1))  # a process with fewer batches would hang the other here
        assert torch.equal(x[:, 0], y), "a label that is not its image's class"
        seen += x[:, 1].tolist()
    epochs.append(seen)
val = [int(x[1]) for x, _ in ShardStream(data, "val", numbers, rank=rank, world=world)]


class Scores(torch.nn.Module):
    """Logits (n mod 5, 0, 0) for the image of sample n: each sample's loss differs, so a sample counted twice or
    left out moves the mean."""

    def forward(self, x):
        z = torch.zeros(len(x), 3)
        z[:, 0] = (x[:, 1] % 5).float()
        return z


images = lambda img: torch.tensor(read_back(img)).float()
val_loader = OnDevice(torch.utils.data.DataLoader(ShardStream(data, "val", images, rank=rank, world=world),
                                                  batch_size=3, num_workers=2), accelerator.device)
metrics = _validate_stream(Scores(), val_loader, accelerator, 3)
(out / f"rank-{rank}.json").write_text(json.dumps({"epochs": epochs, "val": val, "metrics": metrics,
                                                   "batches": len(loader)}))
accelerator.end_training()
exit_process(0)
