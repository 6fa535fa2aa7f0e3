"""The user's images: folders, tables of image files, or Hugging Face datasets and parquet/arrow files, checked once,
converted to RGB.

Layouts read by `load_image_data` (and `load_eval_samples`; found by sources.py):
- `DIR/train/<class>/*` with `DIR/val/<class>/*` (or `validation/`): the given split;
- `DIR/<class>/*` (or only `DIR/train/`): split into train/val per class with a fixed seed;
- a `datasets.save_to_disk` folder (a DatasetDict with train/validation splits, or one Dataset);
- parquet or arrow files in the Hub's layout (DIR/data/train-*.parquet, DIR/<config>/..., DIR/train.parquet, one
  file): `datasets.load_dataset(builder, data_files)`, then the same path as a saved dataset (`_hf_data`);
- tables naming image files: DIR/metadata.csv or .jsonl (flat, or in DIR/train/, DIR/val/ ...), or a CSV file.
  Read by our folder code, not datasets' imagefolder builder, so that each file is counted once under its real
  path, links are followed as in folders, and the start-up check keeps its per-file cache (`_table_data`).
The image and label columns are the one Image (or file_name/path) column and the one label column, or
--input-key/--target-key; several label columns are refused. A split's rows without a label (-1, empty) are left
out, and a split with none is never the validation split; without a validation split, --val-split splits train.
Labels are class-folder names in timm's order (`natural_key`: class2 before class10, as timm's folder
reader), the ClassLabel names, or a label column's values in that order, so a checkpoint's class indices agree
with timm's train.py. data.json lists the samples (files, or split/row of the named data files): a resume is exact.

Every file is counted once, under its real path: links are followed, each real folder is entered
once (a link loop is followed once), a file reached twice within its class folder counts once, and
a file reached from two class folders or from both train/ and val/ is refused with a line naming
both places (it would carry two labels, or leak validation images into training).

Before training the images are checked (image_check.py: full decode, header only, or none): a
file that is not an image, truncated or corrupt is skipped (with a count) or refused, before
training starts rather than in the middle of an epoch.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import warnings
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from stat import S_ISREG

from ..files import write_json_atomic
from ..errors import NFNetZooError
from .image_check import CHECK_LEVELS, CheckCache, Gather, check_samples
from .sources import IMAGE_EXTENSIONS, IMAGE_KEYS, data_files, read_table, table_files

VAL_FOLDERS = ("val", "validation")
SPLIT_FOLDERS = ("train", *VAL_FOLDERS, "test")  # folders of a split layout (test/ is left for the user)
RUN_MARKERS = ("args.json", "data.json")  # what `finetune` writes first in a run folder
VAL_SPLIT_DEFAULT = 0.1
SPLIT_SEED = 0  # the train/val split of a single folder never changes with --seed
_IGNORED_FILES = {".DS_Store", "Thumbs.db", "desktop.ini"}
_HF_VAL_SPLITS = ("validation", "val", "valid", "test")
_DATA_FILES = (".csv", ".parquet", ".arrow")  # what --data-dir may name besides a folder


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
    builder: Optional[str] = None               # "parquet" or "arrow": datasets.load_dataset(builder, data_files)
    data_files: Optional[dict[str, list[str]]] = None  # ... of these files; None: a save_to_disk folder
    source: Optional[str] = None                # --data-dir when it is a file (a CSV, a parquet file), else None

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
        return _Opener(self.root, self.kind, self.image_column, self.builder, self.data_files)


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

    def __init__(self, root: str, kind: str, image_column: Optional[str] = None, builder: Optional[str] = None,
                 data_files: Optional[dict] = None):
        self.root, self.kind, self.image_column = root, kind, image_column
        self.builder, self.data_files = builder, data_files
        self._splits = None

    def __getstate__(self):
        return {**self.__dict__, "_splits": None}

    def raw(self, key: str) -> Image.Image:
        if self.kind == "folder":
            return Image.open(os.path.join(self.root, key))
        split, row = key.rsplit("/", 1)
        if self._splits is None:
            self._splits = _load_hf(self.root, self.builder, self.data_files)
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
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise NFNetZooError(f"cannot read image {_show(key)} in {_show(self.root)} ({e}): it changed after "
                                f"the start-up check, or the check did not decode it (--check-images header or "
                                f"none); remove it and start again") from None


# --- folders -----------------------------------------------------------------------------------
@dataclass
class _File:
    place: str            # the path it was found under, relative to the data folder (for messages)
    key: str              # the path it is counted under: its real path relative to the data folder
    identity: tuple       # (device, inode): one file however many paths lead to it (links, loops)
    stat: Optional[tuple[int, int, int]]  # size, mtime_ns, ctime_ns; None when it cannot be read


def _show(path: str) -> str:
    """A path for a one-line message: as it is when it is printable text, else the repr of its bytes
    (names that are not UTF-8 hold surrogates, which are not printable)."""
    return path if path.isprintable() else repr(os.fsencode(path))


def _visible(entry: os.DirEntry) -> bool:
    return not entry.name.startswith(".") and entry.name not in _IGNORED_FILES


def _walk_images(top: str, root: str, root_real: str) -> tuple[list[_File], int]:
    """Image files under `top` in name order, following links but entering each real folder once
    (a link loop is followed once), and the count of other files."""
    files, other, seen, stack = [], 0, set(), [top]
    while stack:
        folder = stack.pop()
        real = os.path.realpath(folder)
        if real in seen:
            continue
        seen.add(real)
        try:
            entries = sorted((e for e in os.scandir(folder) if _visible(e)), key=lambda e: e.name)
        except OSError as e:
            raise NFNetZooError(f"cannot list {_show(folder)} ({e.strerror}); make it readable or move it out "
                                f"of the data folder") from None
        if all(any(e.name == m for e in entries) for m in RUN_MARKERS):  # its curves.png would be a class's image
            raise NFNetZooError(f"{_show(folder)} is a run folder of nfnet-zoo finetune ({', '.join(RUN_MARKERS)}), "
                                f"not images of a class; move it out of the data folder (and pass --output elsewhere)")
        subfolders = []
        place_dir = os.path.relpath(folder, root)  # once per folder: relpath is slow at a million files
        place_dir = "" if place_dir == os.curdir else place_dir  # (top == root: predict's folders) "x.png", not "./x.png"
        key_dir = _inside(real, root_real) or place_dir
        for e in entries:
            with contextlib.suppress(OSError):
                if e.is_dir():  # follows links
                    subfolders.append(e.path)
                    continue
            if not e.name.lower().endswith(IMAGE_EXTENSIONS) or not _regular_or_dangling(e):
                other += 1  # a pipe or device named x.jpg would block or never end the check
                continue
            place = os.path.join(place_dir, e.name)
            real_file = os.path.realpath(e.path) if e.is_symlink() else None
            key = (_inside(real_file, root_real) or place) if real_file else os.path.join(key_dir, e.name)
            try:
                st = e.stat()
                identity, stat = (st.st_dev, st.st_ino), (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            except OSError:  # a dangling link: the check reports it unreadable
                identity, stat = ("missing", real_file), None
            files.append(_File(place, key, identity, stat))
        stack.extend(reversed(subfolders))
    return files, other


def _regular_or_dangling(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file() or (entry.is_symlink() and not os.path.exists(entry.path))
    except OSError:
        return False


def _inside(real: str, root_real: str) -> Optional[str]:
    """`real` relative to the data folder's real path, or None when it lies outside."""
    return real[len(root_real) + 1:] if real.startswith(root_real + os.sep) else None


