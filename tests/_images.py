"""Small synthetic image folders for the data/finetune/evaluate tests (real files written with PIL)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# Three classes a tiny network separates in a few steps: dark, mid and bright noise.
LEVELS = {"bright": 170, "dark": 10, "mid": 90}


def class_image(cls: str, rng: np.random.Generator, size: int = 24) -> Image.Image:
    a = rng.integers(0, 80, (size, size, 3)) + LEVELS[cls]
    return Image.fromarray(a.astype(np.uint8), "RGB")


def make_folder(root: Path, n_train: int = 12, n_val: int = 4, classes=tuple(LEVELS), split: bool = True,
                seed: int = 0) -> Path:
    """ROOT/train/<class>/*.png and ROOT/val/<class>/*.png (or ROOT/<class>/*.png when split=False)."""
    rng = np.random.default_rng(seed)
    parts = (("train", n_train), ("val", n_val)) if split else (("", n_train + n_val),)
    for part, n in parts:
        for c in classes:
            d = root / part / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                class_image(c, rng).save(d / f"{i:03d}.png")
    return root


def add_awkward_files(folder: Path, rng_seed: int = 1) -> dict[str, Path]:
    """Files users have in real folders, written into FOLDER (a class folder)."""
    rng = np.random.default_rng(rng_seed)
    base = class_image(folder.name if folder.name in LEVELS else "mid", rng)
    out = {}
    out["cmyk"] = folder / "cmyk.jpg"
    base.convert("CMYK").save(out["cmyk"])
    out["gray16"] = folder / "gray16.png"
    Image.fromarray((np.asarray(base.convert("L"), dtype=np.uint16) * 257)).save(out["gray16"])
    out["palette"] = folder / "palette.png"
    base.convert("P", palette=Image.ADAPTIVE).save(out["palette"], transparency=0)  # index 0 see-through
    out["rgba"] = folder / "rgba.png"
    base.convert("RGBA").save(out["rgba"])
    out["gray"] = folder / "gray.bmp"
    base.convert("L").save(out["gray"])
    full = folder / "_full.jpg"
    base.save(full, quality=95)
    data = full.read_bytes()
    full.unlink()
    out["truncated"] = folder / "truncated.jpg"
    out["truncated"].write_bytes(data[: len(data) // 2])
    out["corrupt"] = folder / "corrupt.png"
    out["corrupt"].write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(rng.integers(0, 256, 200, dtype=np.uint8)))
    out["text"] = folder / "notes.txt"
    out["text"].write_text("not an image")
    return out
