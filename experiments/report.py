"""REPRODUCTION.md and its two figures from the ablation's records (reproduce.py).

Each point is the mean final top-1 over seeds; the bars span the lowest to the highest seed, and every
seed is also drawn. A diverged run (its loss stopped being finite) scores 0 and is drawn as a cross.
The verdicts are computed from the same numbers, with the rule stated beside each.
"""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

CHANCE = 10.0
QUICK_BANNER = "**This is a `--quick` run: a grid too small to be evidence; it only shows that the script works.**\n\n"
ARMS = (("nf", None, "NF, no AGC", "tab:red", "o", "-"),
        ("nf", "agc", "NF + AGC (best threshold, beside each point)", "tab:blue", "s", "-"),
        ("bn", None, "BN-ResNet (timm)", "tab:gray", "^", "--"))


def _select(records, network, clipping, batch):
    return [r for r in records if r["network"] == network and r["clipping"] == clipping and r["batch"] == batch]


def _stats(runs) -> tuple[float, float, float, int]:
    tops = [r["final_top1"] for r in runs]
    return statistics.mean(tops), min(tops), max(tops), sum(r["diverged_at"] is not None for r in runs)


def _draw(ax, x, runs_per_x, label, color, marker, style) -> None:
    means, lows, highs, _ = zip(*map(_stats, runs_per_x))
    spread = [[m - lo for m, lo in zip(means, lows)], [hi - m for m, hi in zip(means, highs)]]
    ax.errorbar(x, means, yerr=spread, label=label, color=color, marker=marker, linestyle=style,
                capsize=4, linewidth=2, markersize=7)
    for xi, runs in zip(x, runs_per_x):
        for r in runs:
            diverged = r["diverged_at"] is not None
            ax.scatter([xi], [r["final_top1"]], color=color, marker="x" if diverged else ".",
                       s=70 if diverged else 25, alpha=0.9 if diverged else 0.45, zorder=3)


def _figure():
    from matplotlib.figure import Figure
    fig = Figure(figsize=(7.5, 5), dpi=120, layout="constrained")
    return fig, fig.add_subplot()


def _diverged(runs_per_x) -> bool:
    return any(r["diverged_at"] is not None for runs in runs_per_x for r in runs)


def _finish(ax, title: str, diverged: bool) -> None:
    from matplotlib.lines import Line2D
    ax.axhline(CHANCE, color="black", linewidth=0.8, linestyle=":")
    ax.set_ylim(-3, 100)
    ax.set_ylabel("validation top-1 (%) after the last epoch")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if diverged:  # the cross is explained only where one is drawn
        handles.append(Line2D([], [], color="black", marker="x", linestyle="", markersize=8))
        labels.append("a seed that diverged (scored 0)")
    handles.append(Line2D([], [], color="black", linestyle=":"))
    labels.append(f"chance ({CHANCE:.0f}%)")
    ax.legend(handles, labels, fontsize=8, loc="best")


def best_clipping(records, grid, batch: int) -> float:
    """The threshold with the best mean top-1 at BATCH (picked on the validation set, as a sweep does)."""
    return max(grid.clippings, key=lambda c: _stats(_select(records, "nf", c, batch))[0])


def _series(records, grid, arm) -> list[list[dict]]:
    net, agc = arm[0], arm[1]
    return [_select(records, net, best_clipping(records, grid, b) if agc else None, b) for b in grid.batches]


def figure_batch(records, grid, path: Path):
    fig, ax = _figure()
    diverged = False
    for arm in ARMS:
        runs = _series(records, grid, arm)
        diverged |= _diverged(runs)
        _draw(ax, grid.batches, runs, arm[2], *arm[3:])
        if arm[1]:  # name the threshold each point used
            for b, r in zip(grid.batches, runs):
                ax.annotate(f"{r[0]['clipping']:g}", (b, _stats(r)[0]), textcoords="offset points", xytext=(6, -12),
                            fontsize=8, color=arm[3])
    ax.set_xscale("log", base=2)
    ax.set_xticks(grid.batches, [str(b) for b in grid.batches])
    ax.set_xlabel(f"batch size (learning rate {grid.setup.base_lr} x batch / 256, {grid.setup.epochs} epoch(s) each)")
    _finish(ax, f"Accuracy against batch size (mean of {len(grid.seeds)} seeds, bars: lowest to highest)", diverged)
    fig.savefig(path)
    return fig


