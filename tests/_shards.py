"""WebDataset shards for the tests, written with webdataset's own TarWriter: a colour per class, so that a label
read back can be checked against its image, and the sample's number in its corner pixel (PNG keeps it exactly)."""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Optional

from PIL import Image

COLOURS = [(255, 0, 0), (0, 160, 0), (0, 0, 255), (240, 240, 0)]


def png(label: int, n: int = 0, size: int = 12) -> bytes:
    img = Image.new("RGB", (size, size), COLOURS[label])
    img.putpixel((0, 0), (n % 256, n // 256, 7))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def read_back(img: Image.Image) -> tuple[int, int]:
    """(class of its colour, sample number) of an image written by `png`, as a transform for a stream."""
    rgb = img.getpixel((img.width // 2, img.height // 2))
    label = min(range(len(COLOURS)), key=lambda i: sum((a - b) ** 2 for a, b in zip(COLOURS[i], rgb)))
    r, g, _ = img.getpixel((0, 0))
    return label, r + 256 * g


def write_shards(folder: Path, prefix: str, sizes: list[int], classes: int = 3, image: str = "png",
                 label: Optional[str] = "cls", first: int = 0) -> list[dict]:
    """Shards FOLDER/PREFIX-000000.tar ... of `sizes` samples; sample n (counted from `first`) has class n % classes
    and key PREFIX-n. Returns the samples written ({key, label, shard})."""
    import webdataset as wds
    folder.mkdir(parents=True, exist_ok=True)
    written, n = [], first
    for i, size in enumerate(sizes):
        name = f"{prefix}-{i:06d}.tar"
        with wds.TarWriter(str(folder / name)) as sink:
            for _ in range(size):
                key, lab = f"{prefix}-{n:05d}", n % classes
                sample = {"__key__": key, image: png(lab, n)}
                if label:
                    sample[label] = str(lab).encode()
                sink.write(sample)
                written.append({"key": key, "label": lab, "shard": name})
                n += 1
    return written


def write_info(folder: Path, splits: dict[str, tuple[str, list[int]]], num_classes: Optional[int] = 3) -> None:
    """timm's _info.json: {split: (brace pattern, shard lengths)}."""
    info = {"name": folder.name, "splits": {name: {"name": name, "filenames": [pattern], "num_samples": sum(lengths),
                                                   "shard_lengths": lengths}
                                            for name, (pattern, lengths) in splits.items()}}
    if num_classes is not None:
        info["num_classes"] = num_classes
    (folder / "_info.json").write_text(json.dumps(info))
