"""Start-up cost of a data folder before the first training step, against the number of images.

    python benchmarks/bench_startup.py [--counts 2000 20000 200000] [--workers 2] [--out BENCHMARKS.md]

Generates ImageNet-sized JPEGs (500x375, 100 classes) with PIL in a temporary folder and times, in
this process, what each start does before its first step with the folder:
- full, first run: `load_image_data(check="full")` with an empty cache: every image decoded (JPEG
  at reduced scale), as every run did before the check was remembered;
- full, repeated: the same call again on the unchanged folder (results from the cache);
- header, first run: `check="header"` with an empty cache (headers and end markers, no decoding);
- none: `check="none"` (the folder scan, links resolved, each file once);
- timm train.py: `timm.data.create_dataset("", root=DIR)` (timm's folder reader; no check).
Files are in the page cache (just written), as on a machine that has read them once. Times are
per run, the minimum of --repeats; ImageNet-1k (1,281,167 images) is extrapolated linearly from
the largest count. Writes its section of BENCHMARKS.md (other sections are left as they are).
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
HEADING = "## Start-up before the first training step (data check)"
IMAGENET = 1_281_167
CLASSES = 100


def _jpegs(n: int, size=(500, 375), seed: int = 0) -> list[bytes]:
    """n distinct photo-like JPEGs: smooth gradients plus noise, quality 90 (about 30-50 KB each)."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    out = []
    for _ in range(n):
        a = np.stack([np.sin(x / rng.uniform(20, 80) + rng.uniform(0, 6)) * np.cos(y / rng.uniform(20, 80))
                      for _ in range(3)], -1)
        img = (a * 90 + 128 + rng.normal(0, 12, a.shape)).clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img, "RGB").save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def make_folder(root: Path, count: int, pool: list[bytes]) -> None:
    for i in range(count):
        d = root / f"class{i % CLASSES}"
        if i < CLASSES:
            d.mkdir(parents=True)
        (d / f"img{i:07d}.jpg").write_bytes(pool[i % len(pool)])


def _time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure(root: Path, workers: int, repeats: int, cache: Path) -> dict[str, float]:
    from timm.data import create_dataset
    from nfnet_zoo.data import load_image_data

    def ours(check: str, fresh: bool):
        def run():
            if fresh:
                shutil.rmtree(cache, ignore_errors=True)
            os.environ["NFNET_ZOO_CACHE"] = str(cache)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                load_image_data(root, workers=workers, check=check)
        return run

    times = {"full, first run": _time(ours("full", True), repeats)}  # its last repeat leaves the cache filled
    times["full, repeated (cached)"] = _time(ours("full", False), repeats)
    times["header, first run"] = _time(ours("header", True), repeats)
    times["none"] = _time(ours("none", True), repeats)
    times["timm train.py (no check)"] = _time(lambda: create_dataset("", root=str(root)), repeats)
    return times


def table(results: dict[int, dict[str, float]]) -> list[str]:
    counts = sorted(results)
    cases = list(results[counts[0]])
    base = results[counts[-1]]["full, first run"]
    rows = ["| case | " + " | ".join(f"{c:,} images" for c in counts) + " | ms / image | ImageNet-1k (extrapolated) "
            "| vs full, first run |", "|---" * (len(counts) + 4) + "|"]
    for case in cases:
        t = results[counts[-1]][case]
        per = t / counts[-1]
        rows.append(f"| {case} | " + " | ".join(f"{results[c][case]:.2f} s" for c in counts)
                    + f" | {1e3 * per:.3f} | {per * IMAGENET / 60:.1f} min | {t / base:.3f}x |")
    return rows


def write_section(path: Path, lines: list[str]) -> None:
    """Replace the section of BENCHMARKS.md that `lines` heads (lines[0], its `## ` heading), or append it; nothing
    else changes."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    start = old.find("\n" + lines[0] + "\n")
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + "\n".join(lines) + "\n"
    else:
        end = old.find("\n## ", start + 1)
        new = old[:start + 1] + "\n".join(lines) + "\n" + (old[end:] if end >= 0 else "")
    path.write_text(new)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--counts", type=int, nargs="+", default=[2000, 20000, 200000])
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="check threads (default: the cores)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--tmp", default=None, help="folder for the generated images (default: the system's temp)")
    p.add_argument("--out", default=str(HERE.parent / "BENCHMARKS.md"))
    args = p.parse_args()
    pool = _jpegs(64)
    results = {}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for count in args.counts:
            root = Path(tmp) / f"images{count}"
            t = time.perf_counter()
            make_folder(root, count, pool)
            print(f"{count} images written in {time.perf_counter() - t:.1f} s", flush=True)
            results[count] = measure(root, args.workers, args.repeats, Path(tmp) / f"cache{count}")
            print("  " + ", ".join(f"{k}: {v:.2f} s" for k, v in results[count].items()), flush=True)
            shutil.rmtree(root)
    import PIL
    import timm
    command = "python benchmarks/bench_startup.py " + " ".join(sys.argv[1:])
    lines = [HEADING, "",
             f"Command: `{command.strip()}`; {os.cpu_count()} cores, {args.workers} check threads, Pillow "
             f"{PIL.__version__}, timm {timm.__version__}. Generated 500x375 JPEGs (about "
             f"{sum(map(len, pool)) // len(pool) // 1024} KB), {CLASSES} class folders, in the page cache; seconds "
             f"from the call to the data being ready (the model, optimizer and loader start the same way in both "
             f"programs and are left out). Last column: the time relative to the full check on a first run, the "
             f"only behaviour before (issue 13: at most 0.1x for a repeated run, at most 0.2x for the header "
             f"check).", ""] + table(results)
    print("\n".join(lines))
    write_section(Path(args.out), lines)


if __name__ == "__main__":
    main()
