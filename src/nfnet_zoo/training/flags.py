"""The valid range of every numeric flag of every command, checked in one place before anything is written.

Out-of-range values used to reach torch and end in tracebacks (--momentum -1), or were silently replaced
(--img-size 0 trained at the variant's size). `FINETUNE` covers FinetuneConfig (flags, the Python API and a
resumed run's args.json alike); `OTHER` gives the argparse types of the other commands' numeric flags.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..errors import NFNetZooError


@dataclass(frozen=True)
class Range:
    """A finite number of `kind` in [lo, hi] (an end in `open` is excluded); None is allowed if `optional`."""

    kind: type
    lo: float
    hi: float
    open: str = ""            # "lo", "hi" or "lo hi"
    optional: bool = False

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a number"
        return f"{what} in {'(' if 'lo' in self.open else '['}{self.lo:g}, {self.hi:g}{')' if 'hi' in self.open else ']'}"

    def problem(self, value: Any) -> Optional[str]:
        if value is None and self.optional:
            return None
        ok_type = isinstance(value, int) if self.kind is int else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type or not math.isfinite(value):
            return f"must be {self.describe()}, got {value!r}"
        if value < self.lo or value > self.hi or ("lo" in self.open and value == self.lo) or (
                "hi" in self.open and value == self.hi):
            return f"must be {self.describe()}, got {value!r}"
        return None


_SIZE = Range(int, 8, 8192, optional=True)
_FRACTION = Range(float, 0, 1, open="hi")
_RATE = Range(float, 0, 1, open="hi", optional=True)
# --check-images: decode every image, read headers and end markers only, or check nothing (image_check.py)
CHECK_LEVELS = ("full", "header", "none")
_MILESTONE = Range(int, 1, 100_000)

FINETUNE: dict[str, Range] = {
    "epochs": Range(int, 1, 100_000),
    "batch_size": Range(int, 1, 65_536),
    "grad_accum_steps": Range(int, 1, 65_536),
    "lr": Range(float, 0, 100, open="lo", optional=True),
    "lr_base": Range(float, 0, 100, open="lo"),
    "momentum": _FRACTION,
    "weight_decay": Range(float, 0, 1),
    "warmup_epochs": Range(float, 0, 100_000),
    "warmup_lr": Range(float, 0, 100),
    "min_lr": Range(float, 0, 100),
    "smoothing": _FRACTION,
    "mixup": Range(float, 0, 1000),
    "cutmix": Range(float, 0, 1000),
    "drop": _RATE,
    "drop_path": _RATE,
    "model_ema_decay": Range(float, 0, 1),
    "clipping": Range(float, 0, 1000),          # AGC lambda; 0 turns AGC off
    "img_size": _SIZE,
    "test_img_size": _SIZE,
    "hflip": Range(float, 0, 1),
    "seed": Range(int, 0, 2 ** 32 - 1),         # numpy's seeds are 32-bit
    "workers": Range(int, 0, 1024),
    "val_split": _FRACTION,
    "save_every": Range(int, 0, 10 ** 12),      # 0: at epoch ends only
    "log_interval": Range(int, 1, 10 ** 12),
    "decay_epochs": Range(float, 0, 100_000, open="lo"),  # --sched step
    "decay_rate": Range(float, 0, 1000, open="lo"),      # step/multistep factor, poly power
}
_SCALE = Range(float, 0, 1, open="lo")          # --scale MIN MAX, 0 < MIN <= MAX <= 1

OTHER: dict[str, Range] = {
    "alpha": Range(float, 0, 10, open="lo"),    # convert/publish: the residual scaling alpha
    "batch_size": Range(int, 1, 65_536),
    "workers": Range(int, 0, 1024),
    "topk": Range(int, 1, 1_000_000),
}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_finetune(values: dict[str, Any], where: Callable[[str], str] = flag) -> None:
    """Raise NFNetZooError on the first numeric value outside its range; `where(name)` words the source."""
    for name, value in values.items():
        if name in FINETUNE:
            problem = FINETUNE[name].problem(value)
            if problem:
                raise NFNetZooError(f"{where(name)} {problem}")
        elif name == "decay_milestones":
            items = value if isinstance(value, (list, tuple)) and value else [value]
            problem = next((p for p in map(_MILESTONE.problem, items) if p), None)
            if problem:
                raise NFNetZooError(f"{where(name)} takes epochs; each {problem}")
        elif name == "scale":
            pair = tuple(value) if isinstance(value, (tuple, list)) else ()
            problems = [_SCALE.problem(v) for v in pair] if len(pair) == 2 else ["two values"]
            if any(problems) or pair[0] > pair[1]:
                raise NFNetZooError(f"{where(name)} must be MIN MAX with 0 < MIN <= MAX <= 1, got "
                                    f"{' '.join(map(repr, pair)) or repr(value)}")


def argtype(name: str) -> Callable[[str], Any]:
    """An argparse type for the numeric flag `name` of a command other than finetune."""
    r = OTHER[name]

    def parse(text: str) -> Any:
        try:
            value = r.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {r.describe()}, got {text!r}") from None
        problem = r.problem(value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value
    return parse


__all__ = ["Range", "FINETUNE", "OTHER", "CHECK_LEVELS", "check_finetune", "argtype", "flag"]
