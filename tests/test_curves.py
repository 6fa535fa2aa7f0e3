"""RUN/curves.png: what `finetune` and `nfnet-zoo curves` draw, and a run without matplotlib.

References: metrics.jsonl as written on disk (read back with json), the Figure's own axes, lines and
texts (matplotlib's API), the PNG file decoded by PIL, and a real fine-tuning run with matplotlib
made unimportable (None in sys.modules, as Python's import system honours it).
"""
from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _images import make_folder
from nfnet_zoo_cli import main as cli_main
from nfnet_zoo.training.curves import INSTALL, curves_figure, read_metrics

TINY = dict(model="nfnet_zoo_tiny", img_size=32, batch_size=8, workers=0, pretrained=False)
BLUE, ORANGE = (31, 119, 180), (255, 127, 14)  # matplotlib's default colours of a panel's first and second line


def _hide_matplotlib(mp: pytest.MonkeyPatch) -> None:
    """As if matplotlib were not installed: `import matplotlib` (and any submodule) raises ImportError."""
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + ["matplotlib"]:
        mp.setitem(sys.modules, name, None)


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _panels(fig) -> dict:
    return {ax.get_title().split(" (")[0]: ax for ax in fig.axes}


def _lines(ax) -> dict[str, tuple[list, list]]:
    """Legend label -> (x, y) of each drawn line (matplotlib hides labels starting with '_')."""
    return {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.get_lines()
            if not ln.get_label().startswith("_")}


def _texts(ax) -> str:
    return " | ".join(t.get_text() for t in ax.texts)


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"nfnet-zoo {command}: error: "), err
    return err[0]


@pytest.fixture(scope="module")
def bare_run(tmp_path_factory) -> tuple[Path, list[str]]:
    """A real one-epoch run with AGC off, trained where matplotlib cannot be imported; and its warnings."""
    data = make_folder(tmp_path_factory.mktemp("data") / "shapes", n_train=8, n_val=2)
    out = tmp_path_factory.mktemp("runs") / "one-epoch"
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _hide_matplotlib(mp)
        from nfnet_zoo.training.finetune import finetune
        run = finetune(data_dir=str(data), output=str(out), epochs=1, clipping=0.0, **TINY)
    return run, [str(w.message) for w in caught]


# --- without matplotlib ------------------------------------------------------------------------
def test_finetune_without_matplotlib_trains_and_says_how_to_get_the_curves(bare_run):
    run, messages = bare_run
    about = [m for m in messages if "curves.png" in m]
    assert len(about) == 1 and "\n" not in about[0], messages
    assert "matplotlib is not installed" in about[0] and INSTALL in about[0] and f"nfnet-zoo curves {run}" in about[0]
    assert (run / "model.safetensors").is_file() and len(_rows(run)) == 1
    assert not (run / "curves.png").exists()
    card = (run / "README.md").read_text()
    assert "curves.png" not in card and "![" not in card  # no link to a missing image


def test_curves_command_without_matplotlib_is_one_line(bare_run, monkeypatch, capsys):
    run, _ = bare_run
    _hide_matplotlib(monkeypatch)
    assert cli_main(["curves", str(run)]) == 2
    assert INSTALL in _one_line_error(capsys, "curves")
    assert not (run / "curves.png").exists()


def test_a_broken_matplotlib_install_is_one_line(bare_run, monkeypatch, capsys):
    class Broken:  # an install whose import fails inside matplotlib, not with ImportError
        def find_spec(self, name, path=None, target=None):
            if name == "matplotlib":
                raise RuntimeError("Could not find the matplotlib data files\nsecond line")
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [Broken(), *sys.meta_path])
    run, _ = bare_run
    assert cli_main(["curves", str(run)]) == 2
    line = _one_line_error(capsys, "curves")
    assert "matplotlib cannot be imported (RuntimeError: Could not find the matplotlib data files second line)" in line
    assert INSTALL in line and not (run / "curves.png").exists()