def _class_folders(folder: Path) -> list[Path]:
    found = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_dir():
            continue
        if _show(p.name) != p.name:
            raise NFNetZooError(f"class folder {_show(str(p))} has a name that is not valid UTF-8 or holds control "
                                f"characters; class names are written to config.json and model cards as text: "
                                f"rename it (e.g. convmv -f latin1 -t utf8)")
        found.append(p)
    return found


def _scan_classes(folder: Path, root: Path) -> tuple[dict[str, list[_File]], int]:
    """{class: [files]} of one split folder (classes in timm's order), and the count of non-image files."""
    from timm.utils.misc import natural_key  # timm's folder reader orders classes so: class2 before class10
    found, other, root_real = {}, 0, os.path.realpath(root)
    for cls_dir in _class_folders(folder):
        found[cls_dir.name], n = _walk_images(str(cls_dir), str(root), root_real)
        other += n
    return {c: found[c] for c in sorted(found, key=natural_key)}, other


def _count_once(groups: dict[tuple[str, str], list[_File]]) -> dict[tuple[str, str], list[_File]]:
    """Each file once. Reached twice within one class folder (a loop, a link): counted once. Reached
    from two class folders, or from train/ and val/: refused, as its label or split would be wrong."""
    first: dict[tuple, tuple[tuple[str, str], _File]] = {}
    out = {}
    for group, files in groups.items():
        out[group] = []
        for f in files:
            seen = first.setdefault(f.identity, (group, f))
            if seen[1] is f:
                out[group].append(f)
            elif seen[0] != group:
                (split, cls), (split2, cls2) = seen[0], group
                why = (f"from class folders {_show(cls)} and {_show(cls2)} (two labels)" if split == split2 else
                       f"from {split}/ and {split2}/ (validation images would be trained on)")
                raise NFNetZooError(f"{_show(seen[1].place)} and {_show(f.place)} are the same file, reached "
                                    f"{why}; remove the link or the copy so each image is in one place")
    return out