def figure_clipping(records, grid, path: Path):
    from matplotlib import colormaps
    fig, ax = _figure()
    colors = colormaps["viridis"]
    diverged = False
    for i, b in enumerate(grid.batches):
        runs = [_select(records, "nf", c, b) for c in grid.clippings]
        diverged |= _diverged(runs)
        means = [_stats(r)[0] for r in runs]
        color = colors(i / max(len(grid.batches) - 1, 1) * 0.85)
        _draw(ax, grid.clippings, runs, f"batch {b}", color, "os^Dv"[i % 5], "-")
        best = max(range(len(means)), key=means.__getitem__)
        ax.scatter([grid.clippings[best]], [means[best]], marker="*", s=300, color=color, edgecolor="black", zorder=4)
    ax.set_xscale("log", base=2)
    ax.set_xticks(grid.clippings, [f"{c:g}" for c in grid.clippings])
    ax.set_xlabel("AGC clipping threshold (lambda)")
    ax.scatter([], [], marker="*", s=150, color="white", edgecolor="black", label="best threshold of a batch size")
    _finish(ax, f"NF network: accuracy against clipping threshold ({len(grid.seeds)} seeds)", diverged)
    fig.savefig(path)
    return fig


def _cell(runs) -> str:
    mean, lo, hi, diverged = _stats(runs)
    cell = f"{mean:.1f} ({lo:.1f}-{hi:.1f})"
    return cell + (f", {diverged} of {len(runs)} diverged" if diverged else "")


def _verdicts(records, grid) -> list[str]:
    big, small = grid.batches[-1], grid.batches[0]
    mean = lambda net, c, b: _stats(_select(records, net, c, b))[0]  # noqa: E731
    agc = {b: mean("nf", best_clipping(records, grid, b), b) for b in grid.batches}
    unstable = [b for b in grid.batches if _stats(_select(records, "nf", None, b))[3]]
    gap_big, gap_small = agc[big] - mean("nf", None, big), agc[small] - mean("nf", None, small)
    holds_1a = bool(unstable) and gap_big >= 10 and abs(gap_small) < 10
    bn_gap = mean("bn", None, big) - agc[big]
    best = [best_clipping(records, grid, b) for b in grid.batches]
    shrinks = all(x >= y for x, y in zip(best, best[1:])) and best[-1] < best[0]
    return [
        f"- **1a. Without AGC the NF network is unstable at large batch sizes: "
        f"{'holds' if holds_1a else 'does not hold'}.** Rule: some seed diverges, AGC (at its best threshold) "
        f"leads by 10 points or more at the largest batch and by less than 10 at the smallest. Diverged without "
        f"AGC at batch sizes: {', '.join(map(str, unstable)) or 'none'}; AGC's lead {gap_big:+.1f} points at "
        f"batch {big}, {gap_small:+.1f} at batch {small}.",
        f"- **1b. With AGC the NF network matches the batch-normalised baseline at large batch sizes: "
        f"{'holds' if bn_gap <= 2 else 'does not hold'}.** Rule: within 2 points at batch {big}; "
        f"the BN-ResNet leads by {bn_gap:+.1f} points.",
        f"- **2. The best clipping threshold shrinks as the batch grows: "
        f"{'holds' if shrinks else 'does not hold'}.** Rule: the best threshold never grows with the batch "
        f"and ends smaller than it started. Best thresholds at batch "
        f"{', '.join(f'{b}: {c:g}' for b, c in zip(grid.batches, best))}.",
    ]


def _machine() -> str:
    import timm
    import torch
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from bench import cpu_name  # the machine line of BENCHMARKS.md names the CPU the same way
    try:
        here = Path(__file__).parent
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=here).stdout.strip()
        if commit and subprocess.run(["git", "diff", "--quiet", "HEAD", "--", ".", "../src"], cwd=here).returncode:
            commit += " with uncommitted changes"
    except OSError:
        commit = ""
    return (f"{cpu_name()}, {len(os.sched_getaffinity(0))} cores; Python {platform.python_version()}, "
            f"torch {torch.__version__}, timm {timm.__version__}" + (f"; report drawn at commit {commit}" if commit else ""))


def _wall_minutes(records) -> str:
    """From the first training's start to the last one's end (across interrupted invocations)."""
    if not all("finished" in r for r in records):
        return "unknown (records from before their end times were kept)"
    return f"{(max(r['finished'] for r in records) - min(r['finished'] - r['seconds'] for r in records)) / 60:.1f}"


