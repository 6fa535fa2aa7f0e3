"""The user's images: folders or Hugging Face datasets saved on disk, checked once, converted to RGB.

Layouts read by `load_image_data`:
- `DIR/train/<class>/*` with `DIR/val/<class>/*` (or `validation/`): the given split;
- `DIR/<class>/*` (or only `DIR/train/`): split into train/val per class with a fixed seed;
- a `datasets.save_to_disk` folder (a DatasetDict with train/validation splits, or one Dataset).
Labels are class-folder names (or the ClassLabel names), sorted, so class order is stable.

Every image is decoded once up front: a file that is not an image, truncated or corrupt is skipped
(with a count) or refused, before training starts rather than in the middle of an epoch.
"""
from __future__ import annotations

import json
import os
import random
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

from ._files import write_json_atomic
from .errors import NFNetZooError

# What PIL reads and timm's folder reader would list, plus the common extras users have.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
VAL_FOLDERS = ("val", "validation")
VAL_SPLIT_DEFAULT = 0.1
SPLIT_SEED = 0  # the train/val split of a single folder never changes with --seed
_IGNORED_FILES = {".DS_Store", "Thumbs.db", "desktop.ini"}
_HF_VAL_SPLITS = ("validation", "val", "valid", "test")


@dataclass
class ImageData:
    """Samples as (key, label index); a key is a path relative to `root` (folders) or `split/row` (datasets)."""

    root: str
    kind: str                                   # "folder" or "hf"
    classes: list[str]
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    skipped: list[str] = field(default_factory=list)
    image_column: Optional[str] = None          # datasets only

    @property
    def name(self) -> str:
        return Path(self.root).name

    def save(self, path: Path) -> None:
        write_json_atomic(path, asdict(self), indent=1)

    @classmethod
    def load(cls, path: Path) -> "ImageData":
        d = json.loads(Path(path).read_text())
        d["train"] = [tuple(s) for s in d["train"]]
        d["val"] = [tuple(s) for s in d["val"]]
        return cls(**d)

    def opener(self) -> "_Opener":
        return _Opener(self.root, self.kind, self.image_column)


# --- conversion ------------------------------------------------------------------------------
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

    def __init__(self, root: str, kind: str, image_column: Optional[str] = None):
        self.root, self.kind, self.image_column = root, kind, image_column
        self._splits = None

    def __getstate__(self):
        return {"root": self.root, "kind": self.kind, "image_column": self.image_column, "_splits": None}

    def raw(self, key: str) -> Image.Image:
        if self.kind == "folder":
            return Image.open(os.path.join(self.root, key))
        split, row = key.rsplit("/", 1)
        if self._splits is None:
            self._splits = _load_hf(self.root)
        ds = self._splits[split] if split else self._splits
        img = ds[int(row)][self.image_column]
        if isinstance(img, dict):  # an undecoded Image feature
            import io
            img = Image.open(io.BytesIO(img["bytes"])) if img.get("bytes") else Image.open(img["path"])
        return img

    def __call__(self, key: str) -> Image.Image:
        try:
            img = self.raw(key)
            img.load()
            return to_rgb(img)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise NFNetZooError(f"cannot read image {key} in {self.root}: {e}; it changed after the "
                                f"start-up check; remove it and start again") from None


# --- the check ---------------------------------------------------------------------------------
def _is_readable(opener: _Opener, key: str) -> bool:
    try:
        img = opener.raw(key)
        if img.format == "JPEG":
            img.draft("RGB", (64, 64))  # decode at reduced scale: the check only needs a full pass
        img.load()
        return True
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, TypeError, KeyError):
        return False


def _check(opener: _Opener, samples: list[tuple[str, int]], workers: int) -> tuple[list, list[str]]:
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # someone's global switch would hide truncated files
        warnings.warn("PIL's LOAD_TRUNCATED_IMAGES is on: truncated images are not detected")
    keys = [k for k, _ in samples]
    with ThreadPoolExecutor(max(1, workers)) as pool:  # PIL releases the GIL while decoding
        ok = list(pool.map(lambda k: _is_readable(opener, k), keys, chunksize=64))
    good = [s for s, g in zip(samples, ok) if g]
    bad = [k for k, g in zip(keys, ok) if not g]
    return good, bad