def _split_folder(root: Path) -> tuple[Path, Optional[Path]]:
    train = root / "train"
    val = next((root / v for v in VAL_FOLDERS if (root / v).is_dir()), None)
    if train.is_dir():
        siblings = [p.name for p in _class_folders(root) if p.name != "train"]
        if siblings and not _class_folders(train):  # train/ holds images, beside other folders: a class named train
            return root, None
        others = [n for n in siblings if n not in SPLIT_FOLDERS]
        if not others:
            return train, val
        raise NFNetZooError(f"{root} has train/ with class folders beside other folders ({', '.join(others[:3])}): "
                            f"a split layout or classes? Move {others[0]}/ into train/ (or out of {root}), or "
                            f"rename a class named train (e.g. to train_)")
    if val is not None:
        raise NFNetZooError(f"{root} has {val.name}/ but no train/; add train/<class>/ folders")
    return root, None


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


def _folder_data(root: Path, val_split: float, check: Check) -> ImageData:
    train_dir, val_dir = _split_folder(root)
    by_class, other = _scan_classes(train_dir, root)
    if not by_class:
        loose = any(p.suffix.lower() in IMAGE_EXTENSIONS for p in train_dir.iterdir())
        hint = "images lie directly in it; " if loose else ""
        raise NFNetZooError(f"{train_dir} has no class folders ({hint}expected {train_dir}/<class>/<image>); "
                            f"put each class's images in a folder named after the class")
    groups = {("train", c): files for c, files in by_class.items()}
    if val_dir is not None:
        val_by_class, other_val = _scan_classes(val_dir, root)
        other += other_val
        groups.update({(val_dir.name, c): files for c, files in val_by_class.items()})
    groups = _count_once(groups)
    empty = [c for (split, c), files in groups.items() if split == "train" and not files]
    if empty:
        warnings.warn(f"ignoring {len(empty)} class folder(s) with no images in {train_dir}: {', '.join(empty[:5])}")
    classes = [c for (split, c), files in groups.items() if split == "train" and files]
    if len(classes) < 2:
        raise NFNetZooError(f"{train_dir} has {len(classes)} class folder(s) with images ({', '.join(classes) or 'none'}); "
                            f"a classifier needs at least 2 classes")
    index = {c: i for i, c in enumerate(classes)}
    train = [(f.key, index[c]) for (split, c), files in groups.items() if split == "train" for f in files]
    if val_dir is not None:
        unknown = [c for (split, c), files in groups.items() if split != "train" and files and c not in index]
        if unknown:
            raise NFNetZooError(f"{val_dir} has class folder(s) that {train_dir} lacks: {', '.join(unknown[:5])}; "
                                f"add their training images or remove them from {val_dir.name}/")
        val = [(f.key, index[c]) for (split, c), files in groups.items() if split != "train" for f in files]
        if val_split and val_split != VAL_SPLIT_DEFAULT:
            warnings.warn(f"--val-split ignored: {root} has its own {val_dir.name}/ folder")
    else:
        train, val = _stratified_split(train, val_split)
    if other:
        warnings.warn(f"ignored {other} non-image file(s) in {root} (images are {', '.join(IMAGE_EXTENSIONS)})")
    data = ImageData(str(root), "folder", classes, sorted(train), sorted(val))
    stats = {f.key: f.stat for files in groups.values() for f in files if f.stat is not None}
    _check_data(data, check, stats)
    return data


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


