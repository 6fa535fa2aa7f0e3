"""Reading images while training and predicting: the training set with per-sample seeded augmentation, the epoch
sampler, the workers' signals, and the stream of image files `predict` scores."""
from __future__ import annotations

import contextlib
import os
import random
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import NFNetZooError
from .sources import FORMATS, IMAGE_EXTENSIONS, data_files
from .samples import _Opener, _load_hf, _show, to_rgb
from .folders import _walk_images
from .hf import _is_hf_dataset, _pick
from .hfds import is_hub_id, open_hub_id


@dataclass(frozen=True)
class Row:
    """A dataset row `predict` scores: its dataset (an index into `Inputs.openers`), its key (split/row, what the
    opener reads) and the name its result carries (INPUT/split/row)."""

    source: int
    key: str
    name: str


class Inputs:
    """What predict's INPUTs name, in order, read lazily: image paths (str) and dataset rows (`Row`), with the
    openers of the datasets among them (`ImageFiles` reads a Row's image through its opener)."""

    def __init__(self, parts: list, openers: list, stdin: Optional[Iterable[str]]):
        self.parts, self.openers, self.stdin = parts, openers, stdin

    def __iter__(self) -> Iterator:
        for part in self.parts:
            if part is not None:
                yield from part
                continue
            for line in self.stdin:
                line = line.rstrip("\r\n")
                if line.strip():
                    yield line


def _dataset_rows(given: str, source: int, splits: Optional[Sequence[str]], input_key: Optional[str]):
    """(opener, rows) of a dataset INPUT: hfds/NAME..., a save_to_disk folder, or parquet/arrow files (a file, or a
    folder in the Hub's layout); None when `given` is none of these. Rows are listed lazily, split by split (all
    splits in the dataset's order, or `splits`); the splits are memory-mapped, each image decoded when scored."""
    if is_hub_id(given):
        root, config, commit, loaded = open_hub_id(given)
        opener = _Opener(root, "hf", config=config, revision=commit)
    else:
        path = Path(given)
        if path.is_dir() and _is_hf_dataset(path):
            found = (None, None)
        elif path.is_dir() or path.is_file() and path.suffix.lower() in FORMATS:
            found = data_files(path)
        else:
            return None
        if found is None:
            return None
        opener = _Opener(given, "hf", builder=found[0], data_files=found[1])
        loaded = _load_hf(given, *found)
    names = list(loaded) if isinstance(loaded, dict) else [""]  # a DatasetDict's splits, or one Dataset
    chosen = list(splits) if splits else names
    unknown = [s for s in chosen if s not in names]
    if unknown:
        raise NFNetZooError(f"{_show(given)} has no split {unknown[0]!r}; its splits are {', '.join(names)}: pass "
                            f"--split {names[0]}" if names != [""] else f"{_show(given)} is one dataset without "
                            f"splits; leave --split out")
    first = loaded[chosen[0]] if chosen != [""] else loaded
    from datasets import Image as HFImage
    images = [n for n, f in first.features.items() if isinstance(f, HFImage)]
    opener.image_column = _pick("Image", "--input-key", input_key, images, list(first.features), _show(given))
    if opener.image_column not in images:
        raise NFNetZooError(f"{_show(given)}: --input-key {input_key} is not an Image column; pass one of "
                            f"{', '.join(images) or 'none (cast the image column with datasets.Image())'}")
    opener._splits = loaded  # the main process reads the splits it has loaded; workers load their own
    if not sum(len(loaded[s] if s else loaded) for s in chosen):
        raise NFNetZooError(f"{_show(given)} has no rows in {', '.join(chosen) if chosen != [''] else 'it'}; pass a "
                            f"dataset with images")

    def rows() -> Iterator[Row]:
        for s in chosen:
            for i in range(len(loaded[s] if s else loaded)):
                yield Row(source, f"{s}/{i}", f"{given}/{s}/{i}" if s else f"{given}/{i}")
    return opener, rows()


