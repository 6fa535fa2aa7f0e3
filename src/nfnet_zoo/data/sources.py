"""Where the user's data lies, found before anything is read: parquet/arrow files in the Hub's layout, and tables
(an image folder's metadata.csv / metadata.jsonl, or a CSV file) naming image files.

Split names come from file and folder names as the Hub's loader gives them (`datasets.data_files`:
train/training, validation/valid/val/dev, test/testing/eval), so a snapshot of a Hub dataset reads as on the Hub.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Optional

from ..errors import NFNetZooError

# What PIL reads and timm's folder reader would list, plus the common extras users have.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
FORMATS = {".parquet": "parquet", ".arrow": "arrow"}  # file suffix -> datasets' builder
METADATA = ("metadata.csv", "metadata.jsonl")         # the imagefolder convention: file_name and a label column
TABLE_SPLITS = {"train": "train", "validation": "validation", "val": "validation", "valid": "validation",
                "test": "test"}                        # split folders of an image folder with metadata files
IMAGE_KEYS = ("file_name", "path", "image", "filepath", "filename", "file")  # a table's image column, unless given


def _data_file(name: str) -> Optional[str]:
    return FORMATS.get(os.path.splitext(name)[1].lower())


def _holds_data_files(folder: Path) -> bool:
    """Does `folder` hold parquet/arrow files? Stops at the first image: a class folder (of a million) is no config."""
    try:
        with os.scandir(folder) as entries:
            for e in entries:
                if _data_file(e.name):
                    return True
                if e.name.lower().endswith(IMAGE_EXTENSIONS):
                    return False
    except OSError:
        return False
    return False


def _base_folder(root: Path) -> Optional[Path]:
    """The folder of one config: DIR itself (DIR/train.parquet, DIR/data/, DIR/train/), or its one DIR/<config>/."""
    splits = {"train", "training", "validation", "valid", "val", "dev", "test", "testing"}
    subfolders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if _holds_data_files(root) or any(_holds_data_files(p) for p in subfolders if p.name in splits | {"data"}):
        return root
    configs = [p for p in subfolders if p.name not in splits | {"data"} and
               (_holds_data_files(p) or (p / "data").is_dir() and _holds_data_files(p / "data"))]
    if len(configs) > 1:
        raise NFNetZooError(f"{root} holds the data files of {len(configs)} configs ({', '.join(p.name for p in configs[:5])}); "
                            f"pass one: --data-dir {configs[0]}")
    return configs[0] if configs else None


def data_files(path: Path) -> Optional[tuple[str, dict[str, list[str]]]]:
    """(builder, {split: files}) of the parquet or arrow files at `path` (one file: its train split; a folder: the
    Hub's layout), or None when it holds none. Each file is opened once here, so one that is not what its name
    says is named in one line."""
    if path.is_file():
        builder = _data_file(path.name)
        found = {"train": [str(path)]} if builder else {}
    else:
        base = _base_folder(path)
        if base is None:
            return None
        try:
            from datasets.data_files import DataFilesDict, get_data_patterns
        except ImportError:
            raise NFNetZooError(f"{path} holds parquet or arrow files; reading them needs the `datasets` package: "
                                f"pip install 'nfnet-zoo[datasets]' (or pip install datasets)") from None
        patterns = get_data_patterns(str(base))
        resolved = DataFilesDict.from_patterns(patterns, base_path=str(base))
        found = {str(split): sorted(f for f in files if _data_file(f)) for split, files in resolved.items()}
        found = {split: files for split, files in found.items() if files}
        kinds = {_data_file(f) for files in found.values() for f in files}
        if len(kinds) > 1:
            raise NFNetZooError(f"{base} holds both parquet and arrow files; keep one format")
        builder = kinds.pop() if kinds else None
    if not found:
        return None
    for split, files in found.items():
        if not sum(_rows(f, builder) for f in files):
            raise NFNetZooError(f"the {split} split of {path} is empty (no rows in {', '.join(files)}); remove its "
                                f"files or add images to it")
    return builder, found


def _rows(path: str, builder: str) -> int:
    """The row count of a parquet file (its footer) or an arrow file (memory-mapped, not read)."""
    import pyarrow as pa
    try:
        if builder == "parquet":
            import pyarrow.parquet as pq
            with pq.ParquetFile(path) as f:
                return f.metadata.num_rows
        with pa.memory_map(path) as f:
            try:
                return pa.ipc.open_stream(f).read_all().num_rows
            except pa.ArrowInvalid:
                f.seek(0)
                return pa.ipc.open_file(f).read_all().num_rows
    except (pa.ArrowException, OSError) as e:
        raise NFNetZooError(f"{path} is not a readable {builder} file ({str(e).splitlines()[0][:100]}); replace it "
                            f"with the dataset's file, or remove it") from None


# --- tables ------------------------------------------------------------------------------------
def table_files(path: Path) -> Optional[dict[str, Path]]:
    """{split: table} of a CSV file (its train split), an image folder with metadata.csv/jsonl (its train split), or
    an image folder whose train/ (val/, validation/, valid/, test/) folders each hold one; None otherwise."""
    if path.is_file():
        return {"train": path} if path.suffix.lower() == ".csv" else None
    top = [path / m for m in METADATA if (path / m).is_file()]
    if top:
        return {"train": _one(top)}
    found = {}
    for folder, split in TABLE_SPLITS.items():
        tables = [path / folder / m for m in METADATA if (path / folder / m).is_file()]
        if tables and split not in found:
            found[split] = _one(tables)
    if found and "train" not in found:
        raise NFNetZooError(f"{path} has metadata files in {', '.join(found)} but none in train/; add "
                            f"train/metadata.csv (file_name and a label column)")
    return found or None


def _one(tables: list[Path]) -> Path:
    if len(tables) > 1:
        raise NFNetZooError(f"{tables[0].parent} has both metadata.csv and metadata.jsonl; keep one")
    return tables[0]


def read_table(path: Path) -> tuple[list[str], list[dict]]:
    """The columns and rows of a CSV (header row first) or JSON-lines file."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            if path.suffix.lower() == ".jsonl":
                rows = [json.loads(line) for line in f if line.strip()]
                if not all(isinstance(r, dict) for r in rows):
                    raise ValueError("a line is not a JSON object")
                columns = list(dict.fromkeys(k for r in rows for k in r))
            else:
                reader = csv.DictReader(f)
                rows, columns = list(reader), list(reader.fieldnames or [])
    except (OSError, UnicodeDecodeError, ValueError, csv.Error) as e:
        raise NFNetZooError(f"cannot read {path} ({str(e).splitlines()[0][:100]}); it must be UTF-8 "
                            f"{'JSON lines' if path.suffix.lower() == '.jsonl' else 'CSV with a header row'}") from None
    if not rows:
        raise NFNetZooError(f"{path} has no rows (an empty split); add a row per image (path and label), or remove it")
    return columns, rows
