"""experiments/reproduce.py (make reproduce): the --quick grid end to end, its resume, the ablation's
training arms, and the verdict rules on records built by hand."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
sys.path.insert(0, str(EXPERIMENTS))
import ablation  # noqa: E402
import jittered_digits  # noqa: E402
import report  # noqa: E402
import reproduce  # noqa: E402


def _reproduce(*args, cwd, prelude=""):
    code = f"import runpy, sys; {prelude}sys.argv = ['reproduce.py', *{list(args)!r}]; " \
           f"runpy.run_path({str(EXPERIMENTS / 'reproduce.py')!r}, run_name='__main__')"
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_quick_grid_writes_the_report_and_figures_then_resumes(tmp_path):
    r = _reproduce("--quick", "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "out"
    records = [json.loads(line) for line in (out / "reproduction" / "results.jsonl").read_text().splitlines()]
    arms = reproduce.QUICK.arms()
    assert sorted(ablation.Arm(x["network"], x["batch"], x["clipping"], x["seed"]).key for x in records) == \
        sorted(a.key for a in arms)
    for x in records:  # the paper's linear scaling and a fixed number of epochs for every batch size
        assert x["lr"] == pytest.approx(0.4 * x["batch"] / 256)
        assert x["steps"] == 512 // x["batch"] * 1
        assert 0 <= x["final_top1"] <= 100 and (x["clipping"] is None) == (x["clipped_fraction"] is None)
    text = (out / "REPRODUCTION.md").read_text()
    assert "`--quick` run" in text and "| 32 | 0.05 |" in text and "| 128 | 0.2 |" in text
    assert len(re.findall(r"^- \*\*(1a|1b|2)\. .*: (holds|does not hold)\.\*\*", text, re.M)) == 3  # one per finding
    for name in ("accuracy_vs_batch.png", "accuracy_vs_clipping.png"):
        with Image.open(out / "reproduction" / name) as im:
            assert im.format == "PNG" and im.size == (900, 600)
    # a kill while writing leaves a torn last line: that arm alone is trained again
    results = out / "reproduction" / "results.jsonl"
    lines = results.read_text().splitlines()
    results.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:40])
    again = _reproduce("--quick", "--out", str(out), "--workers", "1", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{len(arms) - 1} already in" in again.stdout and "training 1 on 1 process(es)" in again.stdout
    assert sorted(reproduce._load(results, reproduce.QUICK.setup)) == sorted(a.key for a in arms)  # all on disk
    assert "on 1 or 2 process(es)" in (out / "REPRODUCTION.md").read_text()


@pytest.mark.parametrize("args, prelude, message", [
    (("--quick", "--workers", "0"), "", "--workers must be from 1 to this machine's"),
    (("--quick", "--workers", "4096"), "", "got 4096"),
    (("--quick",), "sys.modules['matplotlib'] = None; ", "pip install 'nfnet-zoo[plots]'"),
])
def test_bad_input_is_one_line_before_any_training(tmp_path, args, prelude, message):
    r = _reproduce(*args, "--out", str(tmp_path / "o"), cwd=tmp_path, prelude=prelude)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_a_users_files_are_never_replaced(tmp_path):
    (tmp_path / "o").mkdir()
    mine = tmp_path / "o" / "REPRODUCTION.md"
    mine.write_text("# my own notes\n")
    r = _reproduce("--quick", "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert r.returncode == 2 and "is not a report this script wrote" in r.stderr and "Traceback" not in r.stderr
    assert mine.read_text() == "# my own notes\n" and not (tmp_path / "o" / "reproduction").exists()
    (tmp_path / "f").write_text("a file, not a folder")
    r = _reproduce("--quick", "--out", str(tmp_path / "f"), cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Not a directory" in r.stderr
    assert (tmp_path / "f").read_text() == "a file, not a folder"


def test_jittered_digits_are_deterministic_balanced_and_held_out():
    x, y = jittered_digits.make("train", 500, seed=3)
    x2, y2 = jittered_digits.make("train", 500, seed=3)
    assert x.shape == (500, 3, 16, 16) and x.equal(x2) and y.equal(y2)
    assert not x.equal(jittered_digits.make("train", 500, seed=4)[0])
    counts = y.bincount(minlength=10)
    assert counts.min() >= 35 and counts.max() <= 65  # scikit-learn's digits are near-even across classes
    train, _ = jittered_digits._source_digits("train")
    val, _ = jittered_digits._source_digits("val")
    assert len(train) == 1437 and len(val) == 360  # the 80/20 split of nfnet-zoo demo


def _arm_data(n=256):
    return (*jittered_digits.make("train", n, 0), *jittered_digits.make("val", 100, 0))


def test_agc_arm_clips_and_a_diverged_arm_scores_zero():
    data = _arm_data()
    setup = ablation.Setup(0.4, 1, 256, 100)
    clipped = ablation.train(ablation.Arm("nf", 64, 1e-4, 0), setup, data)
    assert clipped["clipped_fraction"] > 0.2 and clipped["diverged_at"] is None and clipped["steps"] == 4
    # units with a zero gradient (residual branches behind a skip gain of 0 at initialisation) never clip
    assert ablation.train(ablation.Arm("nf", 64, 1e4, 0), setup, data)["clipped_fraction"] == 0.0
    wild = ablation.train(ablation.Arm("nf", 64, None, 0), ablation.Setup(1e6, 2, 256, 100), data)
    assert wild["diverged_at"] is not None and wild["final_top1"] == 0.0 and wild["clipped_fraction"] is None


def _record(network, batch, clipping, seed, top1, diverged=False):
    return {"network": network, "batch": batch, "clipping": clipping, "seed": seed, "final_top1": top1,
            "diverged_at": 1.5 if diverged else None, "seconds": 1.0}


def test_verdicts_follow_their_rules():
    grid = reproduce.Grid(ablation.Setup(0.4, 1, 512, 100), batches=(64, 1024), clippings=(0.01, 0.04), seeds=(0, 1))
    paper_like = [
        *[_record("nf", 64, c, s, t) for c, t in ((None, 80), (0.01, 79), (0.04, 81)) for s in (0, 1)],
        *[_record("nf", 1024, None, s, 0, diverged=True) for s in (0, 1)],
        *[_record("nf", 1024, 0.01, s, 70) for s in (0, 1)], *[_record("nf", 1024, 0.04, s, 40) for s in (0, 1)],
        *[_record("bn", b, None, s, 71) for b in (64, 1024) for s in (0, 1)],
    ]
    v = report._verdicts(paper_like, grid)
    assert "1a." in v[0] and ": holds" in v[0] and "batch sizes: 1024" in v[0] and "+70.0 points at batch 1024" in v[0]
    assert ": holds" in v[1] and "+1.0 points" in v[1]  # against AGC's best threshold at 1024 (0.01)
    assert ": holds" in v[2] and "64: 0.04, 1024: 0.01" in v[2]
    flipped = [dict(r, final_top1=90) if r["batch"] == 1024 and r["clipping"] == 0.04 else r for r in paper_like]
    assert "does not hold" in report._verdicts(flipped, grid)[2]  # the best threshold grew with the batch
    no_gap = [dict(r, final_top1=70, diverged_at=None) if r["clipping"] is None and r["network"] == "nf" else r
              for r in paper_like]
    assert "does not hold" in report._verdicts(no_gap, grid)[0]
    assert "does not hold" in report._verdicts([dict(r, final_top1=90) if r["network"] == "bn" else r
                                                 for r in paper_like], grid)[1]


def test_figures_explain_the_cross_only_where_a_seed_diverged(tmp_path):
    grid = reproduce.Grid(ablation.Setup(0.4, 1, 512, 100), batches=(64, 1024), clippings=(0.01, 0.04), seeds=(0, 1))
    records = [_record(net, b, c, s, 50.0, diverged=(c is None and net == "nf" and b == 1024))
               for b in (64, 1024) for s in (0, 1) for net, c in (("nf", None), ("nf", 0.01), ("nf", 0.04), ("bn", None))]
    legend = lambda fig: [t.get_text() for t in fig.axes[0].get_legend().get_texts()]  # noqa: E731
    batch = legend(report.figure_batch(records, grid, tmp_path / "b.png"))
    clipping = legend(report.figure_clipping(records, grid, tmp_path / "c.png"))
    assert "a seed that diverged (scored 0)" in batch and "a seed that diverged (scored 0)" not in clipping
    assert "chance (10%)" in batch and "chance (10%)" in clipping and "batch 1024" in clipping
    assert batch[0] == "NF, no AGC" and (tmp_path / "b.png").stat().st_size > 10_000


def test_wall_clock_spans_the_first_start_to_the_last_end():
    records = [{"seconds": 60.0, "finished": 1000.0}, {"seconds": 30.0, "finished": 1200.0}]  # 940 s to 1200 s
    assert report._wall_minutes(records) == f"{260 / 60:.1f}"
    assert report._wall_minutes([{"seconds": 60.0}]).startswith("unknown")  # records kept from before end times
