"""The user's images: folders, tables of image files, or Hugging Face datasets and parquet/arrow files, checked once,
converted to RGB.

Layouts read by `load_image_data` (and `load_eval_samples`; found by sources.py):
- `DIR/train/<class>/*` with `DIR/val/<class>/*` (or `validation/`): the given split;
- `DIR/<class>/*` (or only `DIR/train/`): split into train/val per class with a fixed seed;
- a `datasets.save_to_disk` folder (a DatasetDict with train/validation splits, or one Dataset);
- parquet or arrow files in the Hub's layout (DIR/data/train-*.parquet, DIR/<config>/..., DIR/train.parquet, one
  file): `datasets.load_dataset(builder, data_files)`, then the same path as a saved dataset (`_hf_data`);
- a Hub dataset by name, `hfds/NAME[:CONFIG][@REVISION]` (hfds.py): `datasets.load_dataset(NAME, CONFIG,
  revision=COMMIT)` at the revision's resolved commit, then the same path as a saved dataset; data.json records
  the name, config and commit (HF_HUB_OFFLINE=1: from the cache);
- tables naming image files: DIR/metadata.csv or .jsonl (flat, or in DIR/train/, DIR/val/ ...), or a CSV file.
  Read by our folder code, not datasets' imagefolder builder, so that each file is counted once under its real
  path, links are followed as in folders, and the start-up check keeps its per-file cache (`_table_data`).
- WebDataset shards, streamed (shards.py): `wds/DIR` (timm's, with _info.json) or a folder of *.tar shards; not
  checked at the start (a bad image met mid-stream is skipped or refused), no sample list: data.json lists the shards.
The image and label columns are the one Image (or file_name/path) column and the one label column, or
--input-key/--target-key; several label columns are refused. A split's rows without a label (-1, empty) are left
out, and a split with none is never the validation split; without a validation split, --val-split splits train.
Labels are class-folder names in timm's order (`natural_key`: class2 before class10, as timm's folder
reader), the ClassLabel names, or a label column's values in that order, so a checkpoint's class indices agree
with timm's train.py. data.json lists the samples (files, or split/row of the named data files or of the Hub
dataset's recorded commit): a resume is exact.

Every file is counted once, under its real path: links are followed, each real folder is entered
once (a link loop is followed once), a file reached twice within its class folder counts once, and
a file reached from two class folders or from both train/ and val/ is refused with a line naming
both places (it would carry two labels, or leak validation images into training).

Before training the images are checked (image_check.py: full decode, header only, or none): a
file that is not an image, truncated or corrupt is skipped (with a count) or refused, before
training starts rather than in the middle of an epoch.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional

from nfnet_zoo_cli.settings import problem

from ..errors import NFNetZooError
from .image_check import Gather
from .sources import IMAGE_EXTENSIONS, data_files, table_files
from .samples import Check, ImageData, VAL_SPLIT_DEFAULT, _check_data, _show, to_rgb
from .folders import _count_once, _folder_data, _scan_classes, _split_folder, _stats, _table_data
from .hf import Columns, _hf_data, _is_hf_dataset
from .hfds import is_hub_id, open_hub_id, parse_hub_id, resolve_revision
from .loading import (BalancedSampler, EpochSampler, ImageDataset, ImageFiles, Inputs, Row, WorkerSignals, collate_image_files,
                      image_paths, sample_seed)
from .shards import load_shard_data, shard_root


_DATA_FILES = (".csv", ".parquet", ".arrow")  # what --data-dir may name besides a folder


def _check_level(check: str) -> None:
    wrong = problem("check_images", check)  # finetune's declaration: evaluate takes the same levels
    if wrong:
        raise NFNetZooError(f"--check-images {wrong}")


def _data_root(data_dir: str | os.PathLike, check: str) -> Path:
    _check_level(check)
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


def _hub_data(data_id: str, val_split: float, check: Check, columns: Columns) -> ImageData:
    """A Hub dataset `hfds/NAME[:CONFIG][@REVISION]` at its revision's commit, read as a saved dataset is."""
    agree = (lambda c: check.gather([c])[0]) if check.num_processes > 1 and check.gather else None
    root, config, commit, _ = open_hub_id(data_id, agree)  # the config by name: a resume reads the same one
    return _hf_data(Path(root), val_split, check, columns, config=config, revision=commit)


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
    if shard_root(data_dir):  # streamed: no per-file check (a bad image met mid-stream is skipped or refused)
        return load_shard_data(data_dir, val_split, input_key, target_key, processes=num_processes, workers=workers)
    hub = is_hub_id(data_dir)
    root = _check_level(check) if hub else _data_root(data_dir, check)
    if root is not None and root.is_dir() and not any(root.iterdir()):
        raise NFNetZooError(f"data folder {root} is empty; put each class's images in DIR/<class>/")
    if not 0.0 <= val_split < 1.0:
        raise NFNetZooError(f"--val-split must be in [0, 1), got {val_split}")
    how = Check(check, bad_images, workers, process_index, num_processes, gather)
    columns = Columns(input_key, target_key)
    data = _hub_data(data_dir, val_split, how, columns) if hub else _source_data(root, val_split, how, columns)
    if data is None:
        data = _folder_data(root, val_split, how)
    elif len({lab for _, lab in data.train + data.val}) < 2:
        raise NFNetZooError(f"{_show(data.source or data.root)} has {len({lab for _, lab in data.train})} class(es) "
                            f"with labelled training images; a classifier needs at least 2")
    if not data.train:
        raise NFNetZooError(f"no readable training images in {data.root}")
    return data