# --- Hugging Face datasets saved on disk -------------------------------------------------------
def _json_file(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _is_saved_dataset(folder: Path) -> bool:
    """The layout `Dataset.save_to_disk` writes: state.json listing its arrow files, dataset_info.json."""
    state = _json_file(folder / "state.json")
    files = state.get("_data_files") if isinstance(state, dict) else None
    return (isinstance(files, list) and bool(files) and (folder / "dataset_info.json").is_file()
            and all(isinstance(f, dict) and isinstance(f.get("filename"), str)
                    and (folder / f["filename"]).is_file() for f in files))


def _is_hf_dataset(root: Path) -> bool:
    """A `save_to_disk` folder (a DatasetDict's splits, or one Dataset); a user's stray state.json or
    dataset_dict.json at the top of an image folder is not one."""
    if _is_saved_dataset(root):
        return True
    splits = _json_file(root / "dataset_dict.json")
    names = splits.get("splits") if isinstance(splits, dict) else None
    return (isinstance(names, list) and bool(names)
            and all(isinstance(n, str) and _is_saved_dataset(root / n) for n in names))


def _datasets():
    try:
        import datasets
    except ImportError:
        return None
    return datasets


def _load_hf(root: str, builder: Optional[str] = None, data_files: Optional[dict] = None):
    """A save_to_disk folder, or (`builder`) datasets.load_dataset of parquet/arrow files: a DatasetDict by split."""
    datasets = _datasets()
    if datasets is None:
        what = f"{builder} files" if builder else "a Hugging Face dataset saved on disk"
        raise NFNetZooError(f"{root} holds {what}; reading it needs the `datasets` package: "
                            f"pip install 'nfnet-zoo[datasets]' (or pip install datasets)")
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


@dataclass(frozen=True)
class Columns:
    """The columns the user chose: timm's --input-key (the images) and --target-key (the labels); None: the one there is."""

    input_key: Optional[str] = None
    target_key: Optional[str] = None


def _pick(what: str, flag: str, given: Optional[str], candidates: list[str], columns: list[str], where: str) -> str:
    if given is not None:
        if given not in columns:
            raise NFNetZooError(f"{where} has no column {given!r} ({flag}); its columns are {', '.join(columns)}")
        return given
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise NFNetZooError(f"{where} has no {what} column among {', '.join(columns) or 'no columns'}; name it "
                            f"with {flag} COLUMN")
    raise NFNetZooError(f"{where} has {len(candidates)} {what} columns ({', '.join(candidates)}); choose one with "
                        f"{flag} {candidates[0]}")


def _label_text(value) -> Optional[str]:
    """A label as its class name; None for a row without one (None, empty, or negative: -1 by convention)."""
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0):
        return None
    return str(value).strip() or None


def _class_names(values) -> list[str]:
    """The classes of a label column that is not a ClassLabel: its values as text, in timm's order."""
    from timm.utils.misc import natural_key
    return sorted({t for t in map(_label_text, values) if t is not None}, key=natural_key)


def _hf_columns(ds, root: str, columns: Columns = Columns()) -> tuple[str, str, list[str], bool]:
    """The image column, the label column, the class names, and whether the labels are ClassLabel indices."""
    from datasets import ClassLabel, Image as HFImage
    names = list(ds.features)
    where = f"{_show(root)} (columns {', '.join(names)})"
    images = [n for n, f in ds.features.items() if isinstance(f, HFImage)]
    image_col = _pick("Image", "--input-key", columns.input_key, images, names, _show(root))
    if not isinstance(ds.features[image_col], HFImage):
        raise NFNetZooError(f"{where}: --input-key {image_col} is not an Image column; pass one of "
                            f"{', '.join(images) or 'none (cast the image column with datasets.Image())'}")
    labels = [n for n, f in ds.features.items() if isinstance(f, ClassLabel)]
    try:
        label_col = _pick("ClassLabel", "--target-key", columns.target_key, labels, names, _show(root))
    except NFNetZooError as e:
        if labels or columns.target_key is not None:
            raise
        raise NFNetZooError(f"{e}, or cast the label column with dataset.class_encode_column(...)") from None
    feature = ds.features[label_col]
    if isinstance(feature, ClassLabel):
        return image_col, label_col, list(feature.names), True
    return image_col, label_col, _class_names(ds[label_col]), False


