"""Atomic file writes: a reader (or a run killed mid-write) sees the old file or the new one, never half."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_bytes_atomic(path: Path, data: bytes) -> bool:
    """Write `data` to `path` atomically; False (and no write) when the file already holds it."""
    path = Path(path)
    if path.is_file() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # beside the target: os.replace stays atomic
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return True


def write_text_atomic(path: Path, text: str) -> bool:
    """Write `text` (UTF-8, newlines as given) to `path` atomically; False (and no write) when the file already
    holds it."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, obj: Any, indent: int = 2, lines: bool = False) -> None:
    """JSON (or, with `lines`, one JSON object per line of the iterable `obj`) written atomically."""
    text = "".join(json.dumps(o) + "\n" for o in obj) if lines else json.dumps(obj, indent=indent) + "\n"
    write_text_atomic(path, text)