def image_paths(inputs: Sequence[str | os.PathLike], stdin: Optional[Iterable[str]] = None,
                splits: Optional[Sequence[str]] = None, input_key: Optional[str] = None) -> Inputs:
    """The images that INPUTS name, in order: a file as given; a folder's images, recursively in name order
    (links followed, each real folder entered once and each real file listed once, as for training data); a dataset
    (hfds/NAME[:CONFIG][@REVISION], a save_to_disk folder, parquet/arrow files) its rows, of every split or of
    `splits`, as `Row`s; "-" the lines of `stdin`, read lazily (blank lines skipped). Files, folders and datasets are
    checked now, before anything is returned: a missing path, a folder without images, a dataset without an Image
    column is a one-line error. Paths from stdin are not: a missing or unreadable one is that image's error."""
    inputs = [os.fspath(i) for i in inputs]
    if inputs.count("-") > 1:
        raise NFNetZooError('"-" (paths on stdin) is given more than once; give it once')
    parts, seen, openers = [], set(), []
    for given in inputs:
        if given == "-":
            if stdin is None:
                raise NFNetZooError('"-" reads image paths from stdin, and there is no stdin here; pass files or folders')
            parts.append(None)
            continue
        dataset = _dataset_rows(given, len(openers), splits, input_key) if is_hub_id(given) or os.path.exists(given) \
            else None
        if dataset is not None:
            openers.append(dataset[0])
            parts.append(dataset[1])
        elif os.path.isdir(given):
            files, _ = _walk_images(given, given, os.path.realpath(given))
            found = []
            for f in files:  # a file reached twice (a link, two folders given) is scored once
                if f.identity not in seen:
                    seen.add(f.identity)
                    found.append(os.path.join(given, f.place))
            if not found:
                raise NFNetZooError(f"{_show(given)} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)} "
                                    f"in it and its subfolders, and for a dataset: parquet or arrow files, a "
                                    f"save_to_disk folder)")
            parts.append(found)
        elif os.path.lexists(given):
            parts.append([given])
        else:
            raise NFNetZooError(f"image {_show(given)} does not exist")
    if splits and not openers:
        raise NFNetZooError("--split chooses the splits of a dataset INPUT, and no INPUT is a dataset; leave it out")
    return Inputs(parts, openers, stdin)


class ImageFiles(torch.utils.data.Dataset):
    """Item PATH: (path, image tensor, None), or (path, None, the error) when the file cannot be read as an image,
    so one bad file does not stop the others. Its indices are the paths themselves, which a DataLoader takes from
    any iterable sampler, so a stream of paths is read as the batches need it."""

    def __init__(self, transform: Callable, openers: Sequence = ()):
        self.transform, self.openers = transform, list(openers)

    def _open(self, item) -> tuple[str, Image.Image]:
        if isinstance(item, Row):
            return item.name, self.openers[item.source].raw(item.key)
        return item, Image.open(item)

    def __getitem__(self, item: str | Row) -> tuple[str, Optional[torch.Tensor], Optional[str]]:
        path = item.name if isinstance(item, Row) else item
        try:
            path, img = self._open(item)
            with img:
                img.load()
                return path, self.transform(to_rgb(img)), None
        except FileNotFoundError:
            return path, None, "does not exist"
        except IsADirectoryError:
            return path, None, "is a folder, not an image file"
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            return path, None, f"cannot read image ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})"


def collate_image_files(items: list) -> tuple[list[str], Optional[torch.Tensor], list[Optional[str]]]:
    """A batch of `ImageFiles` items: the paths, the readable images stacked (None if none is), the errors."""
    paths, tensors, errors = zip(*items)
    good = [t for t in tensors if t is not None]
    return list(paths), torch.stack(good) if good else None, list(errors)


def sample_seed(seed: int, epoch: int, index: int, draw: int = 0) -> int:
    """The seed of one sample's augmentation: a function of (seed, epoch, index) only, so the
    augmentation does not depend on workers, processes, or where a resumed run restarted. `draw`: the how-many-th
    time `BalancedSampler` drew the sample in this epoch (0 the first), so that a repeat gets its own crop."""
    return zlib.crc32(f"{seed}:{epoch}:{index}{f':{draw}' if draw else ''}".encode())


