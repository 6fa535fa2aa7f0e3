"""Training curves of a run: RUN/curves.png, four panels per epoch from RUN/metrics.jsonl.

Loss (train and val), val top-1 and top-5, the learning rate, and the fraction of units AGC clipped.
matplotlib is an optional extra (`pip install 'nfnet-zoo[plots]'`) and is imported only here, only
when a figure is drawn (or its presence checked). The figure is a `matplotlib.figure.Figure` rendered by Agg: no pyplot state,
no display, safe beside a training loop.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional, Union

from ..files import CURVES, write_bytes_atomic
from ..errors import NFNetZooError

INSTALL = "pip install 'nfnet-zoo[plots]'"
# (panel title, y label, [(metrics.jsonl key, legend label, line style, marker)])
PANELS = (
    ("Loss", "loss", [("train_loss", "train", "-", "o"), ("val_loss", "val", "--", "s")]),
    ("Validation accuracy", "accuracy (%)", [("top1", "top-1", "-", "o"), ("top5", "top-5", "--", "s")]),
    ("Learning rate", "learning rate (at epoch end)", [("lr", "lr", "-", "o")]),
    ("Adaptive Gradient Clipping", "fraction of units clipped", [("clipped_fraction", "clipped", "-", "o")]),
)
# Larger values are marked like non-finite ones: matplotlib's axis arithmetic overflows near the float limit
# (1e308: "arange: cannot compute length"), and no loss, rate or accuracy that large is worth a scale.
DRAWABLE = 1e100


@contextlib.contextmanager
def _quiet_matplotlib():
    """matplotlib's notes about its own caches (an unwritable config folder, building the font cache) would add
    lines to every command that draws; the figure does not depend on them."""
    logger = logging.getLogger("matplotlib")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def plotting_problem() -> Optional[str]:
    """None when matplotlib (the `plots` extra) can be imported, else why not, in a few words."""
    try:
        with _quiet_matplotlib():
            import matplotlib  # noqa: F401
    except ImportError:
        return "matplotlib is not installed"
    except Exception as e:  # noqa: BLE001 - a broken install: no curves, never a failed command or run
        return f"matplotlib cannot be imported ({type(e).__name__}: {str(e).strip()[:120]})".replace("\n", " ")
    return None


def read_metrics(run: Union[str, os.PathLike]) -> list[dict]:
    """The rows of RUN/metrics.jsonl (one JSON object per finished epoch)."""
    path = Path(run) / "metrics.jsonl"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise NFNetZooError(f"{path} is missing: pass a run folder written by `nfnet-zoo finetune` (it writes a "
                            "line there at the end of each epoch)") from None
    except UnicodeDecodeError:
        raise NFNetZooError(f"{path} is not text; restore it from a copy") from None
    rows = []
    for i, line in enumerate(lines, 1):
        try:
            row = json.loads(line) if line.strip() else {}
        except json.JSONDecodeError as e:
            raise NFNetZooError(f"{path} line {i} is not valid JSON ({e.msg}); restore it from a copy") from None
        if not isinstance(row, dict):
            raise NFNetZooError(f"{path} line {i} is not a JSON object; restore it from a copy")
        if row:
            rows.append(row)
    if not rows:
        raise NFNetZooError(f"{path} holds no epoch yet: draw the curves after the run's first epoch")
    return rows


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float], list[float]]:
    """(epochs, values) of the drawable values of `key`, and the epochs whose value was NaN, infinite or beyond
    +-DRAWABLE; a missing key, null or a non-number is no point."""
    xs, ys, bad = [], [], []
    for i, row in enumerate(rows):
        epoch = row.get("epoch")
        number = isinstance(epoch, (int, float)) and not isinstance(epoch, bool) and abs(epoch) <= DRAWABLE
        x = epoch if number else i + 1
        v = row.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if abs(v) <= DRAWABLE:  # False for NaN too
            xs.append(x)
            ys.append(v)
        else:
            bad.append(x)
    return xs, ys, bad


def _note(ax, text: str, y: float = 0.5, color: str = "0.35") -> None:
    ax.text(0.5, y, text, transform=ax.transAxes, ha="center", va="center", color=color, fontsize=9, wrap=True,
            bbox=dict(facecolor="white", edgecolor="none", alpha=0.8))


def curves_figure(rows: list[dict], title: str = "", clipping: Optional[float] = None):
    """A matplotlib Figure of the run's curves: 2 x 2 panels, x axis the epoch.

    `clipping` is the run's AGC lambda: 0 marks the clipping panel "AGC off". Values not finite or too large
    (DRAWABLE) are left out and counted on their panel; missing keys simply draw nothing.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(10, 7), dpi=100, layout="constrained")
    if title:
        fig.suptitle(title.replace("$", r"\$"))  # a folder named a$b$ is a name, not math for matplotlib to parse
    epochs = _series(rows, "epoch")[0] or [1]
    for ax, (name, ylabel, lines) in zip(fig.subplots(2, 2).flat, PANELS):
        agc = lines[0][0] == "clipped_fraction"
        ax.set_title(f"{name} (clipping {clipping:g})" if agc and clipping else name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)  # a one-epoch run too gets a whole-number axis
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(alpha=0.3)
        if agc and clipping == 0:
            _note(ax, "AGC off (clipping 0)")
            ax.set_yticks([])
            continue
        drawn, bad = 0, []
        for key, label, style, marker in lines:
            xs, ys, nonfinite = _series(rows, key)
            if xs:  # markers: a one-epoch run is one point per line
                ax.plot(xs, ys, linestyle=style, marker=marker, markersize=5 if len(xs) <= 30 else 2, label=label)
                drawn += 1
            if nonfinite:  # where they were: red crosses on the top edge, in the line's own x
                ax.plot(nonfinite, [1.0] * len(nonfinite), "x", color="tab:red", markersize=8, clip_on=False,
                        transform=ax.get_xaxis_transform(), label=f"_{label} not finite")
                bad += [f"{label} epoch {x:g}" for x in nonfinite]
        if len(lines) > 1 and drawn:
            ax.legend()
        if not drawn:
            _note(ax, "no drawable values (not finite or too large)" if bad else "no values recorded")
            ax.set_yticks([])
        if bad:
            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            _note(ax, f"not finite or too large, not drawn (x): {shown}", y=0.06, color="tab:red")
    return fig