def write_report(records, grid, out: Path, quick: bool) -> Path:
    folder = out / "reproduction"
    figure_batch(records, grid, folder / "accuracy_vs_batch.png")
    figure_clipping(records, grid, folder / "accuracy_vs_clipping.png")
    s = grid.setup
    rows = ["| batch | lr | NF, no AGC | NF + AGC (best threshold) | best threshold | BN-ResNet (timm) |",
            "|---|---|---|---|---|---|"]
    for b in grid.batches:
        nf, agc, bn = (_cell(runs) for runs in (_select(records, "nf", None, b),
                                                 _select(records, "nf", best_clipping(records, grid, b), b),
                                                 _select(records, "bn", None, b)))
        rows.append(f"| {b} | {s.base_lr * b / 256:g} | {nf} | {agc} | {best_clipping(records, grid, b):g} | {bn} |")
    crows = ["| clipping | " + " | ".join(f"batch {b}" for b in grid.batches) + " |",
             "|---|" + "---|" * len(grid.batches)]
    for c in grid.clippings:
        crows.append(f"| {c:g} | " + " | ".join(_cell(_select(records, "nf", c, b)) for b in grid.batches) + " |")
    crows.append("| off | " + " | ".join(_cell(_select(records, "nf", None, b)) for b in grid.batches) + " |")
    command = "python experiments/reproduce.py" + (" --quick" if quick else "")
    trained = sum(r["seconds"] for r in records)
    workers = " or ".join(sorted({str(r.get("workers", "?")) for r in records}))
    text = f"""# Reproducing the paper's batch-size ablation of AGC, on a CPU

{QUICK_BANNER if quick else ''}The paper ([Brock et al. 2021](https://arxiv.org/abs/2102.06171), section 4.1, figure 2) trains
NF-ResNet-50 on ImageNet for 90 epochs at batch sizes 256 to 4096 and finds that (1) without
normalization, training becomes unstable at large batch sizes, and Adaptive Gradient Clipping (AGC) lets the
NF network match a batch-normalised ResNet there; (2) the larger the batch, the smaller the best clipping
threshold. This is the same experiment at a size a laptop trains in about half an hour.

## Verdicts at this scale

{chr(10).join(_verdicts(records, grid))}

## Accuracy against batch size

Final top-1 on {s.val_images:,} held-out images, mean over seeds {', '.join(map(str, grid.seeds))} (lowest-highest):

{chr(10).join(rows)}

![Accuracy against batch size](reproduction/accuracy_vs_batch.png)

## Accuracy against the clipping threshold (NF network)

{chr(10).join(crows)}

![Accuracy against clipping threshold](reproduction/accuracy_vs_clipping.png)

## Setup

- **Data**: jittered digits (`experiments/jittered_digits.py`): scikit-learn's handwritten digits redrawn at a
  random scale, rotation and position on a 16x16 canvas, random colours and pixel noise; {s.train_images:,}
  training images from the digits of the training split, {s.val_images:,} validation images from the held-out
  digits only. The digits as they are would be too small (1,437 images: one update an epoch at batch 1,024)
  and too easy to tell the arms apart. Needs no network.
- **Networks** (`experiments/ablation.py`): a micro NFNet built by nfnet_zoo (DeepMind's NF blocks, depths
  1-1-1-1, widths 16-128, 0.11M parameters, no dropout or stochastic depth) and timm's `resnet18` cut to the
  same depths and widths 10-80 with batch norm (0.14M), the paper's baseline.
- **Recipe** (the paper's, scaled down): SGD, Nesterov momentum 0.9, learning rate {s.base_lr} x batch / 256,
  linear warm-up over the first epoch then cosine decay to 0 (timm's `CosineLRScheduler`), weight decay 2e-5
  (not on gains and biases), {s.epochs} epochs at every batch size; AGC from `nfnet_zoo.agc`, classifier
  excluded. The base learning rate is the one at which the smallest batch trains well without AGC.
- **AGC's column** in the first table and figure takes, at each batch size, the threshold of the sweep
  ({', '.join(f'{c:g}' for c in grid.clippings)}) with the best mean top-1. The pick is made on the
  validation set, as a sweep in the paper is, which flatters that column by the noise of the pick.
- **Run**: `{command}` (or `make reproduce{' QUICK=1' if quick else ''}`); {len(records)} trainings on {workers} process(es)
  of one thread: {trained / 60:.1f} minutes of training in all, {_wall_minutes(records)} minutes of wall clock. Arms are
  kept in `reproduction/results.jsonl` as they finish; a rerun retrains only the missing ones.
- **Machine**: {_machine()}; {datetime.date.today().isoformat()}.

## What differs from the paper

- Scale: 0.11M-parameter networks, {s.train_images:,} 16x16 images and {s.epochs} epochs against NF-ResNet-50
  on ImageNet for 90 epochs. At the same number of epochs, the largest batch here makes only
  {s.train_images // grid.batches[-1] * s.epochs} updates, so every arm loses accuracy at large batch sizes
  for lack of steps; the paper's largest batch still makes about 28,000.
- Batch sizes {grid.batches[0]}-{grid.batches[-1]} against the paper's 256-4096; the learning rate at the
  largest batch is {s.base_lr * grid.batches[-1] / 256:g} here, 1.6 in the paper (0.1 x 4096 / 256).
- Each point has {len(grid.seeds)} seeds; the bars show their spread, not a confidence interval.
"""
    path = out / "REPRODUCTION.md"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path
