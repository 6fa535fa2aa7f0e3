"""Where a run is (`Progress`, saved with the state so that a resume continues mid-epoch) and how it is asked
to stop (`StopRequest`: Ctrl-C or SIGTERM, honoured at the next step boundary after a save)."""
from __future__ import annotations

import contextlib
import signal
import time
from typing import Optional

import torch


class Progress:
    """Where the run is, and this epoch's running totals; saved as RUN/state/progress.json (runstate.py).

    The sums stay on the device and become numbers only in `state_dict` (at a save, at the epoch's end):
    an `.item()` a step would make every step wait for the device."""

    FIELDS = ("epoch", "step", "global_step", "loss_sum", "loss_count", "clip_sum", "clip_count", "images",
              "epoch_time", "train_time", "history", "best")

    def __init__(self, device: torch.device):
        self.device = device
        self.epoch = 0            # current epoch (0-based)
        self.step = 0             # batches of this epoch already trained
        self.global_step = 0      # optimizer updates so far
        self.loss_sum = self._sum(0.0)  # this epoch so far (this process)
        self.loss_count = 0
        self.clip_sum = self._sum(0.0)
        self.clip_count = 0
        self.images = 0           # this epoch, all processes
        self.epoch_time = 0.0     # seconds of this epoch before the clock last started
        self.train_time = 0.0
        self.history: list[dict] = []
        self.best: Optional[dict] = None
        self._clock: Optional[float] = None  # perf_counter() when this stretch of training started

    def _sum(self, value: float) -> torch.Tensor:
        return torch.tensor(value, dtype=torch.float64, device=self.device)

    def start_clock(self) -> None:
        self._clock = time.perf_counter()

    def stop_clock(self) -> None:
        self.epoch_time = self.elapsed()
        self._clock = None

    def elapsed(self) -> float:
        """Training seconds of this epoch so far (across resumes)."""
        return self.epoch_time + (time.perf_counter() - self._clock if self._clock is not None else 0.0)

    def add_step(self, loss: torch.Tensor, images: int) -> None:
        self.loss_sum += loss.double()
        self.loss_count += 1
        self.images += images
        self.step += 1

    def add_clip(self, clipped_fraction: torch.Tensor) -> None:
        self.clip_sum += clipped_fraction
        self.clip_count += 1

    def next_epoch(self) -> None:
        self.train_time += self.epoch_time
        self.epoch += 1
        self.step = self.loss_count = self.clip_count = self.images = 0
        self.loss_sum, self.clip_sum, self.epoch_time = self._sum(0.0), self._sum(0.0), 0.0

    def early_stop(self, patience: int) -> Optional[str]:
        """Why the run stops here under --patience (val top-1 not better than the best for `patience` epochs), or
        None. A function of the history alone: a resumed run decides as the run it continues did."""
        if not patience or self.best is None or self.best.get("top1") is None:
            return None
        waited = self.epoch - self.best["epoch"]  # epochs trained since the best
        if waited < patience:
            return None
        return (f"patience {patience}: val top-1 has not improved on epoch {self.best['epoch']}'s "
                f"{self.best['top1']:.2f}% in the {waited} epoch(s) since")

    def state_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.FIELDS}
        d.update(loss_sum=self.loss_sum.item(), clip_sum=self.clip_sum.item(), epoch_time=self.elapsed())
        return d

    def load_state_dict(self, d: dict) -> None:
        for k in self.FIELDS:
            setattr(self, k, d[k])
        self.loss_sum, self.clip_sum = self._sum(d["loss_sum"]), self._sum(d["clip_sum"])


class StopRequest:
    """Ctrl-C / SIGTERM set a flag; the loop saves state at the next step boundary and stops.
    A second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: leave the defaults
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


__all__ = ["Progress", "StopRequest"]
