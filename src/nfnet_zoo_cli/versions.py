"""The oldest release of each dependency nfnet-zoo runs with, and the one-line refusal of an older one.

These are pyproject.toml's lower bounds; constraints-floor.txt installs exactly them and CI runs the
version-touching tests there (`make test-floors`) as well as at the pins (`make test`).
tests/test_versions.py holds the three to one another. Read from the installed metadata: nothing is imported,
so the command line checks before `import nfnet_zoo` (which imports torch and timm) can fail on an old release.
"""
from __future__ import annotations

import re
from importlib import metadata
from typing import Optional

# distribution -> oldest release, and why not older (where the reason is ours, not a dependency's)
FLOORS = {
    "torch": "2.6",              # FSDP2 (fully_shard) as a public API
    "torchvision": "0.21",       # torch 2.6's
    "timm": "1.0.16",            # the local-dir: loader that reads run folders
    "huggingface_hub": "1.31",   # as transformers and datasets
    "safetensors": "0.4.3",      # accelerate 1.0's own floor
    "accelerate": "1.0",         # FSDP2 needs FSDP2_ACCELERATE
    "numpy": "1.24",
    "pillow": "9.4",             # datasets' Image feature (PIL.Image.ExifTags)
    "tqdm": "4.66.3",            # datasets' own floor (the `datasets` extra)
}
FSDP2_ACCELERATE = "1.6"         # FullyShardedDataParallelPlugin(fsdp_version=2)


def _release(version: str) -> tuple[int, ...]:
    """(2, 14, 1) for '2.14.1+cpu', '2.14.1rc1' or '2.14.1.dev0': the release numbers a floor compares."""
    match = re.match(r"\d+(\.\d+)*", version)
    return tuple(int(n) for n in match.group().split(".")) if match else ()


def too_old(distribution: str, needed: str) -> Optional[str]:
    """One line naming the package, the version found and the one needed; None when it is recent enough."""
    try:
        found = metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return f"{distribution} is not installed, nfnet-zoo needs >= {needed}: pip install '{distribution}>={needed}'"
    if _release(found) >= _release(needed):
        return None
    return f"{distribution} {found} found, nfnet-zoo needs >= {needed}: pip install -U '{distribution}>={needed}'"


def check_versions() -> Optional[str]:
    """One line naming every dependency older than its floor; None when all are recent enough."""
    problems = [p for name, floor in FLOORS.items() if (p := too_old(name, floor))]
    return "; ".join(problems) or None


__all__ = ["FLOORS", "FSDP2_ACCELERATE", "too_old", "check_versions"]