class ImageDataset(torch.utils.data.Dataset):
    """(image tensor, label) pairs; an item is an index, or (index, epoch) from `EpochSampler` (or (index, epoch,
    draw) from `BalancedSampler`)."""

    def __init__(self, samples: list[tuple[str, int]], opener: Callable[[str], Image.Image],
                 transform: Callable, seed: int = 0):
        self.samples, self.opener, self.transform, self.seed = samples, opener, transform, seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item):
        index, epoch, *draw = item if isinstance(item, tuple) else (item, None)
        key, label = self.samples[index]
        img = self.opener(key)
        if epoch is None:
            return self.transform(img), label
        return seeded_transform(self.transform, img, sample_seed(self.seed, epoch, index, *draw)), label


def seeded_transform(transform: Callable, img: Image.Image, seed: int) -> torch.Tensor:
    """`transform(img)` with the global RNGs seeded by `seed`."""
    # timm's transforms draw from the global RNGs: seed them per sample. In a worker they serve
    # only this dataset; in the main process (workers=0) they are restored afterwards so that the
    # training RNG stream (dropout, stochastic depth, mixup) is untouched.
    if torch.utils.data.get_worker_info() is not None:
        return _seeded(transform, img, seed)
    states = random.getstate(), np.random.get_state(), torch.default_generator.get_state()
    try:
        return _seeded(transform, img, seed)
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.default_generator.set_state(states[2])


def _seeded(transform: Callable, img: Image.Image, seed: int) -> torch.Tensor:
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)  # torch.manual_seed also seeds every device: 70x slower
    return transform(img)


class EpochSampler(torch.utils.data.Sampler):
    """A shuffle that depends only on (seed, epoch): yields (index, epoch) pairs.

    Every process draws the same permutation (Accelerate then shards its batches), and a resumed
    run recomputes it exactly. Set `epoch` before iterating.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        for i in torch.randperm(self.n, generator=g).tolist():
            yield i, self.epoch


class BalancedSampler(EpochSampler):
    """`--class-balance sampler`: N draws per epoch, with replacement, each sample with probability proportional to
    1 / (its class's count), so every class is drawn N / K times in expectation. A function of (seed, epoch) as
    EpochSampler's shuffle (every process draws the same list and Accelerate gives each its share of the batches;
    a resumed run draws it again); yields (index, epoch, draw), `draw` counting the sample's repeats in the epoch,
    which seeds a repeat's augmentation apart from the first (sample_seed). torch.utils.data's
    WeightedRandomSampler draws from the global RNG, which a resume does not restore at the right point."""

    def __init__(self, labels: Sequence[int], seed: int):
        super().__init__(len(labels), seed)
        labels = torch.as_tensor(list(labels), dtype=torch.long)
        self.cumulative = (1.0 / torch.bincount(labels).double()[labels]).cumsum(0)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        # inverse-CDF draws (torch.multinomial refuses more than 2**24 samples)
        u = torch.rand(self.n, generator=g, dtype=torch.float64) * self.cumulative[-1]
        seen: dict[int, int] = {}
        for i in torch.searchsorted(self.cumulative, u, right=True).clamp_(max=self.n - 1).tolist():
            seen[i] = seen.get(i, -1) + 1
            yield i, self.epoch, seen[i]


class WorkerSignals:
    """DataLoader worker_init_fn. Ctrl-C is for the main process: the workers ignore SIGINT. So is SIGTERM while the
    main process is inside `held()` (its training loop, which saves the state and stops the workers): schedulers
    (scancel, a kill of the process group) signal the workers too, and a worker dying there ended the run with a
    "worker killed" error before anything was saved. Outside it a worker ends on SIGTERM, quietly (status 0):
    multiprocessing terminates daemonic workers so when the main process exits (and would wait forever for one that
    ignored it), and a worker killed by the signal would add torch's "worker is killed by signal" traceback."""

    def __init__(self):
        import multiprocessing
        self._held = multiprocessing.RawValue("b", 0)  # shared memory: the workers read what the main process sets

    def __call__(self, worker_id: int) -> None:
        import signal
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        if not self._held.value:
            os._exit(0)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self._held.value = 1
        try:
            yield
        finally:
            self._held.value = 0
