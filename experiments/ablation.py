"""One arm of the paper's batch-size ablation (section 4.1, its figure 2): train a network from scratch
on jittered digits and report its top-1.

An arm is a network, a batch size, a clipping threshold (None: no AGC) and a seed. Everything else is
the paper's recipe, scaled down: SGD with Nesterov momentum 0.9, learning rate BASE_LR * batch / 256
(linear scaling, as the paper), a linear warm-up over the first epoch then cosine decay to zero
(timm's scheduler), weight decay 2e-5 off the gains and biases, the same number of epochs for every
batch size. The NF arms clip with nfnet_zoo's AGC, the classifier excluded, as `nfnet-zoo finetune` does.

This loop rather than `nfnet-zoo finetune`: the grid trains about 80 networks in 30 minutes on 2
cores, and finetune's per-run costs (decoding image files, run folders, exports) would take most of it.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Optional

import timm
import torch
import torch.nn.functional as F
from timm.scheduler import CosineLRScheduler

import nfnet_zoo  # noqa: F401  (registers nfnet_zoo_tiny in timm)
from nfnet_zoo.agc import adaptive_clip_grad_, clipped_parameters, weight_decay_groups

WEIGHT_DECAY = 2e-5
# A micro NFNet (DeepMind's blocks at half of nfnet_zoo_tiny's widths: 1.8x the images a second of
# the tiny variant's 0.49M parameters on one core) and the paper's baseline, a batch-normalised ResNet
# from timm of the same depths and a similar size.
NETWORKS = {
    "nf": ("nfnet_zoo_tiny", dict(depths=(1, 1, 1, 1), widths=(16, 32, 64, 128), group_width=8,
                                  stem_widths=(8, 16, 32), drop_rate=0.0, stochdepth_rate=0.0)),  # 0.11M
    "bn": ("resnet18", dict(layers=(1, 1, 1, 1), channels=(10, 20, 40, 80))),  # 0.14M
}


@dataclass(frozen=True)
class Arm:
    network: str              # a key of NETWORKS
    batch: int
    clipping: Optional[float]  # None: no AGC
    seed: int

    @property
    def key(self) -> str:
        return f"{self.network}-b{self.batch}-c{self.clipping}-s{self.seed}"


@dataclass(frozen=True)
class Setup:
    """What is the same for every arm of one grid."""
    base_lr: float
    epochs: int
    train_images: int
    val_images: int
    data_seed: int = 0


def build(network: str) -> torch.nn.Module:
    name, kwargs = NETWORKS[network]
    return timm.create_model(name, num_classes=10, **kwargs)


def _param_groups(model: torch.nn.Module, network: str) -> list[dict]:
    if network == "nf":
        return weight_decay_groups(model, WEIGHT_DECAY)  # DeepMind's partition: no decay on gains
    from timm.optim import param_groups_weight_decay
    return param_groups_weight_decay(model, WEIGHT_DECAY)  # no decay on batch-norm and biases


@torch.no_grad()
def top1(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 in percent; a non-finite output counts as wrong (a diverged network scores 0)."""
    model.eval()
    right = 0
    for i in range(0, len(x), 500):
        logits = model(x[i:i + 500])
        right += ((logits.argmax(1) == y[i:i + 500]) & logits.isfinite().all(1)).sum().item()
    return 100.0 * right / len(x)


def train(arm: Arm, setup: Setup, data: tuple[torch.Tensor, ...]) -> dict:
    """Train ARM on DATA = (x_train, y_train, x_val, y_val); returns its record (top-1 after every epoch,
    whether and when the loss stopped being finite, the mean fraction of units AGC clipped)."""
    x_train, y_train, x_val, y_val = data
    torch.manual_seed(arm.seed)
    model = build(arm.network)
    lr = setup.base_lr * arm.batch / 256
    optimizer = torch.optim.SGD(_param_groups(model, arm.network), lr=lr, momentum=0.9, nesterov=True)
    steps_per_epoch = len(x_train) // arm.batch  # the last partial batch is dropped, as in the paper
    total = steps_per_epoch * setup.epochs
    schedule = CosineLRScheduler(optimizer, t_initial=total, warmup_t=steps_per_epoch, warmup_lr_init=0.0,
                                 warmup_prefix=True, t_in_epochs=False)
    clipped = clipped_parameters(model) if arm.clipping is not None else None
    order = torch.Generator().manual_seed(arm.seed)
    record = {**asdict(arm), "lr": lr, "steps": total, "top1": [], "train_loss": [], "diverged_at": None,
              "clipped_fraction": None}
    clip_sum, start, step = 0.0, time.perf_counter(), 0
    for epoch in range(setup.epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=order)
        loss_sum = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * arm.batch:(i + 1) * arm.batch]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            if not math.isfinite(loss.item()):
                record["diverged_at"] = epoch + (i + 1) / steps_per_epoch
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clipped is not None:
                stats = adaptive_clip_grad_(clipped, clipping=arm.clipping)
                clip_sum += stats.clipped_fraction()
            optimizer.step()
            step += 1
            schedule.step_update(step)
            loss_sum += loss.item()
        record["train_loss"].append(loss_sum / max(i + 1, 1))
        record["top1"].append(top1(model, x_val, y_val))
        if record["diverged_at"] is not None:
            break
    record["final_top1"] = record["top1"][-1]
    record["best_top1"] = max(record["top1"])
    if clipped is not None:
        record["clipped_fraction"] = clip_sum / max(step, 1)
    record["seconds"] = time.perf_counter() - start
    record["finished"] = time.time()  # with seconds: the grid's wall clock, across interrupted invocations
    return record