def _labelled(values, split: str, classes: list[str], indices: bool, root: Path, quiet: bool = False,
              rows: Optional[Callable[[int], str]] = None) -> list[tuple[int, int]]:
    """(row, label) of the rows of `split` with a label: ClassLabel `indices`, or class names. The others (-1, the
    unlabelled convention, None, or out of range) are left out with a warning, or silently with `quiet` when none of
    the split has one. A class name the classes lack is refused: its images would be scored against no class."""
    rows = rows or (lambda i: f"{split}/{i}")
    index = None if indices else {c: i for i, c in enumerate(classes)}
    kept, left_out, unknown = [], [], []
    for i, lab in enumerate(values):
        if index is None:
            label = lab if isinstance(lab, int) and not isinstance(lab, bool) and 0 <= lab < len(classes) else None
        else:
            text = _label_text(lab)
            label = index.get(text) if text is not None else None
            if text is not None and label is None:
                unknown.append(text)
        if label is None:
            left_out.append(rows(i))
        else:
            kept.append((i, label))
    if unknown:
        raise NFNetZooError(f"the {split} split of {_show(str(root))} has labels the train split lacks: "
                            f"{', '.join(sorted(set(unknown))[:5])}; add their training images or remove those rows")
    if left_out and (kept or not quiet):
        warnings.warn(f"left out {len(left_out)} row(s) without a label (-1 or out of range) of {root}: "
                      f"{', '.join(left_out[:3])}{' ...' if len(left_out) > 3 else ''}")
    return kept


def _rows(split: str, labelled: list[tuple[int, int]]) -> list[tuple[str, int]]:
    """(key, label) of a dataset's rows: the key is split/row, what the opener reads back."""
    return [(f"{split}/{i}", label) for i, label in labelled]


def _hf_data(root: Path, val_split: float, check: Check, columns: Columns = Columns(), builder: Optional[str] = None,
             data_files: Optional[dict] = None, source: Optional[str] = None) -> ImageData:
    """A save_to_disk folder, or parquet/arrow files (`builder`, `data_files`) read by datasets.load_dataset."""
    loaded = _load_hf(str(root), builder, data_files)  # first: it names the missing `datasets` package in one line
    from datasets import DatasetDict, Image as HFImage
    if isinstance(loaded, DatasetDict):
        if "train" not in loaded:
            raise NFNetZooError(f"{root} has splits {list(loaded)} but no 'train'; save a DatasetDict with a train split")
        empty = [name for name, ds in loaded.items() if len(ds) == 0]
        if empty:
            raise NFNetZooError(f"the {empty[0]} split of {_show(source or str(root))} is empty (no rows); remove its "
                                f"files or add images to it")
        splits, candidates = {"train": loaded["train"]}, [s for s in _HF_VAL_SPLITS if s in loaded]
    else:
        splits, candidates = {"": loaded}, []
    train_split = "train" if "train" in splits else ""
    image_col, label_col, names, indices = _hf_columns(splits[train_split], str(root), columns)
    train = _rows(train_split, _labelled(splits[train_split][label_col], train_split, names, indices, root))
    val_name, val = None, []
    for name in candidates:  # the first split with labels: a `test` split is often unlabelled (-1)
        ds = loaded[name]
        if image_col in ds.features and label_col in ds.features:
            val = _rows(name, _labelled(ds[label_col], name, names, indices, root, quiet=True))
        if val:
            val_name, splits[name] = name, ds
            break
        warnings.warn(f"the {name} split of {root} has no labels (-1) or no {image_col}/{label_col} columns: not used "
                      f"for validation")
    if not val_name:
        train, val = _stratified_split(train, val_split)
    data = ImageData(str(root), "hf", names, train, val, image_column=image_col, builder=builder,
                     data_files=data_files, source=source)
    opener = data.opener()
    # check the encoded bytes without the datasets decoder in the way
    opener._splits = ({s: ds.cast_column(image_col, HFImage(decode=False)) for s, ds in splits.items()}
                      if train_split else splits[""].cast_column(image_col, HFImage(decode=False)))
    _check_data(data, check, raw=opener.raw)
    return data


