"""WebDataset shards, streamed: timm's `wds/PATH` form and a folder of `*.tar` shards.

A shard is read by webdataset's own tar iterators (`tar_file_expander`, `group_by_keys`: a sample is the members
sharing a key, `KEY.jpg` + `KEY.cls`); timm's ReaderWds is not used because its epoch length, shard split and
shuffle draw from its worker seed, so a resumed run could not skip exactly the batches it had consumed.

Found at the start, without decoding an image:
- splits: `_info.json`/`_info.yaml` (timm's: `splits` with `filenames`, brace patterns allowed, `num_samples` and
  optional `shard_lengths`), else the shards' names (`train-000000.tar`, `validation-*`/`val-*`, `test-*`, or
  `train/`, `val/` subfolders); shards naming no split are the train split;
- samples and classes: `num_samples` and `num_classes` (or `classes`) of `_info.json` when it has them; otherwise
  one pass over the tar headers that reads only the small label members (`.cls`), never an image;
- without a validation split, `--val-split` holds out the samples whose `__key__` hashes below the fraction: the
  same samples on every run, resume and process count (the header pass counts them).
While training, each (process, worker) reads its own shards (or, with fewer shards than readers, every n-th
sample), shuffled as a function of (seed, epoch, process, worker); an epoch is a fixed number of batches per
process (as timm's reader), so uneven shards cannot hang DDP; a reader whose share runs out reads it again.
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
import random
import re
import tarfile
import warnings
import zlib
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from PIL import Image, UnidentifiedImageError

from ..errors import NFNetZooError
from .loading import sample_seed, seeded_transform
from .samples import SPLIT_SEED, ImageData, _show, to_rgb
from .sources import IMAGE_EXTENSIONS

PREFIX = "wds/"                          # timm's --dataset wds/...: here --data-dir wds/PATH
INFO = ("_info.json", "_info.yaml", "info.json")  # timm's reader_wds looks for the first two
SPLIT_NAMES = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
               "val": "validation", "dev": "validation", "test": "test", "testing": "test"}
TARGET_KEY = "cls"                       # timm's wds default target key
SHUFFLE_BUFFER = 1024                    # samples (their undecoded bytes) each reader shuffles among


def shard_root(data_dir: str | os.PathLike) -> Optional[Path]:
    """The folder of shards `data_dir` names (`wds/PATH`, or a folder holding *.tar shards or _info.json), else None."""
    given = os.fspath(data_dir)
    path = Path(given).expanduser()
    if given.startswith(PREFIX) and not path.exists():
        path = Path(given[len(PREFIX):]).expanduser()
        if not given[len(PREFIX):] or not path.is_dir():
            raise NFNetZooError(f"--data-dir {_show(given)}: {_show(str(path))} is not a folder; pass wds/FOLDER with "
                                f"the folder of .tar shards")
        return path.absolute()
    if not path.is_dir():
        return None
    if any((path / n).is_file() for n in INFO) or _tars(path) or any(_tars(path / s) for s in SPLIT_NAMES):
        return path.absolute()
    return None


def _tars(folder: Path) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(folder) if e.name.endswith(".tar") and e.is_file())
    except OSError:
        return []


def _info(root: Path) -> Optional[dict]:
    for name in INFO:
        path = root / name
        if not path.is_file():
            continue
        try:
            if name.endswith(".yaml"):
                import yaml
                info = yaml.safe_load(path.read_text())
            else:
                info = json.loads(path.read_text())
            if not isinstance(info, dict) or not isinstance(info.get("splits", {}), dict):
                raise ValueError("not a mapping with a 'splits' mapping")
            return info
        except ImportError:
            raise NFNetZooError(f"{path} needs pyyaml to read: pip install pyyaml, or write it as _info.json") from None
        except (ValueError, OSError) as e:
            raise NFNetZooError(f"cannot read {path} ({str(e).splitlines()[0][:100]}); fix it as timm's _info.json "
                                f"(splits: name -> filenames, num_samples), or remove it") from None
    return None


def _expand(pattern: str) -> list[str]:
    from webdataset.shardlists import expand_urls  # as timm's reader: braces, "::" lists, WDS_ variables
    return expand_urls(pattern)


def _splits_of_info(root: Path, info: dict) -> dict[str, dict]:
    found = {}
    for name, split in info.get("splits", {}).items():
        which = SPLIT_NAMES.get(str(name).lower())
        if which is None or which in found:
            continue
        if not isinstance(split, dict) or not isinstance(split.get("filenames"), list):
            raise NFNetZooError(f"{root}/_info.json: split {name} has no list of filenames; fix it as timm's")
        files = [f for pattern in split["filenames"] for f in _expand(str(pattern))]
        lengths = split.get("shard_lengths") or None
        if not isinstance(lengths, list) or len(lengths) != len(files):
            lengths = None  # brace patterns with per-pattern counts: only the total is usable
        n = split.get("num_samples")
        n = n if type(n) is int and n >= 0 else None  # absent or odd: counted from the shards instead
        found[which] = {"files": files, "lengths": lengths, "num_samples": n}
    return found


def _split_of(name: str) -> Optional[str]:
    tokens = re.split(r"[-_.]", name.lower())
    return next((SPLIT_NAMES[t] for t in tokens if t in SPLIT_NAMES), None)


def _splits_of_names(root: Path) -> dict[str, dict]:
    found: dict[str, list[str]] = {}
    for sub in sorted(SPLIT_NAMES):
        for name in _tars(root / sub):
            found.setdefault(SPLIT_NAMES[sub], []).append(f"{sub}/{name}")
    for name in _tars(root):
        found.setdefault(_split_of(name) or "train", []).append(name)
    return {s: {"files": sorted(f), "lengths": None, "num_samples": None} for s, f in found.items()}


def _keys(input_key: Optional[str], target_key: Optional[str]) -> tuple[Optional[str], str]:
    strip = lambda k: k.lower().lstrip(".") if k else k
    return strip(input_key), strip(target_key) or TARGET_KEY


def _members(shard: str, what: Callable[[str], bool]) -> Iterator[tuple[str, str, Optional[bytes]]]:
    """(key, suffix, data if `what(suffix)` else None) of each member, read through the tar headers only."""
    from webdataset.tariterators import base_plus_ext
    try:
        with tarfile.open(shard, "r:") as tar:  # seekable: members not read are skipped, not read
            for info in tar:
                if not info.isreg():
                    continue
                key, suffix = base_plus_ext(info.name)
                if key is None or key.startswith("__"):
                    continue
                suffix = suffix.lower()
                yield key, suffix, tar.extractfile(info).read() if what(suffix) else None
    except (tarfile.TarError, OSError, EOFError) as e:
        raise NFNetZooError(f"shard {_show(shard)} is not a readable tar file ({_why(e)}); replace or remove "
                            f"it") from None


def _why(e: BaseException) -> str:
    if isinstance(e, UnidentifiedImageError):  # its text names a BytesIO object
        return "not an image PIL can identify"
    return str(e).splitlines()[0][:80] if str(e) else type(e).__name__


def _label(raw: Optional[bytes], key: str, shard: str, target: str, num_classes: Optional[int]) -> int:
    if raw is None:
        raise NFNetZooError(f"sample {_show(key)} in {_show(shard)} has no .{target} label member; add one, or name "
                            f"the label member with --target-key")
    try:
        label = int(raw.decode("utf-8").strip())
    except (UnicodeDecodeError, ValueError):
        raise NFNetZooError(f"sample {_show(key)} in {_show(shard)}: its .{target} is not an integer class index "
                            f"({raw[:20]!r})") from None
    if label < 0 or num_classes is not None and label >= num_classes:
        raise NFNetZooError(f"sample {_show(key)} in {_show(shard)}: label {label} is out of range (0 to "
                            f"{(num_classes or 1) - 1}); fix the shard or its _info.json num_classes")
    return label


def held_out(key: str, fraction: float) -> bool:
    """Is sample `key` in the validation share of a stream split by --val-split: a hash of the key, no state."""
    return fraction > 0 and zlib.crc32(f"{SPLIT_SEED}:{key}".encode()) < fraction * 2 ** 32


def _scan(root: Path, files: list[str], target: str, fraction: float, labels: bool
          ) -> tuple[list[int], list[int], int]:
    """(train count per shard, held-out count per shard, largest label + 1): tar headers, and the label members."""
    train, val, top = [], [], -1
    for f in files:
        samples: dict[str, Optional[bytes]] = {}
        for key, suffix, data in _members(str(root / f), lambda s: labels and s == target):
            if data is not None or key not in samples:
                samples[key] = data if data is not None else samples.get(key)
        if not samples:
            raise NFNetZooError(f"shard {_show(str(root / f))} holds no samples (an empty tar); remove it")
        if labels:
            top = max(top, *(_label(raw, k, str(root / f), target, None) for k, raw in samples.items()))
        held = sum(held_out(k, fraction) for k in samples)
        train.append(len(samples) - held)
        val.append(held)
    return train, val, top + 1


def load_shard_data(data_dir: str | os.PathLike, val_split: float, input_key: Optional[str] = None,
                    target_key: Optional[str] = None, evaluating: bool = False, processes: int = 1,
                    workers: int = 0) -> ImageData:
    """The shards of each split of `data_dir` and their sample counts (see the module docstring); nothing decoded.
    `processes` and `workers` are recorded: the order of a training epoch is a function of them."""
    if importlib.util.find_spec("webdataset") is None:
        raise NFNetZooError(f"{_show(os.fspath(data_dir))} holds WebDataset shards; reading them needs the "
                            f"`webdataset` package: pip install 'nfnet-zoo[wds]' (or pip install webdataset)")
    root = shard_root(data_dir)
    if not 0.0 <= val_split < 1.0:
        raise NFNetZooError(f"--val-split must be in [0, 1), got {val_split}")
    info = _info(root)
    splits = _splits_of_info(root, info) if info else _splits_of_names(root)
    if "train" not in splits and not evaluating:
        raise NFNetZooError(f"{root} has no train shards (found: {', '.join(splits) or 'no .tar files'}); name them "
                            f"train-000000.tar ..., or put them in {root}/train/")
    for s in splits.values():
        missing = [f for f in s["files"] if not (root / f).is_file()]
        if missing:
            raise NFNetZooError(f"shard {_show(str(root / missing[0]))} is missing ({len(missing)} of the "
                                f"{len(s['files'])} shards {'_info.json names' if info else 'listed'}); restore it, "
                                f"or remove it from _info.json")
    val_name = "validation" if "validation" in splits else "test" if evaluating and "test" in splits else None
    if evaluating:  # the validation (or test) split, else all of train
        name = val_name or ("train" if "train" in splits else None)
        if name is None:
            raise NFNetZooError(f"{root} has no shards of a train, validation or test split; add .tar shards")
        used = {"val": splits[name]}
    else:
        used = {"train": splits["train"], **({"val": splits[val_name]} if val_name else {})}
    fraction = val_split if "val" not in used and not evaluating else 0.0
    inp, target = _keys(input_key, target_key)
    num_classes = (info or {}).get("num_classes")
    classes = (info or {}).get("classes") or (info or {}).get("label_names")
    if classes is not None and not isinstance(classes, list):
        raise NFNetZooError(f"{root}/_info.json: its classes are not a list of names; fix or remove them")
    if classes and num_classes is None:
        num_classes = len(classes)
    if num_classes is not None and not (type(num_classes) is int and num_classes >= 1):
        raise NFNetZooError(f"{root}/_info.json: num_classes {num_classes!r} is not a count of classes; fix it, or "
                            f"remove it (the classes are then read from the shards' labels)")
    for name, s in list(used.items()):
        if s["num_samples"] is not None and not fraction and num_classes is not None:
            continue  # _info.json says all we need: no pass over the shards
        counts, held, top = _scan(root, s["files"], target, fraction if name == "train" else 0.0,
                                  labels=num_classes is None)
        num_classes = num_classes if num_classes is not None else top
        s["lengths"], s["num_samples"] = counts, sum(counts)
        if name == "train" and fraction:
            used["val"] = {"files": s["files"], "lengths": held, "num_samples": sum(held)}
    if not classes:
        classes = [str(i) for i in range(int(num_classes or 0))]
    if len(classes) < 2 and not evaluating:
        raise NFNetZooError(f"{root} has {len(classes)} class(es) in its labels; a classifier needs at least 2")
    shards = {"splits": used, "held_out": fraction, "input_key": inp, "target_key": target,
              "readers": {"processes": processes, "workers": workers}}
    return ImageData(str(root), "wds", [str(c) for c in classes], [], [], shards=shards)


# --- reading --------------------------------------------------------------------------------------
class ShardStream(torch.utils.data.IterableDataset):
    """(image tensor, label) of a split's shards. Training (`batches` per process > 0): a fixed number of samples
    per process, shuffled per (seed, epoch, process, worker), the first `skip` batches read but not decoded (a
    resume). Evaluation (`batches` 0): each sample of the split exactly once across processes and workers."""

    def __init__(self, data: ImageData, split: str, transform: Callable, *, seed: int = 0, batch_size: int = 1,
                 batches: int = 0, rank: int = 0, world: int = 1, bad_images: str = "skip",
                 label_map: Optional[dict[int, int]] = None):
        s = data.shards
        self.root, self.files = data.root, s["splits"][split]["files"]
        self.held = s["held_out"]
        self.keep_held = split == "val" and s["held_out"] > 0
        self.input_key, self.target_key, self.num_classes = s["input_key"], s["target_key"], len(data.classes)
        self.transform, self.seed, self.batch_size, self.batches = transform, seed, batch_size, batches
        self.rank, self.world, self.bad_images, self.label_map = rank, world, bad_images, label_map
        self.epoch, self.skip = 0, 0  # set by the loop before each epoch (the workers copy them at iter())

    def __len__(self) -> int:
        if not self.batches:
            raise TypeError("a validation stream's share has no length known in advance")
        return self.batches * self.batch_size

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        if not self.batches:
            yield from self._decoded(self._raw(self.rank * workers + worker, self.world * workers, 0), False)
            return
        # An epoch's batch j is read by reader j % workers. The DataLoader takes the k-th batch it yields from worker
        # k % workers, so after `skip` consumed batches worker w plays reader (w + skip) % workers.
        role = (worker + self.skip) % workers
        mine = len(range(role, self.batches, workers)) * self.batch_size
        skip = len(range(role, self.skip, workers)) * self.batch_size
        stream = self._shuffled(self.rank * workers + role, self.world * workers)
        for _ in range(skip):
            next(stream)
        yield from _take(self._decoded(stream, True), mine - skip)

    def _shuffled(self, slot: int, slots: int) -> Iterator[dict]:
        """Endless: pass after pass over this reader's share, each in a shuffled order of (seed, epoch, pass, slot)."""
        n = 0
        while True:
            rng = random.Random(f"{self.seed}:{self.epoch}:{n}:{slot}")
            buffer, got = [], 0
            for sample in self._raw(slot, slots, n):
                got += 1
                buffer.append(sample)
                if len(buffer) >= SHUFFLE_BUFFER:
                    i = rng.randrange(len(buffer))
                    buffer[i], buffer[-1] = buffer[-1], buffer[i]
                    yield buffer.pop()
            rng.shuffle(buffer)
            yield from buffer
            if not got:
                raise NFNetZooError(f"no training samples for reader {slot} of {slots} in the shards of {self.root}")
            n += 1

    def _raw(self, slot: int, slots: int, n: int) -> Iterator[dict]:
        """This reader's undecoded samples: its shards (same shard order on every process), or every slots-th sample
        when there are fewer shards than readers."""
        from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener
        files = list(self.files)
        if self.batches:
            random.Random(f"{self.seed}:{self.epoch}:{n}").shuffle(files)
        by_shard = len(files) >= slots
        i = -1
        for f in files[slot::slots] if by_shard else files:
            path = os.path.join(self.root, f)
            try:  # webdataset's iterators, one shard at a time: a damaged one is named in one line
                for sample in group_by_keys(tar_file_expander(url_opener([{"url": path}]))):
                    i += 1
                    if held_out(sample["__key__"], self.held) != self.keep_held:
                        continue
                    if by_shard or i % slots == slot:
                        yield sample
            except (tarfile.TarError, OSError, EOFError, ValueError) as e:
                raise NFNetZooError(f"shard {_show(path)} is not a readable tar file ({_why(e)}); replace or "
                                    f"remove it") from None

    def _decoded(self, samples: Iterator[dict], train: bool) -> Iterator[tuple[torch.Tensor, int]]:
        bad = 0
        for sample in samples:
            key, shard = sample["__key__"], sample.get("__url__", self.root)
            label = _label(sample.get(self.target_key), key, shard, self.target_key, self.num_classes)
            image = self._image(sample)
            try:
                if image is None:
                    raise ValueError("no image member")
                with Image.open(io.BytesIO(image)) as img:
                    img.load()
                    img = to_rgb(img)
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
                if self.bad_images == "error":
                    raise NFNetZooError(f"cannot read image of sample {_show(key)} in {_show(shard)} ({_why(e)}); "
                                        f"remove it, or pass --bad-images skip to leave it out") from None
                bad += 1
                warnings.warn(f"skipped unreadable image of sample {_show(key)} in {_show(shard)} ({_why(e)}; {bad} "
                              f"in this reader so far)")
                continue
            if self.label_map is not None:
                label = self.label_map[label]
            if train:
                s = sample_seed(self.seed, self.epoch, zlib.crc32(key.encode()))
                yield seeded_transform(self.transform, img, s), label
            else:
                yield self.transform(img), label

    def _image(self, sample: dict) -> Optional[bytes]:
        if self.input_key:
            return sample.get(self.input_key)
        return next((v for k, v in sample.items() if "." + k in IMAGE_EXTENSIONS), None)


def _take(items: Iterator, n: int) -> Iterator:
    for _ in range(n):
        yield next(items)


class OnDevice:
    """A stream's DataLoader with its batches moved to `device` (Accelerate's prepare would dispatch an iterable
    dataset from the main process; each process here reads its own shards)."""

    streamed = True

    def __init__(self, loader: torch.utils.data.DataLoader, device: torch.device):
        self.loader, self.device = loader, device
        self.dataset = loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for x, y in self.loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def check_shards(data: ImageData) -> None:
    """The shards a run's data.json lists still exist (a resume names a missing one in one line)."""
    for s in data.shards["splits"].values():
        for f in s["files"]:
            if not os.path.isfile(os.path.join(data.root, f)):
                raise NFNetZooError(f"shard {_show(os.path.join(data.root, f))} listed in the run's data.json is "
                                    f"missing; restore it to resume")


__all__ = ["shard_root", "load_shard_data", "held_out", "ShardStream", "OnDevice", "check_shards"]
