"""The files commands write.

- Atomic writes: a reader (or a run killed mid-write) sees the old file or the new one, never half.
- Ownership manifests, for folders a command can prove it wrote: every file in it (size, sha256), written
  last. A command deletes or reuses a folder only when the folder holds exactly the files its manifest
  lists, unchanged; a user's file beside them, an edited or a missing one, and it refuses instead.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

# The files of a model folder (a run folder holds them beside its training records): what push publishes.
WEIGHTS, CONFIG, CARD, CURVES = "model.safetensors", "config.json", "README.md", "curves.png"


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


# --- ownership manifests ---------------------------------------------------------------------
OWNED = ".nfnet-zoo-files.json"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _entries(folder: Path, manifest: str) -> dict[str, Path]:
    """Every entry under `folder` (symlinks are entries, never followed); folders end with "/"."""
    found = {}
    for top, dirs, files in os.walk(folder):  # os.walk does not follow symlinked folders
        for name in files + dirs:
            path = Path(top, name)
            rel = path.relative_to(folder).as_posix()
            if name in dirs and not path.is_symlink():
                rel += "/"
            if rel != manifest:
                found[rel] = path
    return found


def write_manifest(folder: Path, manifest: str = OWNED, extra: Optional[dict] = None) -> dict:
    """List every file under `folder` with its size and sha256 in `folder/manifest` (atomically), after the
    fields of `extra`."""
    folder = Path(folder)
    files = {rel: {"size": p.stat().st_size, "sha256": sha256(p)}
             for rel, p in sorted(_entries(folder, manifest).items()) if not rel.endswith("/") and not p.is_symlink()}
    write_json_atomic(folder / manifest, {**(extra or {}), "files": files})
    return files


def read_manifest(folder: Path, manifest: str = OWNED) -> tuple[Optional[dict], str]:
    """(files, "") when `folder/manifest` is a well-formed manifest, else (None, what is wrong)."""
    try:
        files = json.loads((Path(folder) / manifest).read_text(encoding="utf-8"))["files"]
        ok = isinstance(files, dict) and all(
            isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
            and ".." not in Path(k).parts and not Path(k).is_absolute() for k, v in files.items())
    except FileNotFoundError:
        return None, f"no {manifest}"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"{manifest} is unreadable ({type(e).__name__})"
    return (files, "") if ok else (None, f"{manifest} is malformed")


def check_manifest(folder: Path, manifest: str = OWNED) -> Optional[str]:
    """None when `folder` holds exactly the unchanged files its manifest lists, else what differs."""
    folder = Path(folder)
    files, problem = read_manifest(folder, manifest)
    if files is None:
        return problem
    present = _entries(folder, manifest)
    folders = {f"{parent.as_posix()}/" for rel in files for parent in Path(rel).parents if parent != Path(".")}
    extra = sorted(set(present) - set(files) - folders)
    if extra:
        return f"{extra[0]} is not one of its files"
    for rel, meta in files.items():
        p = present.get(rel)
        if p is None or p.is_symlink() or not p.is_file():
            return f"{rel} is missing"
        if p.stat().st_size != meta["size"] or sha256(p) != meta["sha256"]:
            return f"{rel} was changed"
    return None


def remove_owned(folder: Path, manifest: str = OWNED) -> Optional[str]:
    """Delete the files `folder`'s manifest lists, then its emptied subfolders, and the manifest; the folder
    itself stays. Nothing is deleted (and the reason is returned) unless `check_manifest` passes."""
    folder = Path(folder)
    problem = check_manifest(folder, manifest)
    if problem is not None:
        return problem
    files, _ = read_manifest(folder, manifest)
    for rel in files:
        (folder / rel).unlink()
    (folder / manifest).unlink()
    for top, _, _ in os.walk(folder, topdown=False):  # deepest first
        if Path(top) != folder:
            Path(top).rmdir()  # empty by now: check_manifest saw every entry
    return None