# --- tables of image files: an image folder's metadata.csv/jsonl, a CSV file ------------------------------------
def _table_data(root: Path, tables: dict[str, Path], val_split: float, check: Check, columns: Columns,
                source: Optional[str] = None) -> ImageData:
    """Image files named by tables (sources.table_files), paths relative to each table's folder. Read by our folder
    code, not datasets' imagefolder builder: it counts each real file once, follows links safely and keeps the
    start-up check's cache, exactly as for class folders (and data.json lists the files, so a resume is exact)."""
    read = {split: read_table(path) for split, path in tables.items()}
    names, rows = read["train"]
    where = f"{_show(str(tables['train']))}"
    image_col = _pick("image path", "--input-key", columns.input_key, [c for c in IMAGE_KEYS if c in names][:1],
                      names, where)
    label_col = _pick("label", "--target-key", columns.target_key, [c for c in names if c != image_col], names, where)
    classes = _class_names(r.get(label_col) for r in rows)
    root_real = os.path.realpath(root)
    groups: dict[tuple[str, str], list[_File]] = {}
    val_name = None
    for split, (cols, split_rows) in read.items():
        if split != "train" and val_name:
            continue
        table = tables[split]
        kept = []
        if image_col in cols and label_col in cols:
            kept = _labelled([r.get(label_col) for r in split_rows], split, classes, False, root,
                             quiet=split != "train", rows=lambda i: f"{table.name} row {i + 1}")
        if split != "train":
            if not kept:
                warnings.warn(f"the {split} split of {root} ({table}) has no labels or no {image_col}/{label_col} "
                              f"columns: not used for validation")
                continue
            val_name = split
        for i, label in kept:
            groups.setdefault((split, classes[label]), []).append(
                _table_file(table, split_rows[i].get(image_col), i, image_col, root, root_real))
    groups = _count_once(groups)
    index = {c: i for i, c in enumerate(classes)}
    train = [(f.key, index[c]) for (split, c), files in groups.items() if split == "train" for f in files]
    val = [(f.key, index[c]) for (split, c), files in groups.items() if split != "train" for f in files]
    if not val_name:
        train, val = _stratified_split(train, val_split)
    data = ImageData(str(root), "folder", classes, sorted(train), sorted(val), source=source)
    _check_data(data, check, {f.key: f.stat for files in groups.values() for f in files})
    return data


def _table_file(table: Path, name, row: int, column: str, root: Path, root_real: str) -> _File:
    """The image file a table's row names, counted under its real path (as _walk_images counts files)."""
    where = f"{_show(str(table))} row {row + 1}"
    if not isinstance(name, str) or not name.strip():
        raise NFNetZooError(f"{where} has no image path in its {column} column; fill it in or remove the row")
    rel = os.path.normpath(name)
    if os.path.isabs(rel) or rel.split(os.sep)[0] == os.pardir:
        raise NFNetZooError(f"{where} names {_show(name)}, outside {_show(str(table.parent))}; paths are relative "
                            f"to the table's folder: move the image into it")
    path = table.parent / rel
    try:
        st = os.stat(path)  # follows links
    except OSError as e:
        why = "does not exist" if isinstance(e, FileNotFoundError) else f"cannot be read ({e.strerror})"
        raise NFNetZooError(f"{where} names {_show(name)}, which {why}; fix the path (relative to "
                            f"{_show(str(table.parent))}) or remove the row") from None
    if not S_ISREG(st.st_mode):
        raise NFNetZooError(f"{where} names {_show(name)}, which is not a file; name an image file")
    place = os.path.relpath(path, root)
    key = _inside(os.path.realpath(path), root_real) or place
    return _File(place, key, (st.st_dev, st.st_ino), (st.st_size, st.st_mtime_ns, st.st_ctime_ns))


# --- entry points ------------------------------------------------------------------------------
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


def _data_root(data_dir: str | os.PathLike, check: str) -> Path:
    if check not in CHECK_LEVELS:
        raise NFNetZooError(f"--check-images must be one of {', '.join(CHECK_LEVELS)}, got {check!r}")
    # absolute: data.json must still find the images when a run is resumed from another folder
    root = Path(data_dir).expanduser().absolute()
    if root.exists() and not root.is_dir() and root.suffix.lower() not in _DATA_FILES:
        raise NFNetZooError(f"--data-dir {_show(str(root))} is a file, not a folder (nor {', '.join(_DATA_FILES)}); "
                            f"pass the folder that holds the class folders (DIR/<class>/<image>)")
    if root.is_file():
        return root
    if not root.is_dir():
        raise NFNetZooError(f"data folder {_show(str(root))} does not exist; pass --data-dir with a folder of "
                            f"class folders (DIR/<class>/<image> or DIR/train/<class>/<image>)")
    return root


def _source_data(root: Path, val_split: float, check: Check, columns: Columns) -> Optional[ImageData]:
    """The data of a source that is not class folders (a saved dataset, parquet/arrow files, tables), else None."""
    source = str(root) if root.is_file() else None
    folder = root.parent if root.is_file() else root
    if _is_hf_dataset(root):
        return _hf_data(root, val_split, check, columns)
    tables = table_files(root)
    if tables:
        return _table_data(folder, tables, val_split, check, columns, source)
    found = data_files(root)
    if found:
        return _hf_data(folder, val_split, check, columns, *found, source=source)
    if columns != Columns():
        warnings.warn(f"--input-key and --target-key ignored: {root} is class folders (the labels are their names)")
    return None


