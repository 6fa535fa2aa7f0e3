"""Image files on disk: class folders (DIR/<class>/*, DIR/train + DIR/val) and tables naming files (metadata.csv or
.jsonl, a CSV). Each file is counted once under its real path; links are followed, a loop once."""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG
from typing import Optional

from ..errors import NFNetZooError
from .sources import IMAGE_EXTENSIONS, IMAGE_KEYS, read_table
from .samples import Check, ImageData, VAL_SPLIT_DEFAULT, _check_data, _show, _stratified_split
from .hf import Columns, _class_names, _labelled, _pick


VAL_FOLDERS = ("val", "validation")
SPLIT_FOLDERS = ("train", *VAL_FOLDERS, "test")  # folders of a split layout (test/ is left for the user)
RUN_MARKERS = ("args.json", "data.json")  # what `finetune` writes first in a run folder
_IGNORED_FILES = {".DS_Store", "Thumbs.db", "desktop.ini"}


@dataclass
class _File:
    place: str            # the path it was found under, relative to the data folder (for messages)
    key: str              # the path it is counted under: its real path relative to the data folder
    identity: tuple       # (device, inode): one file however many paths lead to it (links, loops)
    stat: Optional[tuple[int, int, int]]  # size, mtime_ns, ctime_ns; None when it cannot be read


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
    if val_dir is not None:
        known = set(classes)
        unknown = [c for (split, c), files in groups.items() if split != "train" and files and c not in known]
        if unknown:
            raise NFNetZooError(f"{val_dir} has class folder(s) that {train_dir} lacks: {', '.join(unknown[:5])}; "
                                f"add their training images or remove them from {val_dir.name}/")
    train, val = _samples(groups, classes)
    if val_dir is None:
        train, val = _stratified_split(train, val_split)
    elif val_split and val_split != VAL_SPLIT_DEFAULT:
        warnings.warn(f"--val-split ignored: {root} has its own {val_dir.name}/ folder")
    if other:
        warnings.warn(f"ignored {other} non-image file(s) in {root} (images are {', '.join(IMAGE_EXTENSIONS)})")
    data = ImageData(str(root), "folder", classes, sorted(train), sorted(val))
    _check_data(data, check, _stats(groups))
    return data


def _samples(groups: dict[tuple[str, str], list[_File]], classes: list[str]) -> tuple[list, list]:
    """(key, class index) of the files grouped by (split, class): the train split's, and the other split's."""
    index = {c: i for i, c in enumerate(classes)}
    train = [(f.key, index[c]) for (split, c), files in groups.items() if split == "train" for f in files]
    val = [(f.key, index[c]) for (split, c), files in groups.items() if split != "train" for f in files]
    return train, val


def _stats(groups: dict) -> dict:
    """Each listed file's (size, mtime, ctime), which the start-up check's cache compares."""
    return {f.key: f.stat for files in groups.values() for f in files if f.stat is not None}


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
    train, val = _samples(groups, classes)
    if not val_name:
        train, val = _stratified_split(train, val_split)
    data = ImageData(str(root), "folder", classes, sorted(train), sorted(val), source=source)
    _check_data(data, check, _stats(groups))
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
