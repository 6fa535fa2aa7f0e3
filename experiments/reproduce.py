"""Reproduce the paper's batch-size ablation of Adaptive Gradient Clipping at toy scale, on the CPU.

The paper (Brock et al. 2021, section 4.1 and its figure 2) makes two claims:
  1. without normalization, a network trained at large batch sizes and learning rates becomes unstable;
     AGC keeps it stable, up to the accuracy of a batch-normalised ResNet;
  2. the best clipping threshold shrinks as the batch grows.

This script trains every arm of both panels (ablation.py) on jittered digits (jittered_digits.py), two
or more seeds each, then writes REPRODUCTION.md (tables, machine, verdicts) and two PNG figures into
--out/reproduction/. Finished arms are kept in --out/reproduction/results.jsonl, so an interrupted run
picks up where it stopped.

    make reproduce                                   # the full grid, about 18 minutes on 2 cores
    python experiments/reproduce.py --quick --out /tmp/r   # seconds: checks the script works (CI)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation import Arm, Setup  # noqa: E402


@dataclass(frozen=True)
class Grid:
    setup: Setup
    batches: tuple[int, ...]
    clippings: tuple[float, ...]  # AGC's thresholds, each tried at every batch size
    seeds: tuple[int, ...]

    def arms(self) -> list[Arm]:
        """At every batch size and seed: the NF network without AGC, with each threshold, and the BN-ResNet."""
        arms = [Arm(net, b, c, s) for b in self.batches for s in self.seeds
                for net, c in (("nf", None), *(("nf", c) for c in self.clippings), ("bn", None))]
        return sorted(arms, key=lambda a: (a.batch, a.network, a.clipping or 0, a.seed))  # small batches first: slowest


FULL = Grid(Setup(base_lr=0.4, epochs=12, train_images=10_000, val_images=2_000), batches=(64, 128, 256, 512, 1024),
            clippings=(0.005, 0.01, 0.02, 0.04, 0.08), seeds=(0, 1))
QUICK = Grid(Setup(base_lr=0.4, epochs=1, train_images=512, val_images=200), batches=(32, 128),
             clippings=(0.01, 0.04), seeds=(0, 1))

_data = None
TITLE = "# Reproducing the paper's batch-size ablation of AGC"  # report.py's first line: ours to replace


def _start_worker(setup: Setup, threads: int) -> None:
    import torch
    import jittered_digits
    global _data
    torch.set_num_threads(threads)
    _data = (*jittered_digits.make("train", setup.train_images, setup.data_seed),
             *jittered_digits.make("val", setup.val_images, setup.data_seed))


def _train(arm: Arm, setup: Setup) -> dict:
    from ablation import train
    return train(arm, setup, _data)


def _load(path: Path, setup: Setup) -> dict[str, dict]:
    """Finished arms of this setup from an earlier (perhaps interrupted) run; anything else is ignored."""
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
                if r.pop("setup") == asdict(setup):
                    done[Arm(r["network"], r["batch"], r["clipping"], r["seed"]).key] = r
            except (ValueError, KeyError, TypeError, AttributeError):
                continue  # a line torn by a kill, or foreign: that arm is trained again
    return done


def run_grid(grid: Grid, results: Path, workers: int) -> list[dict]:
    done = _load(results, grid.setup)
    todo = [a for a in grid.arms() if a.key not in done]
    print(f"{len(grid.arms())} arms, {len(done)} already in {results}, training {len(todo)} "
          f"on {workers} process(es)", flush=True)
    if not todo:
        return [done[a.key] for a in grid.arms()]
    threads = max(1, len(os.sched_getaffinity(0)) // workers)
    torn = results.exists() and results.stat().st_size and not results.read_bytes().endswith(b"\n")
    with results.open("a") as log:
        if torn:
            log.write("\n")  # a kill's half line stays a line of its own, apart from the next record
        for n, (arm, r) in enumerate(_trained(todo, grid.setup, workers, threads), 1):
            r["workers"] = workers
            done[arm.key] = r
            log.write(json.dumps({**r, "setup": asdict(grid.setup)}) + "\n")
            log.flush()
            os.fsync(log.fileno())  # a finished arm survives a kill
            state = f"diverged at epoch {r['diverged_at']:.1f}" if r["diverged_at"] else f"top-1 {r['final_top1']:.1f}%"
            print(f"[{n}/{len(todo)}] {arm.key}: {state} ({r['seconds']:.0f} s)", flush=True)
    return [done[a.key] for a in grid.arms()]


def _trained(arms: list[Arm], setup: Setup, workers: int, threads: int) -> Iterator[tuple[Arm, dict]]:
    """(arm, record) as each finishes; one worker trains in this process (no start-up of a pool)."""
    if workers == 1:
        _start_worker(setup, threads)
        yield from ((a, _train(a, setup)) for a in arms)
        return
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_start_worker,
                             initargs=(setup, threads)) as pool:
        jobs = {pool.submit(_train, a, setup): a for a in arms}
        yield from ((jobs[job], job.result()) for job in as_completed(jobs))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny grid (seconds): checks that the script works")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for REPRODUCTION.md and reproduction/ (default: the repository root; "
                        "with --quick: ./reproduce-quick)")
    p.add_argument("--workers", type=int, default=2,
                   help="training processes of one thread each, at most one a core (default 2)")
    args = p.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    if not 1 <= args.workers <= cores:
        p.error(f"--workers must be from 1 to this machine's {cores} cores, got {args.workers}")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        p.error("the figures need matplotlib: pip install 'nfnet-zoo[plots]'")
    out = args.out or (Path("reproduce-quick") if args.quick else Path(__file__).resolve().parent.parent)
    report = out / "REPRODUCTION.md"
    if report.exists() and not (report.is_file() and report.read_text(errors="replace").startswith(TITLE)):
        p.error(f"{report} is not a report this script wrote; give another --out, or move that file away")
    folder = out / "reproduction"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        records = run_grid(QUICK if args.quick else FULL, folder / "results.jsonl", args.workers)
        from report import write_report
        write_report(records, QUICK if args.quick else FULL, out, quick=args.quick)
    except OSError as e:  # a full or read-only disk, --out naming a file: one line, the finished arms kept
        print(f"reproduce.py: error: {e.strerror or e} ({e.filename or out}); finished trainings are kept in "
              f"{folder / 'results.jsonl'} when it could be written", file=sys.stderr)
        return 1
    print(f"wrote {report} and the figures in {folder}/")
    return 0

if __name__ == "__main__":
    sys.exit(main())
