"""Fine-tuning speed: `nfnet-zoo finetune` vs a loop built the way timm's train.py trains.

Both train the same model on the same image folder with the same batch, image size, AGC setting,
augmentation (random-resized crop + flip, no colour jitter), label smoothing and workers:
- ours: `nfnet_zoo.finetune` (Accelerate, per-sample seeded augmentation, AGC on all but the
  classifier weight, exports and resumable state each epoch outside the timed loop);
- timm: `create_dataset` + `create_loader`, `create_optimizer_v2("sgd")`, `create_scheduler_v2`
  (per step), `LabelSmoothingCrossEntropy`, `dispatch_clip_grad(model_parameters(model,
  exclude_head=True), mode="agc")` and, with --model-ema, `ModelEmaV3`, as train.py's loop.
Images/s is the training loop of epochs after the first (worker start-up and warm-up excluded);
runs alternate so machine noise hits both. On a shared machine other processes only ever slow a run
down, so the best epoch of each is the headline figure (as timeit takes the minimum); medians too. A data-only pass of each pipeline
shows whether loading could be the bottleneck.

    python benchmarks/bench_finetune.py                      # tiny NFNet, 64 px, synthetic JPEG folder
    python benchmarks/bench_finetune.py --model nfnet_f0 --img-size 192 --data-dir DIR   # on a GPU
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def make_folder(root: Path, classes: int, per_class: int, size: int = 96) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", max(2, per_class // 10))):
        for c in range(classes):
            d = root / split / f"class{c:02d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = rng.integers(0, 256, (size, size, 3), dtype=np.uint8) // (c + 1)
                Image.fromarray(a).save(d / f"{i:04d}.jpg", quality=90)
    return root


def run_ours(args, data: Path, out: Path) -> list[float]:
    from nfnet_zoo.training.finetune import finetune
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = finetune(model=args.model, data_dir=str(data), output=str(out), epochs=args.epochs,
                       batch_size=args.batch_size, img_size=args.img_size, workers=args.workers,
                       clipping=args.clipping, model_ema=args.model_ema, pretrained=False, save_every=0,
                       hflip=0.5, seed=0, log_interval=50, mixed_precision=args.mixed_precision,
                       channels_last=args.channels_last)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["images_per_sec"] for r in rows[1:]]


def run_timm(args, data: Path) -> list[float]:
    import nfnet_zoo  # noqa: F401  (registers the model names)
    import timm
    from timm.data import create_dataset, create_loader, resolve_data_config
    from timm.loss import LabelSmoothingCrossEntropy
    from timm.models import model_parameters
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3, dispatch_clip_grad

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    dataset = create_dataset("", root=str(data / "train"), is_training=True)
    model = timm.create_model(args.model, num_classes=len(dataset.reader.class_to_idx)).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    dc = resolve_data_config(model=model)
    loader = create_loader(dataset, input_size=(3, args.img_size, args.img_size), batch_size=args.batch_size,
                           is_training=True, scale=(0.08, 1.0), hflip=0.5, color_jitter=0.0,
                           interpolation=dc["interpolation"], mean=dc["mean"], std=dc["std"],
                           num_workers=args.workers, pin_memory=device.type == "cuda", device=device,
                           use_prefetcher=device.type == "cuda", persistent_workers=args.workers > 0)
    lr = 0.1 * args.batch_size / 256
    optimizer = create_optimizer_v2(model, "sgd", lr=lr, weight_decay=2e-5, momentum=0.9)
    scheduler, _ = create_scheduler_v2(optimizer, "cosine", num_epochs=args.epochs, warmup_epochs=1,
                                       warmup_lr=0.0, step_on_epochs=False, updates_per_epoch=len(loader))
    loss_fn = LabelSmoothingCrossEntropy(0.1).to(device)
    clip_params = model_parameters(model, exclude_head=True)
    ema = ModelEmaV3(model, decay=0.9998) if args.model_ema else None
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)
    rates, updates = [], 0
    for epoch in range(args.epochs):
        model.train()
        start, images = time.perf_counter(), 0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            if args.clipping:
                dispatch_clip_grad(clip_params, value=args.clipping, mode="agc")
            optimizer.step()
            updates += 1
            scheduler.step_update(num_updates=updates)
            if ema is not None:
                ema.update(model, step=updates)
            images += x.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(images / (time.perf_counter() - start))
    return rates[1:]


def data_only(args, data: Path) -> dict[str, float]:
    """Images/s of each input pipeline alone (one pass after a warm-up pass)."""
    from timm.data import create_dataset, create_loader, create_transform
    from nfnet_zoo.data import EpochSampler, ImageDataset, WorkerSignals, load_image_data
    d = load_image_data(data, workers=args.workers)
    tf = create_transform(args.img_size, is_training=True, scale=(0.08, 1.0), hflip=0.5, color_jitter=0.0,
                          interpolation="bicubic")
    sampler = EpochSampler(len(d.train), 0)
    ours = torch.utils.data.DataLoader(ImageDataset(d.train, d.opener(), tf, 0), batch_size=args.batch_size,
                                       sampler=sampler, drop_last=True, num_workers=args.workers,
                                       persistent_workers=args.workers > 0, worker_init_fn=WorkerSignals())
    theirs = create_loader(create_dataset("", root=str(data / "train"), is_training=True),
                           input_size=(3, args.img_size, args.img_size), batch_size=args.batch_size,
                           is_training=True, color_jitter=0.0, num_workers=args.workers, use_prefetcher=False,
                           persistent_workers=args.workers > 0)
    out = {}
    for name, loader in (("ours", ours), ("timm", theirs)):
        for i in range(2):
            sampler.epoch = i
            start, n = time.perf_counter(), 0
            for x, _ in loader:
                n += x.shape[0]
        out[name] = n / (time.perf_counter() - start)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="nfnet_zoo_tiny")
    p.add_argument("--data-dir", help="image folder with train/ and val/ (default: a synthetic JPEG folder)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--images-per-class", type=int, default=64)
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("-b", "--batch-size", type=int, default=32)
    p.add_argument("-j", "--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--clipping", type=float, default=0.01)
    p.add_argument("--model-ema", action="store_true")
    p.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"))
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--repeats", type=int, default=2, help="alternating runs of each (default: 2)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = Path(args.data_dir) if args.data_dir else make_folder(tmp / "images", args.classes,
                                                                      args.images_per_class)
        ours, timm_rates = [], []
        for r in range(args.repeats):
            ours += run_ours(args, data, tmp / f"run{r}")
            timm_rates += run_timm(args, data)
        loading = data_only(args, data)
    o, t = max(ours), max(timm_rates)
    om, tm = statistics.median(ours), statistics.median(timm_rates)
    device = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(f"\n{args.model} {args.img_size}px, batch {args.batch_size}, AGC {args.clipping or 'off'}, "
          f"{args.workers} workers, {args.mixed_precision}, on {device}; {len(ours)} timed epochs each")
    print("                              best img/s   median img/s")
    print(f"  ours (nfnet-zoo finetune)   {o:10.1f}   {om:12.1f}")
    print(f"  timm train.py-style loop    {t:10.1f}   {tm:12.1f}")
    print(f"  ratio ours / timm           {o / t:10.2f}   {om / tm:12.2f}")
    print(f"  data loading alone: ours {loading['ours']:.0f} img/s, timm {loading['timm']:.0f} img/s "
          f"({loading['ours'] / o:.1f}x our training speed)")


if __name__ == "__main__":
    main()