def load_image_data(data_dir: str | os.PathLike, val_split: float = VAL_SPLIT_DEFAULT,
                    bad_images: str = "skip", workers: int = 4, check: str = "full", process_index: int = 0,
                    num_processes: int = 1, gather: Gather = None, input_key: Optional[str] = None,
                    target_key: Optional[str] = None) -> ImageData:
    """Find, check and split the images of `data_dir` (see the module docstring for the layouts).

    `bad_images`: "skip" leaves unreadable files out with a warning naming how many; "error" refuses.
    `check`: "full", "header" or "none" (see image_check.py). With several processes, each calls this
    with its `process_index` and `gather` (accelerate.utils.gather_object): each checks its share.
    `input_key`, `target_key`: the image and label columns of a table or dataset (timm's --input-key, --target-key).
    """
    root = _data_root(data_dir, check)
    if root.is_dir() and not any(root.iterdir()):
        raise NFNetZooError(f"data folder {root} is empty; put each class's images in DIR/<class>/")
    if not 0.0 <= val_split < 1.0:
        raise NFNetZooError(f"--val-split must be in [0, 1), got {val_split}")
    how = Check(check, bad_images, workers, process_index, num_processes, gather)
    data = _source_data(root, val_split, how, Columns(input_key, target_key))
    if data is None:
        data = _folder_data(root, val_split, how)
    elif len({lab for _, lab in data.train + data.val}) < 2:
        raise NFNetZooError(f"{_show(data.source or data.root)} has {len({lab for _, lab in data.train})} class(es) "
                            f"with labelled training images; a classifier needs at least 2")
    if not data.train:
        raise NFNetZooError(f"no readable training images in {root}")
    return data


def load_eval_samples(data_dir: str | os.PathLike, bad_images: str = "skip", workers: int = 4,
                      check: str = "full", input_key: Optional[str] = None, target_key: Optional[str] = None
                      ) -> ImageData:
    """The images to evaluate in `data_dir`: its val/ (or validation/) split when it has one, else
    every image of its class folders (a dataset, parquet files or tables: the validation/test split, else all)."""
    root = _data_root(data_dir, check)
    how = Check(check, bad_images, workers)
    data = _source_data(root, 0.0, how, Columns(input_key, target_key))
    if data is not None:
        if not data.val:  # no validation split: all of it
            data.val, data.train = data.train, []
    else:
        train_dir, val_dir = _split_folder(root)
        folder = val_dir or train_dir
        by_class, other = _scan_classes(folder, folder)
        by_class = {c: files for (_, c), files in _count_once({("", c): f for c, f in by_class.items()}).items()}
        classes = [c for c, files in by_class.items() if files]
        if not classes:
            raise NFNetZooError(f"no images in class folders of {folder}; expected {folder}/<class>/<image>")
        if other:
            warnings.warn(f"ignored {other} non-image file(s) in {folder}")
        samples = [(f.key, i) for i, c in enumerate(classes) for f in by_class[c]]
        data = ImageData(str(folder), "folder", classes, [], samples)
        _check_data(data, how, {f.key: f.stat for files in by_class.values() for f in files if f.stat})
    if not data.val:
        raise NFNetZooError(f"no readable images to evaluate in {data.root} ({len(data.skipped)} unreadable); "
                            f"pass a folder of images PIL can open")
    return data


def run_held_out(data_json: Path, data_dir: str | os.PathLike, bad_images: str = "skip", workers: int = 4,
                 check: str = "full") -> Optional[ImageData]:
    """The held-out (validation) samples of a run, from its data.json, when `data_dir` is the data the
    run was trained on; None when it is other data. Evaluating all of a run's own data would score
    the images it was trained on."""
    try:
        run_data = ImageData.load(data_json)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError) as e:
        warnings.warn(f"cannot read {data_json} ({type(e).__name__}): if {_show(str(data_dir))} is the data this "
                      f"run was trained on, the scores include its training images")
        return None
    try:
        if not os.path.samefile(run_data.source or run_data.root, data_dir):
            return None
    except (OSError, TypeError):  # either folder is gone: not the same
        return None
    if not run_data.val:
        raise NFNetZooError(f"{_show(str(data_dir))} is the data this run was trained on, and the run held out no "
                            f"images of it (--val-split 0); evaluate on images it was not trained on")
    held = ImageData(run_data.root, run_data.kind, run_data.classes, [], run_data.val,
                     image_column=run_data.image_column, builder=run_data.builder, data_files=run_data.data_files,
                     source=run_data.source)
    _check_data(held, Check(check, bad_images, workers))
    if not held.val:
        raise NFNetZooError(f"no readable images in the held-out split of {_show(str(data_dir))} listed in {data_json}")
    return held