# --- drawing a run ------------------------------------------------------------------------------
def test_curves_command_draws_a_one_epoch_run_with_visible_points(bare_run, capsys):
    run, _ = bare_run
    assert cli_main(["curves", str(run)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {run / 'curves.png'}"
    with Image.open(run / "curves.png") as im:
        assert im.format == "PNG" and im.size == (1000, 700)
        pixels = np.asarray(im.convert("RGB")).astype(int)
    # the single train (blue) and val (orange) points are drawn: pixels of those colours in the loss panel
    loss_panel = pixels[:350, :500]
    for colour in (BLUE, ORANGE):
        assert (np.abs(loss_panel - colour).sum(-1) < 30).sum() >= 20, colour

    [row] = _rows(run)
    fig = curves_figure(read_metrics(run), clipping=0.0)
    panels = _panels(fig)
    assert _lines(panels["Loss"]) == {"train": ([1], [row["train_loss"]]), "val": ([1], [row["val_loss"]])}
    assert _lines(panels["Validation accuracy"]) == {"top-1": ([1], [row["top1"]]), "top-5": ([1], [row["top5"]])}
    assert _lines(panels["Learning rate"]) == {"lr": ([1], [row["lr"]])}
    for ax in panels.values():
        assert all(ln.get_marker() not in (None, "None", "") and ln.get_markersize() >= 4 for ln in ax.get_lines())
        lo, hi = ax.get_xlim()
        assert [x for x in ax.get_xticks() if lo <= x <= hi] == [1]  # whole epochs, not 0.95 ... 1.05
    assert row["clipped_fraction"] is None  # AGC off: nothing measured ...
    assert _lines(panels["Adaptive Gradient Clipping"]) == {}
    assert "AGC off" in _texts(panels["Adaptive Gradient Clipping"])  # ... and the panel says why


def test_figure_labels_legends_and_data_with_non_finite_and_missing_values(tmp_path, capsys):
    run = tmp_path / "diverged $x$ run"  # a folder name matplotlib would read as math
    run.mkdir()
    nan, inf = float("nan"), float("inf")
    written = [
        dict(epoch=1, train_loss=2.0, val_loss=1.9, top1=40.0, top5=80.0, lr=0.1, clipped_fraction=0.2),
        dict(epoch=2, train_loss=1.5, val_loss=inf, top1=50.0, top5=90.0, lr=0.05, clipped_fraction=0.1),
        dict(epoch=3, train_loss=1.2, val_loss=nan, top1=None, top5=95.0, clipped_fraction=0.05),  # no lr key
        dict(epoch=4, train_loss=1.0, val_loss=1.1, top1=60.0, top5="n/a", lr=0.0, clipped_fraction=-inf),
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in written))  # NaN, Infinity as json writes
    (run / "args.json").write_text(json.dumps({"model": "nfnet_f0", "dataset": "pets", "clipping": 0.01}))
    assert cli_main(["curves", str(run)]) == 0, capsys.readouterr().err
    with Image.open(run / "curves.png") as im:
        assert im.format == "PNG" and im.size == (1000, 700)

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    fig = curves_figure(read_metrics(run), "title", clipping=0.01)
    assert fig.get_suptitle() == "title"
    panels = _panels(fig)
    assert list(panels) == ["Loss", "Validation accuracy", "Learning rate", "Adaptive Gradient Clipping"]
    assert [ax.get_xlabel() for ax in fig.axes] == ["epoch"] * 4
    assert [ax.get_ylabel() for ax in fig.axes] == ["loss", "accuracy (%)", "learning rate (at epoch end)",
                                                    "fraction of units clipped"]
    assert fig.axes[3].get_title() == "Adaptive Gradient Clipping (clipping 0.01)"
    assert [t.get_text() for t in panels["Loss"].get_legend().get_texts()] == ["train", "val"]
    assert [t.get_text() for t in panels["Validation accuracy"].get_legend().get_texts()] == ["top-1", "top-5"]

    def finite(key):
        pts = [(r["epoch"], r[key]) for r in rows if isinstance(r.get(key), float) and math.isfinite(r[key])]
        return [p[0] for p in pts], [p[1] for p in pts]
    assert _lines(panels["Loss"]) == {"train": finite("train_loss"), "val": finite("val_loss")}
    assert _lines(panels["Loss"])["val"] == ([1, 4], [1.9, 1.1])
    assert _lines(panels["Validation accuracy"]) == {"top-1": finite("top1"), "top-5": finite("top5")}
    assert _lines(panels["Learning rate"]) == {"lr": finite("lr")} == {"lr": ([1, 2, 4], [0.1, 0.05, 0.0])}
    assert _lines(panels["Adaptive Gradient Clipping"]) == {"clipped": ([1, 2, 3], [0.2, 0.1, 0.05])}
    # the left-out values are said on their panel and marked where they were
    assert "val epoch 2, val epoch 3" in _texts(panels["Loss"]) and "not finite" in _texts(panels["Loss"])
    crosses = [ln for ln in panels["Loss"].get_lines() if ln.get_marker() == "x"]
    assert [list(c.get_xdata()) for c in crosses] == [[2, 3]]
    assert "clipped epoch 4" in _texts(panels["Adaptive Gradient Clipping"])
    assert "not finite" not in _texts(panels["Learning rate"])  # a missing key is no point, not an error


def test_curves_command_says_nothing_about_matplotlibs_own_cache(tmp_path):
    """With no writable config folder matplotlib logs two warnings per process (and builds its font cache in a
    temporary one); the command's output stays its one line."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps(dict(epoch=1, train_loss=1.0, lr=0.1)) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MPL", "XDG_"))}
    env.update(HOME=str(tmp_path / "no-home"), XDG_CONFIG_HOME="/proc/no-config", XDG_CACHE_HOME="/proc/no-cache",
               PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    r = subprocess.run([sys.executable, "-m", "nfnet_zoo_cli", "curves", str(run)], env=env, capture_output=True,
                       text=True, timeout=120)
    assert (r.returncode, r.stdout, r.stderr) == (0, f"wrote {run / 'curves.png'}\n", "")
    assert (run / "curves.png").read_bytes().startswith(b"\x89PNG")


def test_matplotlib_settings_it_cannot_honour_are_one_line(tmp_path, monkeypatch, capsys):
    import matplotlib
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps(dict(epoch=1, train_loss=1.0)) + "\n")
    monkeypatch.setitem(matplotlib.rcParams, "text.usetex", True)  # as a user's matplotlibrc may ask
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))  # and no TeX to be found
    assert cli_main(["curves", str(run)]) == 2
    line = _one_line_error(capsys, "curves")
    assert "matplotlib could not draw" in line and "latex" in line and "matplotlibrc" in line
    assert not (run / "curves.png").exists()


def test_a_panel_without_values_says_so():
    fig = curves_figure([{"epoch": 1, "train_loss": 1.0}], clipping=None)
    panels = _panels(fig)
    assert _lines(panels["Validation accuracy"]) == {} and "no values recorded" in _texts(panels["Validation accuracy"])
    assert "no values recorded" in _texts(panels["Adaptive Gradient Clipping"])  # unknown clipping: not "AGC off"


@pytest.mark.parametrize("case, words", [
    ("no_folder", "is not a folder"),
    ("a_file", "is not a folder"),
    ("no_metrics", "metrics.jsonl is missing"),
    ("empty", "holds no epoch yet"),
    ("bad_json", "line 2 is not valid JSON"),
    ("not_an_object", "line 1 is not a JSON object"),
    ("binary", "is not text"),
])
def test_curves_command_refuses_bad_input_with_one_line(tmp_path, capsys, case, words):
    run = tmp_path / "run"
    if case == "a_file":
        run.write_text("x")
    elif case != "no_folder":
        run.mkdir()
        content = {"no_metrics": None, "empty": "\n", "bad_json": '{"epoch": 1}\n{"epoch": \n', "not_an_object": "[1]\n",
                   "binary": b"\xff\xfe\x00"}[case]
        if isinstance(content, bytes):
            (run / "metrics.jsonl").write_bytes(content)
        elif content is not None:
            (run / "metrics.jsonl").write_text(content)
    assert cli_main(["curves", str(run)]) == 2
    assert words in _one_line_error(capsys, "curves")
    assert not (tmp_path / "run" / "curves.png").exists()


# --- a plotting fault never stops training ------------------------------------------------------------
def test_a_plotting_fault_warns_once_and_training_goes_on(tmp_path, monkeypatch):
    ft = importlib.import_module("nfnet_zoo.training.finetune")  # the module (the package exports a function of that name)
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("a matplotlib fault\nwith a second line")
    monkeypatch.setattr(ft, "curves_png", broken)
    data = make_folder(tmp_path / "shapes", n_train=4, n_val=2)
    with pytest.warns(UserWarning) as caught:
        run = ft.finetune(data_dir=str(data), output=str(tmp_path / "run"), epochs=2, **TINY)
    about = [str(w.message) for w in caught if "curves.png" in str(w.message)]
    assert about == [f"curves.png not drawn (RuntimeError: a matplotlib fault); training goes on; "
                     f"`nfnet-zoo curves {run}` draws it later"]
    assert len(calls) == 1  # not tried again every epoch
    assert len(_rows(run)) == 2 and (run / "model.safetensors").is_file() and not (run / "curves.png").exists()


def test_values_near_the_float_limit_are_marked_not_an_error(tmp_path):
    """1e308 overflowed matplotlib's axis arithmetic: a RuntimeWarning, then an error blaming the matplotlibrc."""
    run = tmp_path / "run"
    run.mkdir()
    rows = [dict(epoch=1, train_loss=1e308, val_loss=1.0, lr=-1e308), dict(epoch=2, train_loss=0.5, val_loss=1e200,
                                                                          lr=0.1)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    r = subprocess.run([sys.executable, "-m", "nfnet_zoo_cli", "curves", str(run)], env=env, capture_output=True,
                       text=True, timeout=120)
    assert (r.returncode, r.stderr) == (0, ""), r.stderr
    panels = _panels(curves_figure(read_metrics(run)))
    assert _lines(panels["Loss"]) == {"train": ([2], [0.5]), "val": ([1], [1.0])}
    assert "too large, not drawn (x): train epoch 1, val epoch 2" in _texts(panels["Loss"])
    assert _lines(panels["Learning rate"]) == {"lr": ([2], [0.1])}