def load_eval_samples(data_dir: str | os.PathLike, bad_images: str = "skip", workers: int = 4,
                      check: str = "full", input_key: Optional[str] = None, target_key: Optional[str] = None
                      ) -> ImageData:
    """The images to evaluate in `data_dir`: its val/ (or validation/) split when it has one, else
    every image of its class folders (a dataset, parquet files, tables or shards: the validation/test split, else all)."""
    if shard_root(data_dir):
        return load_shard_data(data_dir, 0.0, input_key, target_key, evaluating=True)
    how, columns = Check(check, bad_images, workers), Columns(input_key, target_key)
    if is_hub_id(data_dir):
        _check_level(check)
        data = _hub_data(data_dir, 0.0, how, columns)
    else:
        root = _data_root(data_dir, check)
        data = _source_data(root, 0.0, how, columns)
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
        _check_data(data, how, _stats(by_class))
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
    if not _same_data(run_data, data_dir):
        return None
    if run_data.shards:  # streamed: the run's validation shards (or its held-out hash share)
        if not run_data.num_val:
            raise NFNetZooError(f"{_show(str(data_dir))} is the data this run was trained on, and the run held out "
                                f"no samples of it (--val-split 0); evaluate on shards it was not trained on")
        run_data.shards["splits"].pop("train", None)
        return run_data
    if not run_data.val:
        raise NFNetZooError(f"{_show(str(data_dir))} is the data this run was trained on, and the run held out no "
                            f"images of it (--val-split 0); evaluate on images it was not trained on")
    held = ImageData(run_data.root, run_data.kind, run_data.classes, [], run_data.val,
                     image_column=run_data.image_column, builder=run_data.builder, data_files=run_data.data_files,
                     source=run_data.source, config=run_data.config, revision=run_data.revision)
    _check_data(held, Check(check, bad_images, workers))
    if not held.val:
        raise NFNetZooError(f"no readable images in the held-out split of {_show(str(data_dir))} listed in {data_json}")
    return held


def _same_data(run_data: ImageData, data_dir: str | os.PathLike) -> bool:
    """Is `data_dir` the data of `run_data`: the same folder or file, or the same Hub dataset and config (at the
    run's commit, or a revision that resolves to it; without a revision, the run's)."""
    if is_hub_id(data_dir) or run_data.revision is not None:
        if not (is_hub_id(data_dir) and run_data.revision is not None):
            return False
        ds = parse_hub_id(data_dir)
        if ds.root != run_data.root or ds.config not in (None, run_data.config):
            return False
        return ds.revision in (None, run_data.revision) or resolve_revision(ds) == run_data.revision
    try:
        return os.path.samefile(run_data.source or run_data.root, shard_root(data_dir) or data_dir)
    except (OSError, TypeError):  # either folder is gone: not the same
        return False


__all__ = ["ImageData", "load_image_data", "load_eval_samples", "run_held_out", "to_rgb", "ImageDataset", "EpochSampler", "BalancedSampler",
           "sample_seed", "IMAGE_EXTENSIONS", "WorkerSignals", "image_paths", "ImageFiles", "collate_image_files",
           "Inputs", "Row"]
