"""The start-up check of a data set's images: how deep it looks, who does it, and what is remembered.

Levels (`--check-images`):
- full:   decode every image (JPEGs at reduced scale): catches every file PIL cannot read;
- header: PIL identifies the file and its size, and the file's last bytes hold the format's end
          marker (JPEG EOI, PNG IEND), without decoding: catches non-images, garbage and truncated
          JPEG/PNG files, but not damage inside the compressed data;
- none:   no check, as timm's train.py; a file that cannot be read stops training when it is reached.

With several processes each checks its 1/N share and the results are gathered (no process waits
for the whole check). Results of folders are remembered in a JSON cache file per data folder,
keyed by each file's path, size, mtime_ns and ctime_ns, so a run on an unchanged folder decodes
nothing again; an entry whose key does not match is checked again.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import PIL
from PIL import Image, ImageFile

from nfnet_zoo_cli.settings import CHECK_LEVELS

from ..files import write_json_atomic
from ..errors import NFNetZooError

_CACHE_FORMAT = "nfnet-zoo image check 1"
_END_MARKERS = {"JPEG": b"\xff\xd9", "MPO": b"\xff\xd9", "PNG": b"IEND"}
_TAIL = 1024  # writers pad some files after the end marker; look for it this far from the end
_FAULTS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError, TypeError, KeyError, EOFError)

# One function gathers a list from every process into one list (accelerate.utils.gather_object);
# None: a single process.
Gather = Optional[Callable[[list], list]]


def is_readable(raw: Callable[[str], Image.Image], key: str, level: str) -> bool:
    """Does the image `key` (opened lazily by `raw`) pass the check at `level`?"""
    try:
        img = raw(key)
    except _FAULTS:
        return False
    try:
        if level == "header":
            return min(img.size) > 0 and _ends_well(img)
        if img.format == "JPEG":
            img.draft("RGB", (64, 64))  # decode at reduced scale: the check only needs a full pass
        img.load()
        return True
    except _FAULTS:
        return False
    finally:
        img.close()


def _ends_well(img: Image.Image) -> bool:
    marker = _END_MARKERS.get(img.format)
    fp = getattr(img, "fp", None)
    if marker is None or fp is None:
        return True
    fp.seek(0, os.SEEK_END)
    fp.seek(max(0, fp.tell() - _TAIL))
    return marker in fp.read()


class CheckCache:
    """Check results of one folder's files: {key: [size, mtime_ns, ctime_ns, level, ok]} in a JSON file."""

    def __init__(self, root: str, stats: dict[str, tuple[int, int, int]]):
        self.root, self.stats = os.path.realpath(root), stats
        self.path = cache_dir() / f"{hashlib.sha256(os.fsencode(self.root)).hexdigest()[:24]}.json"
        self.entries: dict[str, list] = {}
        self.changed = False
        try:
            d = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        # trust nothing from a file of another format, folder or Pillow (which decides what is readable)
        if isinstance(d, dict) and d.get("format") == _CACHE_FORMAT and d.get("root") == self.root \
                and d.get("pillow") == PIL.__version__ and isinstance(d.get("files"), dict):
            self.entries = d["files"]

    def lookup(self, key: str, level: str) -> Optional[bool]:
        """The remembered result, if the file is unchanged and was checked at least this deeply."""
        e, st = self.entries.get(key), self.stats.get(key)
        if st is None or not isinstance(e, list) or len(e) != 5 or e[:3] != list(st):
            return None
        if e[3] == "full" or e[3] == level:
            return bool(e[4])
        return None

    def record(self, key: str, level: str, ok: bool) -> None:
        if key in self.stats and self.lookup(key, level) is None:  # never replace a deeper check
            self.entries[key] = [*self.stats[key], level, ok]
            self.changed = True

    def save(self) -> None:
        if not self.changed:
            return
        files = {k: e for k, e in self.entries.items() if k in self.stats}  # forget files that are gone
        try:
            write_json_atomic(self.path, {"format": _CACHE_FORMAT, "root": self.root, "pillow": PIL.__version__,
                                          "files": files}, indent=None)
        except OSError as e:
            warnings.warn(f"could not save the image check results in {self.path} ({e.strerror}); the next run "
                          f"checks the images again (set NFNET_ZOO_CACHE to a writable folder)")


def cache_dir() -> Path:
    """$NFNET_ZOO_CACHE, else nfnet-zoo/image-checks in the Hugging Face cache folder ($HF_HOME)."""
    if os.environ.get("NFNET_ZOO_CACHE"):
        return Path(os.environ["NFNET_ZOO_CACHE"]).expanduser()
    hf_home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(hf_home).expanduser() / "nfnet-zoo" / "image-checks"


def check_samples(raw: Callable[[str], Image.Image], samples: list[tuple[str, int]], level: str, workers: int,
                  cache: Optional[CheckCache] = None, process_index: int = 0, num_processes: int = 1,
                  gather: Gather = None) -> tuple[list[tuple[str, int]], list[str]]:
    """(readable samples, unreadable keys). Every process calls this with the same samples and ends
    with the same result; each checks (or finds in its cache) only its 1/N share."""
    if level == "none":
        return list(samples), []
    if level == "full" and ImageFile.LOAD_TRUNCATED_IMAGES:  # someone's global switch would hide truncated files
        warnings.warn("PIL's LOAD_TRUNCATED_IMAGES is on: truncated images are not detected")
    mine = [k for k, _ in samples[process_index::num_processes]]
    known = {k: cache.lookup(k, level) for k in mine} if cache is not None else {}
    todo = [k for k in mine if known.get(k) is None]
    hits = set(mine) - set(todo)
    with ThreadPoolExecutor(max(1, workers)) as pool:  # PIL releases the GIL while decoding
        known.update(zip(todo, pool.map(lambda k: is_readable(raw, k, level), todo, chunksize=64)))
    found = [(k, known[k]) for k in mine]
    if num_processes > 1:
        digest = hashlib.sha256(json.dumps(samples).encode("utf-8", "surrogateescape")).hexdigest()
        if len(set(gather([digest]))) > 1:  # a share of another list would leave files unchecked
            raise NFNetZooError("the processes found different files in the data folder; every machine needs "
                                "the same data at the same path (or one shared filesystem)")
        found = gather(found)
    results = dict(found)
    if cache is not None:
        for k, ok in found:
            if k not in hits:
                cache.record(k, level, ok)
    good = [s for s in samples if results[s[0]]]
    bad = [k for k, _ in samples if not results[k]]
    return good, bad


__all__ = ["CHECK_LEVELS", "CheckCache", "cache_dir", "check_samples", "is_readable"]
