"""Loading the same images from a class folder, parquet files and WebDataset shards: ours against timm's readers.

    python benchmarks/bench_loading.py [--count 20000] [--workers 2] [--batches 0] [--out BENCHMARKS.md]

Writes --count photo-like 500x375 JPEGs (100 classes) once in each layout, in a temporary folder:
- a class folder (DIR/<class>/*.jpg);
- parquet files in the Hub's layout (DIR/data/train-0000N-of-0000M.parquet: an Image column of the JPEG bytes
  and a ClassLabel column, as `datasets.Dataset.push_to_hub` writes them);
- WebDataset shards (train-00000N.tar, 1,000 samples each: .jpg and .cls members).
Then, for each layout and each program, in this process:
- start-up: seconds from the call to the first training batch (finding and listing the data, the check we do by
  default, building the DataLoader and its workers, the first batch of --batch-size images);
- loading: images per second over --batches batches after the first (0: one epoch), decoding and timm's training
  transform at 192 px (nfnet_f0's train size), --workers DataLoader workers.
Ours is what `nfnet-zoo finetune` builds (`load_image_data` then the loaders of training/recipe.py, with our default
`--check-images full` on a first run and `none`); timm's is `timm.data.create_dataset` (folder reader, `hfds/` on
the parquet folder, `wds/` on the shards) in a DataLoader with the same transform, as timm's train.py reads them.
Files are in the page cache (just written); each parquet case starts with empty datasets caches (the files are
converted to arrow, as on a first run). Writes its section of BENCHMARKS.md; other sections are left alone.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))
from bench_startup import CLASSES, _jpegs, make_folder, write_section  # noqa: E402  the same generated images

HEADING = "## Loading the same images: class folder, parquet, WebDataset shards"
SIZE = 192      # nfnet_f0's training size
SHARD = 1000    # samples per shard and per parquet file


def make_parquet(folder: Path, out: Path) -> None:
    """The class folder as parquet files in the Hub's layout, written by `datasets` (Image and ClassLabel columns)."""
    import datasets
    classes = sorted(p.name for p in folder.iterdir())
    files = sorted((p for c in classes for p in (folder / c).iterdir()), key=lambda p: p.name)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
    (out / "data").mkdir(parents=True)
    n = (len(files) + SHARD - 1) // SHARD
    for i in range(n):
        part = files[i * SHARD:(i + 1) * SHARD]
        ds = datasets.Dataset.from_dict({"image": [{"bytes": p.read_bytes(), "path": p.name} for p in part],
                                         "label": [classes.index(p.parent.name) for p in part]}, features=features)
        ds.to_parquet(str(out / "data" / f"train-{i:05d}-of-{n:05d}.parquet"))


def make_shards(folder: Path, out: Path, info: bool) -> None:
    """The class folder as WebDataset shards (KEY.jpg + KEY.cls), with timm's _info.json when `info`."""
    import webdataset as wds
    classes = sorted(p.name for p in folder.iterdir())
    files = sorted((p for c in classes for p in (folder / c).iterdir()), key=lambda p: p.name)
    out.mkdir(parents=True)
    names, lengths = [], []
    for i in range(0, len(files), SHARD):
        names.append(f"train-{i // SHARD:06d}.tar")
        part = files[i:i + SHARD]
        lengths.append(len(part))
        with wds.TarWriter(str(out / names[-1])) as w:
            for p in part:
                w.write({"__key__": p.stem, "jpg": p.read_bytes(), "cls": classes.index(p.parent.name)})
    if info:
        (out / "_info.json").write_text(json.dumps({"name": "bench", "num_classes": len(classes), "splits": {
            "train": {"name": "train", "num_samples": sum(lengths), "filenames": names, "shard_lengths": lengths}}}))


class _Accelerator:
    """What build_loaders reads of an Accelerator on one CPU process."""
    num_processes, process_index = 1, 0
    device = __import__("torch").device("cpu")

    def prepare_data_loader(self, loader):
        return loader


def ours(data_dir: Path, check: str, workers: int, batch: int, model):
    """What `nfnet-zoo finetune` does before its first step with the data: find, check, split, build the loaders.
    The model is built beforehand (both programs build one; its time is not the data's)."""
    from nfnet_zoo.data import load_image_data
    from nfnet_zoo.training.recipe import FinetuneConfig, build_loaders
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = load_image_data(data_dir, val_split=0.0, workers=workers, check=check)
        cfg = FinetuneConfig(model="nfnet_f0", data_dir=str(data_dir), batch_size=batch, workers=workers,
                             img_size=SIZE, val_split=0.0, check_images=check)
        train, _, _ = build_loaders(cfg, data, model, _Accelerator())
    return train


def timms(data_dir: Path, kind: str, workers: int, batch: int, cache: Path):
    """timm's train.py reading the same data: create_dataset, then a DataLoader with its training transform."""
    import torch
    from timm.data import create_dataset, create_transform
    name = {"folder": "", "parquet": f"hfds/{data_dir}", "wds": "wds/"}[kind]
    kwargs = dict(batch_size=batch, num_samples=None) if kind == "wds" else {}
    ds = create_dataset(name, root=str(cache if kind == "parquet" else data_dir), split="train", is_training=True,
                        **kwargs)
    ds.transform = create_transform(SIZE, is_training=True)
    if kind == "wds":
        ds.set_loader_cfg(num_workers=workers)
        return torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers, drop_last=True,
                                           persistent_workers=workers > 0)
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                                       persistent_workers=workers > 0)


