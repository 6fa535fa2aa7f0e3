"""Hugging Face datasets: a `save_to_disk` folder, or parquet/arrow files read with `datasets.load_dataset`; the image
and label columns (--input-key/--target-key), labelled rows, splits by name."""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..errors import NFNetZooError
from .samples import Check, ImageData, _check_data, _load_hf, _show, _stratified_split


_HF_VAL_SPLITS = ("validation", "val", "valid", "test")


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
             data_files: Optional[dict] = None, source: Optional[str] = None, config: Optional[str] = None,
             revision: Optional[str] = None) -> ImageData:
    """A save_to_disk folder, parquet/arrow files (`builder`, `data_files`) read by datasets.load_dataset, or a Hub
    dataset (root hfds/NAME, its `config` at commit `revision`)."""
    loaded = _load_hf(str(root), builder, data_files, config, revision)  # first: it names the missing `datasets` package in one line
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
                     data_files=data_files, source=source, config=config, revision=revision)
    opener = data.opener()
    # check the encoded bytes without the datasets decoder in the way
    opener._splits = ({s: ds.cast_column(image_col, HFImage(decode=False)) for s, ds in splits.items()}
                      if train_split else splits[""].cast_column(image_col, HFImage(decode=False)))
    _check_data(data, check, raw=opener.raw)
    return data
