"""Which fine-tuning tools help on a small dataset: measured runs of `nfnet-zoo finetune` on a transfer task.

    python benchmarks/small_data.py [--per-class 20] [--epochs 15] [--lr 0.05] [--seeds 0 1 2] [--only NAME ...] [--out BENCHMARKS.md]

The task needs no network: scikit-learn's digits (the demo's images, `nfnet_zoo.demo.build_digits_folder`).
- Source: `nfnet_zoo_tiny` trained from scratch on the digits 0-4 (the demo's recipe, --source-epochs epochs).
- Target: the digits 5-9 with --per-class training images each (the first of each class in the demo's train split),
  validated on all the 5-9 images of the demo's val split (about 180). A balanced and an imbalanced target (class 5
  keeps --per-class x 6 images, the others --per-class / 2) are fine-tuned from the source checkpoint.
Each variant runs with the same seeds; the table gives val top-1 at the last epoch and at the best epoch (mean and
spread over the seeds), the epochs trained and the training time relative to the default. Writes its section of
BENCHMARKS.md (other sections are left alone).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))
from bench_startup import write_section  # noqa: E402

HEADING = "## Fine-tuning on a small dataset: which tools help"
SOURCE, TARGET = "01234", "56789"

# name -> finetune settings on top of the common ones (the default is the paper's recipe as `finetune` has it)
VARIANTS = {
    "default (SGD, all layers)": {},
    "linear probe (--freeze-epochs = --epochs)": {"freeze_epochs": None},  # None: the run's --epochs
    "--freeze-epochs 3, then all": {"freeze_epochs": 3},
    "--layer-decay 0.6": {"layer_decay": 0.6},
    "--sam 0.05": {"sam": 0.05},
    "--opt adamw --lr 1e-3": {"opt": "adamw", "lr": 1e-3},
    "--patience 3": {"patience": 3},
}
IMBALANCED = {
    "default (SGD, all layers)": {},
    "--class-balance sampler": {"class_balance": "sampler"},
    "--class-balance loss": {"class_balance": "loss"},
}


def _subset(src: Path, dst: Path, classes: str, split: str, per_class: dict[str, int] | None) -> Path:
    """dst/<class>/ holding the first per_class[c] images (all when None) of src/<split>/<class>/, as links."""
    for c in classes:
        files = sorted((src / split / c).iterdir())
        if per_class is not None:
            files = files[:per_class[c]]
        (dst / c).mkdir(parents=True)
        for f in files:
            os.symlink(f, dst / c / f.name)
    return dst


def _run(run: Path, **settings) -> dict:
    from nfnet_zoo import finetune
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        finetune(output=str(run), **settings)
    seconds = time.perf_counter() - t
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((run / "summary.json").read_text())
    return {"last": history[-1]["top1"], "best": summary["top1"], "epochs": summary["epochs_trained"],
            "seconds": seconds}


def _cell(values: list[float]) -> str:
    mean = statistics.fmean(values)
    spread = (max(values) - min(values)) / 2
    return f"{mean:.1f} ± {spread:.1f}" if len(values) > 1 else f"{mean:.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate of the target runs (batch 16)")
    p.add_argument("--source-epochs", type=int, default=12)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--only", nargs="*", default=None, help="variants whose name contains one of these")
    p.add_argument("--tmp", default=None)
    p.add_argument("--out", default=str(HERE.parent / "BENCHMARKS.md"))
    args = p.parse_args()
    from nfnet_zoo.demo import DEMO_ARGS, DEMO_MODEL, build_digits_folder
    common = dict(DEMO_ARGS, model=DEMO_MODEL, workers=0, check_images="none")
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        tmp = Path(tmp)
        digits = build_digits_folder(tmp / "digits")
        source = tmp / "source"
        _subset(digits, source / "train", SOURCE, "train", None)
        _subset(digits, source / "val", SOURCE, "val", None)
        n = args.per_class
        targets = {"balanced": {c: n for c in TARGET}, "imbalanced": {c: (n * 6 if c == "5" else max(1, n // 2))
                                                                      for c in TARGET}}
        t = time.perf_counter()
        src = _run(tmp / "runs" / "source", **dict(common, data_dir=str(source), epochs=args.source_epochs))
        print(f"source: digits {SOURCE}, {args.source_epochs} epochs, val top-1 {src['last']:.1f} "
              f"({time.perf_counter() - t:.0f} s)", flush=True)
        tune = dict(common, checkpoint=str(tmp / "runs" / "source"), pretrained=False, epochs=args.epochs,
                    lr=args.lr, batch_size=16, warmup_epochs=1, img_size=32)
        results = {}
        for kind, variants in (("balanced", VARIANTS), ("imbalanced", IMBALANCED)):
            data = tmp / kind
            _subset(digits, data / "train", TARGET, "train", targets[kind])
            _subset(digits, data / "val", TARGET, "val", None)
            for name, extra in variants.items():
                if args.only and not any(o in name for o in args.only):
                    continue
                extra = {k: (args.epochs if v is None else v) for k, v in extra.items()}
                for seed in args.seeds:
                    run = tmp / "runs" / f"{kind}-{len(results)}-{seed}"
                    r = _run(run, **dict(tune, data_dir=str(data), seed=seed, **extra))
                    results.setdefault((kind, name), []).append(r)
                    print(f"{kind}, {name}, seed {seed}: last {r['last']:.1f}, best {r['best']:.1f}, "
                          f"{r['epochs']} epochs, {r['seconds']:.0f} s", flush=True)
                    shutil.rmtree(run)
    rows = ["| target | variant | val top-1, last epoch | val top-1, best epoch | epochs | time vs default |",
            "|---|---|---|---|---|---|"]
    for (kind, name), rs in results.items():
        base = results.get((kind, "default (SGD, all layers)"), rs)
        ratio = statistics.fmean(r["seconds"] for r in rs) / statistics.fmean(r["seconds"] for r in base)
        rows.append(f"| {kind} | {name} | {_cell([r['last'] for r in rs])} | {_cell([r['best'] for r in rs])} | "
                    f"{_cell([r['epochs'] for r in rs])} | {ratio:.2f}x |")
    command = "python benchmarks/small_data.py " + " ".join(sys.argv[1:])
    lines = [HEADING, "",
             f"Command: `{command.strip()}`; {os.cpu_count()} cores. Source: `nfnet_zoo_tiny` trained from scratch "
             f"on the digits {SOURCE} (val top-1 {src['last']:.1f}%). Target: the digits {TARGET}, {n} training "
             f"images a class (imbalanced: {targets['imbalanced']['5']} of class 5, {targets['imbalanced']['6']} of "
             f"each other), validated on all their images of the demo's val split; {args.epochs} epochs from the "
             f"source checkpoint, batch 16, SGD lr {args.lr} (adamw: 1e-3), seeds {', '.join(map(str, args.seeds))} (mean ± half the range).", ""]
    lines += rows
    print("\n".join(lines))
    write_section(Path(args.out), lines)


if __name__ == "__main__":
    main()