def run(build, batches: int, batch: int) -> tuple[float, float]:
    """(seconds from the call to the first batch, images per second over the next `batches` batches)."""
    t = time.perf_counter()
    loader = build()
    it = iter(loader)
    next(it)
    start = time.perf_counter() - t
    n, t = 0, time.perf_counter()
    for _ in range(batches):
        try:
            next(it)
        except StopIteration:
            break
        n += 1
    rate = n * batch / (time.perf_counter() - t)
    del it, loader
    return start, rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=20000)
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="DataLoader workers (default: the cores)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=100, help="batches timed after the first (0: one epoch)")
    p.add_argument("--tmp", default=None, help="folder for the generated data (default: the system's temp)")
    p.add_argument("--out", default=str(HERE.parent / "BENCHMARKS.md"))
    args = p.parse_args()
    batches = args.batches or args.count // args.batch_size - 1
    pool = _jpegs(64)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        tmp = Path(tmp)
        # before datasets is imported: it reads its cache folder once, at import
        os.environ["NFNET_ZOO_CACHE"] = str(tmp / "checks")
        os.environ["HF_DATASETS_CACHE"] = str(tmp / "hf-cache")
        t = time.perf_counter()
        make_folder(tmp / "folder", args.count, pool)
        make_parquet(tmp / "folder", tmp / "parquet")
        make_shards(tmp / "folder", tmp / "wds", info=True)
        make_shards(tmp / "folder", tmp / "wds-noinfo", info=False)
        print(f"{args.count} images written in 4 layouts in {time.perf_counter() - t:.0f} s", flush=True)
        w, b = args.workers, args.batch_size
        import datasets
        assert datasets.config.HF_DATASETS_CACHE == tmp / "hf-cache"
        import nfnet_zoo  # noqa: F401  registers nfnet_f0
        import timm
        datasets.disable_progress_bars()
        model = timm.create_model("nfnet_f0", pretrained=False)
        cases = [
            ("class folder", "ours, --check-images full (first run)", lambda: ours(tmp / "folder", "full", w, b, model)),
            ("class folder", "ours, full (repeated run: cached)", lambda: ours(tmp / "folder", "full", w, b, model)),
            ("class folder", "ours, --check-images none", lambda: ours(tmp / "folder", "none", w, b, model)),
            ("class folder", "timm (folder reader)", lambda: timms(tmp / "folder", "folder", w, b, tmp)),
            ("parquet", "ours, --check-images full (first run)", lambda: ours(tmp / "parquet", "full", w, b, model)),
            ("parquet", "ours, --check-images none (first run)", lambda: ours(tmp / "parquet", "none", w, b, model)),
            ("parquet", "timm (hfds/ reader)", lambda: timms(tmp / "parquet", "parquet", w, b, tmp / "timm-cache")),
            ("WebDataset shards", "ours, _info.json", lambda: ours(tmp / "wds", "full", w, b, model)),
            ("WebDataset shards", "ours, no _info.json (header pass)", lambda: ours(tmp / "wds-noinfo", "full", w, b, model)),
            ("WebDataset shards", "timm (wds/ reader, _info.json)", lambda: timms(tmp / "wds", "wds", w, b, tmp)),
        ]
        results = []
        for layout, who, build in cases:
            if "first run" in who:
                shutil.rmtree(tmp / "checks", ignore_errors=True)
            if layout == "parquet":  # every parquet case converts the files to arrow afresh, as on a first run
                shutil.rmtree(tmp / "hf-cache", ignore_errors=True)
                shutil.rmtree(tmp / "timm-cache", ignore_errors=True)
            start, rate = run(build, batches, b)
            results.append((layout, who, start, rate))
            print(f"{layout}, {who}: start-up {start:.2f} s, {rate:.0f} images/s", flush=True)
    timm_of = {layout: (s, r) for layout, who, s, r in results if who.startswith("timm")}
    rows = ["| layout | program | start-up to the first batch | vs timm | loading, images/s | vs timm |",
            "|---|---|---|---|---|---|"]
    for layout, who, s, r in results:
        ts, tr = timm_of[layout]
        rows.append(f"| {layout} | {who} | {s:.2f} s | {s / ts:.2f}x | {r:.0f} | {r / tr:.2f}x |")
    import PIL
    import datasets
    import timm
    import webdataset
    command = "python benchmarks/bench_loading.py " + " ".join(sys.argv[1:])
    lines = [HEADING, "",
             f"Command: `{command.strip()}`; {os.cpu_count()} cores, {args.workers} DataLoader workers, batch "
             f"{args.batch_size}, {batches} batches timed; Pillow {PIL.__version__}, timm {timm.__version__}, datasets "
             f"{datasets.__version__}, webdataset {webdataset.__version__}. The same {args.count:,} generated 500x375 "
             f"JPEGs ({CLASSES} classes) in each layout, in the page cache, read with timm's training transform at "
             f"{SIZE} px. Start-up: seconds from the call to the first batch (ours: finding, checking and splitting the "
             f"data and building finetune's loaders; timm: create_dataset and a DataLoader). vs timm: our time over "
             f"timm's (start-up, lower is better) and our rate over timm's (loading, higher is better).", ""] + rows
    print("\n".join(lines))
    write_section(Path(args.out), lines)


if __name__ == "__main__":
    main()