# --- predict's inputs: image files, folders, or paths on stdin ------------------------------------------------------
def image_paths(inputs: Sequence[str | os.PathLike], stdin: Optional[Iterable[str]] = None) -> Iterator[str]:
    """The image paths that INPUTS name, in order: a file as given; a folder's images, recursively in name order
    (links followed, each real folder entered once and each real file listed once, as for training data); "-" the
    lines of `stdin`, read lazily (blank lines skipped). Files and folders are checked now, before anything is
    returned: a missing path or a folder without images is a one-line error. Paths from stdin are not: a missing or
    unreadable one is that image's error when it is opened."""
    inputs = [os.fspath(i) for i in inputs]
    if inputs.count("-") > 1:
        raise NFNetZooError('"-" (paths on stdin) is given more than once; give it once')
    parts, seen = [], set()
    for given in inputs:
        if given == "-":
            if stdin is None:
                raise NFNetZooError('"-" reads image paths from stdin, and there is no stdin here; pass files or folders')
            parts.append(None)
        elif os.path.isdir(given):
            files, _ = _walk_images(given, given, os.path.realpath(given))
            found = []
            for f in files:  # a file reached twice (a link, two folders given) is scored once
                if f.identity not in seen:
                    seen.add(f.identity)
                    found.append(os.path.join(given, f.place))
            if not found:
                raise NFNetZooError(f"{_show(given)} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)} "
                                    f"in it and its subfolders)")
            parts.append(found)
        elif os.path.lexists(given):
            parts.append([given])
        else:
            raise NFNetZooError(f"image {_show(given)} does not exist")

    def paths() -> Iterator[str]:
        for part in parts:
            if part is not None:
                yield from part
                continue
            for line in stdin:
                line = line.rstrip("\r\n")
                if line.strip():
                    yield line
    return paths()


class ImageFiles(torch.utils.data.Dataset):
    """Item PATH: (path, image tensor, None), or (path, None, the error) when the file cannot be read as an image,
    so one bad file does not stop the others. Its indices are the paths themselves, which a DataLoader takes from
    any iterable sampler, so a stream of paths is read as the batches need it."""

    def __init__(self, transform: Callable):
        self.transform = transform

    def __getitem__(self, path: str) -> tuple[str, Optional[torch.Tensor], Optional[str]]:
        try:
            with Image.open(path) as img:
                img.load()
                return path, self.transform(to_rgb(img)), None
        except FileNotFoundError:
            return path, None, "does not exist"
        except IsADirectoryError:
            return path, None, "is a folder, not an image file"
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            return path, None, f"cannot read image ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})"


def collate_image_files(items: list) -> tuple[list[str], Optional[torch.Tensor], list[Optional[str]]]:
    """A batch of `ImageFiles` items: the paths, the readable images stacked (None if none is), the errors."""
    paths, tensors, errors = zip(*items)
    good = [t for t in tensors if t is not None]
    return list(paths), torch.stack(good) if good else None, list(errors)


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


class WorkerSignals:
    """DataLoader worker_init_fn. Ctrl-C is for the main process: the workers ignore SIGINT. So is SIGTERM while the
    main process is inside `held()` (its training loop, which saves the state and stops the workers): schedulers
    (scancel, a kill of the process group) signal the workers too, and a worker dying there ended the run with a
    "worker killed" error before anything was saved. Outside it a worker ends on SIGTERM, quietly (status 0):
    multiprocessing terminates daemonic workers so when the main process exits (and would wait forever for one that
    ignored it), and a worker killed by the signal would add torch's "worker is killed by signal" traceback."""

    def __init__(self):
        import multiprocessing
        self._held = multiprocessing.RawValue("b", 0)  # shared memory: the workers read what the main process sets

    def __call__(self, worker_id: int) -> None:
        import signal
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        if not self._held.value:
            os._exit(0)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self._held.value = 1
        try:
            yield
        finally:
            self._held.value = 0


__all__ = ["ImageData", "load_image_data", "load_eval_samples", "run_held_out", "to_rgb", "ImageDataset", "EpochSampler",
           "sample_seed", "IMAGE_EXTENSIONS", "WorkerSignals", "image_paths", "ImageFiles", "collate_image_files"]