def _report_bad(bad: list[str], root: str, bad_images: str) -> None:
    if not bad:
        return
    shown = ", ".join(bad[:3]) + (" ..." if len(bad) > 3 else "")
    if bad_images == "error":
        raise NFNetZooError(f"{len(bad)} unreadable (corrupt, truncated or not an image) file(s) in {root}: "
                            f"{shown}; remove them, or pass --bad-images skip to leave them out")
    warnings.warn(f"skipped {len(bad)} unreadable (corrupt, truncated or not an image) file(s) in {root}: "
                  f"{shown}")


# --- folders -----------------------------------------------------------------------------------
def _class_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan_classes(folder: Path) -> tuple[dict[str, list[str]], int]:
    """{class: [relative paths]} of one split folder, and the count of non-image files ignored."""
    found, other = {}, 0
    for cls_dir in _class_folders(folder):
        files = []
        for dirpath, dirnames, filenames in os.walk(cls_dir, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in sorted(filenames):
                if f.startswith(".") or f in _IGNORED_FILES:
                    continue
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    files.append(os.path.relpath(os.path.join(dirpath, f), folder))
                else:
                    other += 1
        found[cls_dir.name] = files
    return found, other


def _split_folder(root: Path) -> tuple[Path, Optional[Path]]:
    train = root / "train"
    val = next((root / v for v in VAL_FOLDERS if (root / v).is_dir()), None)
    if train.is_dir():
        return train, val
    if val is not None:
        raise NFNetZooError(f"{root} has {val.name}/ but no train/; add train/<class>/ folders")
    return root, None


def _stratified_split(samples: list[tuple[str, int]], fraction: float) -> tuple[list, list]:
    rng = random.Random(SPLIT_SEED)
    train, val = [], []
    for label in sorted({lab for _, lab in samples}):
        items = [s for s in samples if s[1] == label]
        rng.shuffle(items)
        n_val = round(len(items) * fraction) if len(items) > 1 else 0
        n_val = min(max(n_val, 1 if fraction > 0 and len(items) > 1 else 0), len(items) - 1)
        val += items[:n_val]
        train += items[n_val:]
    return sorted(train), sorted(val)


def _folder_data(root: Path, val_split: float, bad_images: str, workers: int) -> ImageData:
    train_dir, val_dir = _split_folder(root)
    by_class, other = _scan_classes(train_dir)
    if not by_class:
        loose = any(p.suffix.lower() in IMAGE_EXTENSIONS for p in train_dir.iterdir())
        hint = "images lie directly in it; " if loose else ""
        raise NFNetZooError(f"{train_dir} has no class folders ({hint}expected {train_dir}/<class>/<image>); "
                            f"put each class's images in a folder named after the class")
    empty = [c for c, files in by_class.items() if not files]
    if empty:
        warnings.warn(f"ignoring {len(empty)} class folder(s) with no images in {train_dir}: {', '.join(empty[:5])}")
    classes = sorted(c for c, files in by_class.items() if files)
    if len(classes) < 2:
        raise NFNetZooError(f"{train_dir} has {len(classes)} class folder(s) with images ({', '.join(classes) or 'none'}); "
                            f"a classifier needs at least 2 classes")
    index = {c: i for i, c in enumerate(classes)}
    # keys are relative to root, so train and val samples share one opener
    rel = os.path.relpath(train_dir, root)
    train = [(os.path.normpath(os.path.join(rel, f)), index[c]) for c in classes for f in by_class[c]]
    if val_dir is not None:
        val_by_class, other_val = _scan_classes(val_dir)
        other += other_val
        unknown = sorted(c for c, files in val_by_class.items() if files and c not in index)
        if unknown:
            raise NFNetZooError(f"{val_dir} has class folder(s) that {train_dir} lacks: {', '.join(unknown[:5])}; "
                                f"add their training images or remove them from {val_dir.name}/")
        val = [(os.path.join(val_dir.name, f), index[c]) for c, files in val_by_class.items()
               if c in index for f in files]
        if val_split and val_split != VAL_SPLIT_DEFAULT:
            warnings.warn(f"--val-split ignored: {root} has its own {val_dir.name}/ folder")
    else:
        train, val = _stratified_split(train, val_split)
    if other:
        warnings.warn(f"ignored {other} non-image file(s) in {root} (images are {', '.join(IMAGE_EXTENSIONS)})")
    data = ImageData(str(root), "folder", classes, sorted(train), sorted(val))
    opener = data.opener()
    data.train, bad_train = _check(opener, data.train, workers)
    data.val, bad_val = _check(opener, data.val, workers)
    data.skipped = bad_train + bad_val
    _report_bad(data.skipped, str(root), bad_images)
    return data



# --- Hugging Face datasets saved on disk -------------------------------------------------------
def _is_hf_dataset(root: Path) -> bool:
    return (root / "dataset_dict.json").is_file() or (root / "state.json").is_file()


def _load_hf(root: str):
    try:
        from datasets import load_from_disk
    except ImportError:
        raise NFNetZooError(f"{root} is a Hugging Face dataset saved on disk; reading it needs the "
                            f"`datasets` package: pip install datasets") from None
    return load_from_disk(root)


def _hf_columns(ds, root: str) -> tuple[str, str, list[str]]:
    from datasets import ClassLabel, Image as HFImage
    image_col = next((n for n, f in ds.features.items() if isinstance(f, HFImage)), None)
    label_col = next((n for n, f in ds.features.items() if isinstance(f, ClassLabel)), None)
    if image_col is None or label_col is None:
        raise NFNetZooError(f"{root}: a dataset needs an Image column and a ClassLabel column, found "
                            f"{dict(ds.features)}; cast the label column with "
                            f"dataset.class_encode_column(...) and save it again")
    return image_col, label_col, list(ds.features[label_col].names)


def _hf_data(root: Path, val_split: float, bad_images: str, workers: int) -> ImageData:
    from datasets import DatasetDict, Image as HFImage
    loaded = _load_hf(str(root))
    if isinstance(loaded, DatasetDict):
        if "train" not in loaded:
            raise NFNetZooError(f"{root} has splits {list(loaded)} but no 'train'; save a DatasetDict with a train split")
        splits = {"train": loaded["train"]}
        val_name = next((s for s in _HF_VAL_SPLITS if s in loaded), None)
        if val_name:
            splits[val_name] = loaded[val_name]
    else:
        splits, val_name = {"": loaded}, None
    train_split = "train" if "train" in splits else ""
    image_col, label_col, names = _hf_columns(splits[train_split], str(root))
    samples = {s: [(f"{s}/{i}", int(lab)) for i, lab in enumerate(ds[label_col])] for s, ds in splits.items()}
    train = samples[train_split]
    val = samples[val_name] if val_name else []
    if not val_name:
        train, val = _stratified_split(train, val_split)
    present = sorted({lab for _, lab in train})
    if len(present) < 2:
        raise NFNetZooError(f"{root} has {len(present)} class(es) with training images; a classifier needs at least 2")
    data = ImageData(str(root), "hf", names, train, val, image_column=image_col)
    opener = data.opener()
    # check the encoded bytes without the datasets decoder in the way
    opener._splits = ({s: ds.cast_column(image_col, HFImage(decode=False)) for s, ds in splits.items()}
                      if train_split else splits[""].cast_column(image_col, HFImage(decode=False)))
    data.train, bad_train = _check(opener, data.train, workers)
    data.val, bad_val = _check(opener, data.val, workers)
    data.skipped = bad_train + bad_val
    _report_bad(data.skipped, str(root), bad_images)
    return data


# --- entry points ------------------------------------------------------------------------------
def load_image_data(data_dir: str | os.PathLike, val_split: float = VAL_SPLIT_DEFAULT,
                    bad_images: str = "skip", workers: int = 4) -> ImageData:
    """Find, check and split the images of `data_dir` (see the module docstring for the layouts).

    `bad_images`: "skip" leaves unreadable files out with a warning naming how many; "error" refuses.
    """
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise NFNetZooError(f"data folder {root} does not exist; pass --data-dir with a folder of "
                            f"class folders (DIR/<class>/<image> or DIR/train/<class>/<image>)")
    if not any(root.iterdir()):
        raise NFNetZooError(f"data folder {root} is empty; put each class's images in DIR/<class>/")
    if not 0.0 <= val_split < 1.0:
        raise NFNetZooError(f"--val-split must be in [0, 1), got {val_split}")
    load = _hf_data if _is_hf_dataset(root) else _folder_data
    data = load(root, val_split, bad_images, workers)
    if not data.train:
        raise NFNetZooError(f"no readable training images in {root}")
    return data


def load_eval_samples(data_dir: str | os.PathLike, bad_images: str = "skip",
                      workers: int = 4) -> ImageData:
    """The images to evaluate in `data_dir`: its val/ (or validation/) split when it has one, else
    every image of its class folders (a datasets folder: its validation/test split, else all)."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise NFNetZooError(f"data folder {root} does not exist; pass --data-dir DIR with DIR/<class>/<image>")
    if _is_hf_dataset(root):
        data = _hf_data(root, 0.0, bad_images, workers)
        if not data.val:  # no validation split: all of it
            data.val, data.train = data.train, []
        return data
    _, val_dir = _split_folder(root)
    folder = val_dir or (root / "train" if (root / "train").is_dir() else root)
    by_class, other = _scan_classes(folder) if folder.is_dir() else ({}, 0)
    classes = sorted(c for c, files in by_class.items() if files)
    if not classes:
        raise NFNetZooError(f"no images in class folders of {folder}; expected {folder}/<class>/<image>")
    if other:
        warnings.warn(f"ignored {other} non-image file(s) in {folder}")
    samples = [(f, classes.index(c)) for c in classes for f in by_class[c]]
    data = ImageData(str(folder), "folder", classes, [], samples)
    data.val, data.skipped = _check(data.opener(), samples, workers)
    _report_bad(data.skipped, str(folder), bad_images)
    return data


# --- torch side --------------------------------------------------------------------------------
def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's augmentation: a function of (seed, epoch, index) only, so the
    augmentation does not depend on workers, processes, or where a resumed run restarted."""
    return zlib.crc32(f"{seed}:{epoch}:{index}".encode())


class ImageDataset(torch.utils.data.Dataset):
    """(image tensor, label) pairs; an item is an index, or (index, epoch) from `EpochSampler`."""

    def __init__(self, samples: list[tuple[str, int]], opener: Callable[[str], Image.Image],
                 transform: Callable, seed: int = 0):
        self.samples, self.opener, self.transform, self.seed = samples, opener, transform, seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item):
        index, epoch = item if isinstance(item, tuple) else (item, None)
        key, label = self.samples[index]
        img = self.opener(key)
        if epoch is None:
            return self.transform(img), label
        # timm's transforms draw from the global RNGs: seed them per sample. In a worker they serve
        # only this dataset; in the main process (workers=0) they are restored afterwards so that the
        # training RNG stream (dropout, stochastic depth, mixup) is untouched.
        s = sample_seed(self.seed, epoch, index)
        if torch.utils.data.get_worker_info() is not None:
            return self._seeded(img, s), label
        states = random.getstate(), np.random.get_state(), torch.default_generator.get_state()
        try:
            x = self._seeded(img, s)
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.default_generator.set_state(states[2])
        return x, label

    def _seeded(self, img: Image.Image, seed: int) -> torch.Tensor:
        random.seed(seed)
        np.random.seed(seed)
        torch.default_generator.manual_seed(seed)  # torch.manual_seed also seeds every device: 70x slower
        return self.transform(img)


class EpochSampler(torch.utils.data.Sampler):
    """A shuffle that depends only on (seed, epoch): yields (index, epoch) pairs.

    Every process draws the same permutation (Accelerate then shards its batches), and a resumed
    run recomputes it exactly. Set `epoch` before iterating.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        for i in torch.randperm(self.n, generator=g).tolist():
            yield i, self.epoch


def ignore_sigint(worker_id: int) -> None:
    """DataLoader worker_init_fn: Ctrl-C is for the main process, which saves state and stops them."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)


__all__ = ["ImageData", "load_image_data", "load_eval_samples", "to_rgb", "ImageDataset", "EpochSampler",
           "sample_seed", "IMAGE_EXTENSIONS"]
