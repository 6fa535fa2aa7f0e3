"""A data set's samples and how one is read: `ImageData` (the samples of each split, saved as RUN/data.json),
the image opener (files, or rows of a dataset), conversion to RGB, the fixed train/val split, the start-up check."""
from __future__ import annotations

import json
import os
import random
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageOps

from ..errors import NFNetZooError
from ..files import write_json_atomic
from .image_check import CheckCache, Gather, check_samples


VAL_SPLIT_DEFAULT = 0.1
SPLIT_SEED = 0  # the train/val split of a single folder never changes with --seed


@dataclass
class ImageData:
    """Samples as (key, label index); a key is a path relative to `root` (folders) or `split/row` (datasets).
    WebDataset shards (kind "wds") are streamed: no sample list, `shards` names them (data/shards.py)."""

    root: str
    kind: str                                   # "folder", "hf" or "wds"
    classes: list[str]
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    skipped: list[str] = field(default_factory=list)
    image_column: Optional[str] = None          # datasets only
    builder: Optional[str] = None               # "parquet" or "arrow": datasets.load_dataset(builder, data_files)
    data_files: Optional[dict[str, list[str]]] = None  # ... of these files; None: a save_to_disk folder
    source: Optional[str] = None                # --data-dir when it is a file (a CSV, a parquet file), else None
    shards: Optional[dict] = None               # kind "wds": each split's shards and counts (data/shards.py)
    config: Optional[str] = None                # a Hub dataset (root hfds/NAME): its config ...
    revision: Optional[str] = None              # ... and the commit it was read at (hfds.py)

    @property
    def num_train(self) -> int:
        if self.shards:
            return self.shards["splits"].get("train", {}).get("num_samples") or 0
        return len(self.train)

    @property
    def num_val(self) -> int:
        if self.shards:
            return self.shards["splits"].get("val", {}).get("num_samples") or 0
        return len(self.val)

    @property
    def name(self) -> str:
        """The data's name as text (a name that is not UTF-8 keeps its bytes as escapes)."""
        name = Path(self.source).stem if self.source else Path(self.root).name
        return name.encode("utf-8", "backslashreplace").decode("utf-8")

    def save(self, path: Path) -> None:
        write_json_atomic(path, asdict(self), indent=1)

    @classmethod
    def load(cls, path: Path) -> "ImageData":
        d = json.loads(Path(path).read_text())
        d["train"] = [tuple(s) for s in d["train"]]
        d["val"] = [tuple(s) for s in d["val"]]
        return cls(**d)

    def opener(self) -> "_Opener":
        return _Opener(self.root, self.kind, self.image_column, self.builder, self.data_files, self.config,
                       self.revision)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: EXIF rotation applied, 16-bit and float rescaled (PIL's own
    `convert` saturates them), transparency composited on white (as transformers does), CMYK and
    palettes converted."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if img.mode == "F" and a.size and np.nanmax(a) <= 1.0:
            a = a * 255.0
        elif img.mode != "F":
            a = a / 257.0  # 0..65535 -> 0..255
        img = Image.fromarray(np.clip(np.nan_to_num(a), 0, 255).round().astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


class _Opener:
    """Loads one sample's image by key; picklable so DataLoader workers can use it."""

    def __init__(self, root: str, kind: str, image_column: Optional[str] = None, builder: Optional[str] = None,
                 data_files: Optional[dict] = None, config: Optional[str] = None, revision: Optional[str] = None):
        self.root, self.kind, self.image_column = root, kind, image_column
        self.builder, self.data_files, self.config, self.revision = builder, data_files, config, revision
        self._splits = None

    def __getstate__(self):
        return {**self.__dict__, "_splits": None}

    def raw(self, key: str) -> Image.Image:
        if self.kind == "folder":
            return Image.open(os.path.join(self.root, key))
        split, row = key.rsplit("/", 1)
        if self._splits is None:
            self._splits = _load_hf(self.root, self.builder, self.data_files, self.config, self.revision)
        ds = self._splits[split] if split else self._splits
        img = ds[int(row)][self.image_column]
        if img is None or isinstance(img, dict) and not (img.get("bytes") or img.get("path")):
            raise ValueError("the row has no image (None)")
        if isinstance(img, dict):  # an undecoded Image feature
            import io
            img = Image.open(io.BytesIO(img["bytes"])) if img.get("bytes") else Image.open(img["path"])
        return img

    def __call__(self, key: str) -> Image.Image:
        try:
            img = self.raw(key)
            img.load()
            return to_rgb(img)
        except (OSError, SyntaxError, ValueError, IndexError, KeyError, Image.DecompressionBombError) as e:
            # IndexError/KeyError: a row or split data.json names is gone (the dataset changed under the run)
            raise NFNetZooError(f"cannot read image {_show(key)} in {_show(self.root)} ({e}): it changed after "
                                f"the start-up check, or the check did not decode it (--check-images header or "
                                f"none); remove it and start again") from None


def _show(path: str) -> str:
    """A path for a one-line message: as it is when it is printable text, else the repr of its bytes
    (names that are not UTF-8 hold surrogates, which are not printable)."""
    return path if path.isprintable() else repr(os.fsencode(path))


def _datasets():
    try:
        import datasets
    except ImportError:
        return None
    return datasets


def _load_hf(root: str, builder: Optional[str] = None, data_files: Optional[dict] = None,
             config: Optional[str] = None, revision: Optional[str] = None):
    """A save_to_disk folder, (`builder`) datasets.load_dataset of parquet/arrow files, or (`revision`) a Hub dataset
    at that commit: a DatasetDict by split."""
    datasets = _datasets()
    if datasets is None:
        what = ("a Hub dataset" if revision else f"{builder} files" if builder
                else "a Hugging Face dataset saved on disk")
        raise NFNetZooError(f"{root} holds {what}; reading it needs the `datasets` package: "
                            f"pip install 'nfnet-zoo[datasets]' (or pip install datasets)")
    if revision is not None:
        from .hfds import PREFIX, HubDataset, load_hub_dataset
        return load_hub_dataset(HubDataset(root[len(PREFIX):], config), revision)
    if builder is None:
        return datasets.load_from_disk(root)
    quiet = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(builder, data_files=data_files)
    except (datasets.exceptions.DatasetGenerationError, ValueError, OSError) as e:
        cause = e.__cause__ or e
        raise NFNetZooError(f"cannot read the {builder} files of {_show(root)} ({str(cause).splitlines()[0][:120]}); "
                            f"check that the files of each split have the same columns") from None
    finally:
        if not quiet:
            datasets.enable_progress_bars()


def _stratified_split(samples: list[tuple[str, int]], fraction: float) -> tuple[list, list]:
    rng = random.Random(SPLIT_SEED)
    by_label: dict[int, list] = {}
    for s in samples:  # one pass: a filter per class would be quadratic at ImageNet scale
        by_label.setdefault(s[1], []).append(s)
    train, val = [], []
    for label in sorted(by_label):
        items = by_label[label]
        rng.shuffle(items)
        n_val = round(len(items) * fraction) if len(items) > 1 else 0
        n_val = min(max(n_val, 1 if fraction > 0 and len(items) > 1 else 0), len(items) - 1)
        val += items[:n_val]
        train += items[n_val:]
    return sorted(train), sorted(val)


@dataclass
class Check:
    """How the start-up check runs: its level (image_check.CHECK_LEVELS), what to do with unreadable
    files, threads, and this process's share (all processes call with the same arguments)."""

    level: str = "full"
    bad_images: str = "skip"
    workers: int = 4
    process_index: int = 0
    num_processes: int = 1
    gather: Gather = None


def _check_data(data: ImageData, check: Check, stats: Optional[dict] = None, raw=None) -> None:
    """Leave out (or refuse, per check.bad_images) the samples whose images fail the check."""
    cache = CheckCache(data.root, stats) if stats is not None and check.level != "none" else None
    raw = raw or data.opener().raw
    share = dict(process_index=check.process_index, num_processes=check.num_processes, gather=check.gather)
    data.train, bad_train = check_samples(raw, data.train, check.level, check.workers, cache, **share)
    data.val, bad_val = check_samples(raw, data.val, check.level, check.workers, cache, **share)
    if cache is not None and check.process_index == 0:
        cache.save()
    data.skipped = bad_train + bad_val
    _report_bad(data.skipped, data.root, check)


def _report_bad(bad: list[str], root: str, check: Check) -> None:
    if not bad:
        return
    shown = ", ".join(_show(k) for k in bad[:3]) + (" ..." if len(bad) > 3 else "")
    if check.bad_images == "error":
        raise NFNetZooError(f"{len(bad)} unreadable (corrupt, truncated or not an image) file(s) in {root}: "
                            f"{shown}; remove them, or pass --bad-images skip to leave them out")
    if check.process_index == 0:
        warnings.warn(f"skipped {len(bad)} unreadable (corrupt, truncated or not an image) file(s) in {root}: "
                      f"{shown}")