def curves_png(rows: list[dict], title: str = "", clipping: Optional[float] = None) -> bytes:
    """The PNG bytes of `curves_figure` (Agg renderer)."""
    buf = io.BytesIO()
    with _quiet_matplotlib():
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        fig = curves_figure(rows, title, clipping)
        FigureCanvasAgg(fig)  # its own canvas: no pyplot, no global backend
        fig.savefig(buf, format="png")
    return buf.getvalue()


def _run_args(run: Path) -> dict[str, Any]:
    try:
        args = json.loads((run / "args.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):  # a folder without (readable) args.json still gets its curves
        return {}
    return args if isinstance(args, dict) else {}


def run_title(run: Path, args: dict) -> str:
    """The figure's title from a run's arguments (args.json): model, dataset and the run folder's name."""
    model = args.get("model") or args.get("checkpoint") or "model"
    dataset = f" on {args['dataset']}" if isinstance(args.get("dataset"), str) else ""
    return f"{model}{dataset} ({Path(run).name})"


def write_curves(run: Union[str, os.PathLike]) -> Path:
    """Draw RUN/curves.png (written atomically) from RUN/metrics.jsonl; returns its path (`nfnet-zoo curves`).

    The title and the AGC panel come from RUN/args.json when it is there.
    """
    run = Path(run)
    if not run.is_dir():
        raise NFNetZooError(f"{run} is not a folder; pass a run folder written by `nfnet-zoo finetune`")
    problem = plotting_problem()
    if problem:
        raise NFNetZooError(f"{problem}, so {run / CURVES} cannot be drawn: {INSTALL}")
    rows = read_metrics(run)
    args = _run_args(run)
    clipping = args.get("clipping") if isinstance(args.get("clipping"), (int, float)) else None
    try:
        png = curves_png(rows, run_title(run, args), clipping)
    except (RuntimeError, ValueError) as e:  # e.g. a matplotlibrc with text.usetex and no TeX installed
        raise NFNetZooError(f"matplotlib could not draw {run / CURVES} ({type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}); check the "
                            f"settings of your matplotlibrc (matplotlib.matplotlib_fname())") from None
    write_bytes_atomic(run / CURVES, png)
    return run / CURVES


__all__ = ["write_curves", "curves_figure", "curves_png", "read_metrics", "plotting_problem", "run_title",
           "CURVES"]
