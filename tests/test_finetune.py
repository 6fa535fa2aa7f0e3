"""`nfnet-zoo finetune`: the run folder contract, faults, interruption and exact resume, 2 processes.

References: timm's own loader (`local-dir:` create_model), safetensors files compared bit for bit with
an uninterrupted run, and a single-process run on the same global batch.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from _images import add_awkward_files, make_folder
from _procs import wait
import nfnet_zoo  # noqa: F401  (registers the variants)
from nfnet_zoo import NFNetZooError
from nfnet_zoo_cli import main as cli_main
from nfnet_zoo.training.finetune import METRIC_KEYS, finetune

# the shared data folder holds awkward files on purpose; their warnings are asserted where they matter
pytestmark = pytest.mark.filterwarnings("ignore:ignored 1 non-image", "ignore:skipped 2 unreadable")

TINY = dict(model="nfnet_zoo_tiny", img_size=32, batch_size=8, workers=0, pretrained=False)
# RNG-heavy on purpose: mixup, dropout, stochastic depth, flips and crops must all resume exactly.
RESUME_FLAGS = ["--model", "nfnet_zoo_tiny", "--img-size", "32", "-b", "8", "--epochs", "3", "--lr", "0.05",
                "--mixup", "0.4", "--drop", "0.2", "--drop-path", "0.1", "--seed", "7", "--clipping", "0.05"]


def _env(tmp_path: Path) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS="1")
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


def _spawn(cmd: list[str], tmp_path: Path) -> subprocess.Popen:
    # own session: a timed-out launcher and its workers are killed together
    return subprocess.Popen(cmd, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _cli(args: list[str], tmp_path: Path) -> subprocess.Popen:
    return _spawn([sys.executable, "-m", "nfnet_zoo_cli", *args], tmp_path)


def _run_cli(args: list[str], tmp_path: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    return wait(_cli(args, tmp_path), timeout)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = make_folder(tmp_path_factory.mktemp("data") / "shapes", n_train=16, n_val=4)
    add_awkward_files(root / "train" / "mid")  # converted or skipped, never fatal
    return root


@pytest.fixture(scope="module")
def run(data_dir, tmp_path_factory) -> Path:
    with pytest.warns(UserWarning, match="unreadable"):
        return finetune(data_dir=str(data_dir), output=str(tmp_path_factory.mktemp("runs") / "run"), epochs=2,
                        lr=0.05, **TINY)


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    r = _run_cli(["finetune", *RESUME_FLAGS, "--data-dir", str(data_dir), "--output", str(out), "-j", "0"],
                 tmp_path_factory.mktemp("env"))
    assert r.returncode == 0, r.stderr
    return out


# --- the run folder ---------------------------------------------------------------------------
def test_run_folder_contract(run, data_dir):
    for name in ("model.safetensors", "config.json", "last/model.safetensors", "last/config.json", "metrics.jsonl",
                 "args.json", "summary.json", "data.json", "state"):
        assert (run / name).exists(), name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all(set(r) == set(METRIC_KEYS) for r in rows)
    assert all(0 <= r["clipped_fraction"] <= 1 and r["images_per_sec"] > 0 for r in rows)
    summary = json.loads((run / "summary.json").read_text())
    best = max(rows, key=lambda r: r["top1"])  # first of equal maxima, as training keeps the first
    assert summary["best_epoch"] == best["epoch"] and summary["top1"] == best["top1"]
    assert summary["label_names"] == ["bright", "dark", "mid"] and summary["num_classes"] == 3
    assert summary["stopped"] == "after --epochs 2" and summary["epochs_trained"] == 2
    assert summary["num_train"] == 48 + 5 and summary["num_val"] == 12  # 5 awkward files kept, 2 skipped
    args = json.loads((run / "args.json").read_text())
    assert args["model"] == "nfnet_zoo_tiny" and args["base_model"] is None and args["dataset"] == "shapes"
    assert args["clipping"] == 0.01 and args["img_size"] == 32 and args["pretrained"] is False
    if summary["best_epoch"] == 2:
        assert _same(_weights(run), _weights(run / "last"))


def test_run_folder_has_its_training_curves(run):
    from PIL import Image
    from nfnet_zoo.training.curves import curves_png, run_title

    with Image.open(run / "curves.png") as im:
        assert im.format == "PNG" and im.size == (1000, 700)
    # drawn from the last epoch's rows: the same picture as the rows on disk make (tests/test_curves.py checks
    # what a picture of given rows holds)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    args = json.loads((run / "args.json").read_text())
    assert (run / "curves.png").read_bytes() == curves_png(rows, run_title(run, args), args["clipping"])
    assert "![Training curves](curves.png)" in (run / "README.md").read_text()


def test_result_loads_with_timm_local_dir(run):
    import re

    import timm
    # the model id the run's card shows is the one that loads it
    [model_id] = re.findall(r'timm\.create_model\("(local-dir:[^"]+)"', (run / "README.md").read_text())
    assert model_id == f"local-dir:{run}"
    model = timm.create_model(model_id, pretrained=True)
    assert _same({k: v for k, v in model.state_dict().items()}, _weights(run))
    assert model.pretrained_cfg["label_names"] == ["bright", "dark", "mid"]
    assert model.pretrained_cfg["test_input_size"][-1] == 32
    assert model.pretrained_cfg["test_crop_pct"] == pytest.approx(32 / 64)  # DeepMind: squash to S+32, crop S


def test_checkpoint_with_other_classes_gets_a_new_head(run, tmp_path):
    data = make_folder(tmp_path / "two", n_train=4, n_val=1, classes=("dark", "bright"))
    with pytest.warns(UserWarning, match="trained on other classes"):
        out = finetune(data_dir=str(data), output=str(tmp_path / "ft"), checkpoint=str(run), epochs=1,
                       model=None, **{k: v for k, v in TINY.items() if k not in ("model", "pretrained")})
    assert json.loads((out / "args.json").read_text())["model"] == "nfnet_zoo_tiny"
    start, end = _weights(run), _weights(out / "last")
    assert end["head.fc.weight"].shape == (2, start["head.fc.weight"].shape[1])


# --- faults: one line, exit code 2, nothing lost ----------------------------------------------------
@pytest.mark.parametrize("extra, message", [
    (["--model", "nfnet_f9"], "unknown model 'nfnet_f9'; closest: .*nfnet_f"),
    (["--model", "nfnet_zoo_tiny", "-b", "512", "--no-pretrained"], "fewer than one batch .*--batch-size"),
    (["--model", "nfnet_zoo_tiny", "--model-kwargs", "widths=(8,16)", "--checkpoint", "RUN"], "does not fit"),
])
def test_cli_faults_are_one_line(extra, message, data_dir, run, tmp_path, capsys):
    extra = [str(run) if e == "RUN" else e for e in extra]
    code = cli_main(["finetune", "--data-dir", str(data_dir), "--output", str(tmp_path / "o"), "-j", "0", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("nfnet-zoo finetune: error: ") and __import__("re").search(message, err[-1]), err


def test_resume_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    assert cli_main(["finetune", "--resume", str(tmp_path / "x")]) == 2
    assert "is not a fine-tuning run" in capsys.readouterr().err


def test_existing_run_is_never_overwritten(run, data_dir, capsys):
    before = _weights(run)
    assert cli_main(["finetune", "--model", "nfnet_zoo_tiny", "--data-dir", str(data_dir), "--output", str(run)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert _same(before, _weights(run))


def test_pretrained_weights_not_cached_names_the_ways_out(data_dir, tmp_path):
    r = _run_cli(["finetune", "--model", "nfnet_f0", "--data-dir", str(data_dir), "--output", str(tmp_path / "o"),
                  "-j", "0"], tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert "not in the local cache" in line and "--no-pretrained" in line and "--checkpoint" in line


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    import importlib
    ft = importlib.import_module("nfnet_zoo.training.finetune")  # the module (the package exports a function of that name)
    real = ft.build_losses
    calls = {"n": 0}

    def poisoned(cfg, num_classes, *labels):
        mixup, loss_fn = real(cfg, num_classes, *labels)

        def loss(out, y):
            calls["n"] += 1
            return loss_fn(out, y) * (float("nan") if calls["n"] > 8 else 1.0)  # epoch 2 of 6-step epochs
        return mixup, loss
    monkeypatch.setattr(ft, "build_losses", poisoned)
    out = tmp_path / "run"
    with pytest.raises(NFNetZooError, match="diverged.*epoch 2.*last good state") as e:
        finetune(data_dir=str(data_dir), output=str(out), epochs=3, save_every=0, log_interval=1, **TINY)
    assert "\n" not in str(e.value)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert (out / "curves.png").read_bytes().startswith(b"\x89PNG")  # drawn at the end of epoch 1, not of the run
    for path in (out, out / "last", out / "state"):
        assert all(torch.isfinite(t).all() for t in _weights(path).values()), path


# --- interruption and exact resume -----------------------------------------------------------------
def _wait_for_state(proc: subprocess.Popen, run: Path, timeout: float = 180) -> None:
    t = time.monotonic()
    while not (run / "state").is_dir():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t < timeout
        time.sleep(0.02)


def test_sigkill_then_resume_ends_with_the_same_weights(uninterrupted, data_dir, tmp_path):
    out = tmp_path / "run"
    # another worker count than the reference: the data order and augmentation must not depend on it
    p = _cli(["finetune", *RESUME_FLAGS, "--data-dir", str(data_dir), "--output", str(out), "-j", "1",
              "--save-every", "1"], tmp_path)
    _wait_for_state(p, out)
    time.sleep(0.1)
    p.send_signal(signal.SIGKILL)
    p.communicate()
    done = len((out / "metrics.jsonl").read_text().splitlines()) if (out / "metrics.jsonl").exists() else 0
    assert done < 3, "the run finished before it was killed; the test proves nothing"
    r = _run_cli(["finetune", "--resume", str(out), "-j", "0"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stdout
    assert _same(_weights(out / "last"), _weights(uninterrupted / "last"))
    assert _same(_weights(out), _weights(uninterrupted))
    drop = lambda p: [{k: v for k, v in json.loads(x).items() if k != "images_per_sec"}
                      for x in (p / "metrics.jsonl").read_text().splitlines()]
    assert drop(out) == drop(uninterrupted)


def test_ctrl_c_saves_state_exits_cleanly_and_resumes(uninterrupted, data_dir, tmp_path):
    out = tmp_path / "run"
    p = _cli(["finetune", *RESUME_FLAGS, "--data-dir", str(data_dir), "--output", str(out), "-j", "0",
              "--save-every", "4"], tmp_path)
    _wait_for_state(p, out)
    p.send_signal(signal.SIGINT)
    err = wait(p, timeout=120).stderr
    assert p.returncode == 130 and "Traceback" not in err, err
    # the state appears at step 4 of a 3-epoch run: the interrupt lands long before its end
    assert "stopped at epoch" in err, err
    assert "--resume" in err
    r = _run_cli(["finetune", "--resume", str(out)], tmp_path)
    assert r.returncode == 0, r.stderr
    assert _same(_weights(out / "last"), _weights(uninterrupted / "last"))


def test_sigterm_to_the_whole_job_with_workers_saves_and_resumes(uninterrupted, data_dir, tmp_path):
    """What scancel and most schedulers do: SIGTERM to every process of the job, DataLoader workers included.
    The workers used to die first and the run ended in a "worker killed" traceback with nothing saved."""
    out = tmp_path / "run"
    p = _cli(["finetune", *RESUME_FLAGS, "--data-dir", str(data_dir), "--output", str(out), "-j", "2",
              "--save-every", "4"], tmp_path)
    _wait_for_state(p, out)
    time.sleep(0.3)  # the workers are running
    os.killpg(p.pid, signal.SIGTERM)
    err = wait(p, timeout=120).stderr
    assert p.returncode == 130 and "Traceback" not in err and "Error" not in err, err
    assert "stopped at epoch" in err and "--resume" in err, err
    r = _run_cli(["finetune", "--resume", str(out), "-j", "2"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert _same(_weights(out / "last"), _weights(uninterrupted / "last"))


# --- two processes -------------------------------------------------------------------------------
def test_two_processes_match_one_process_on_the_same_global_batch(data_dir, tmp_path):
    common = ["finetune", "--model", "nfnet_zoo_tiny", "--img-size", "32", "--epochs", "1", "--lr", "0.1",
              "--drop", "0", "--drop-path", "0", "--clipping", "0.02", "--data-dir", str(data_dir), "-j", "0",
              "--seed", "3", "--save-every", "0"]
    one = _run_cli([*common, "-b", "8", "--output", str(tmp_path / "one")], tmp_path)
    assert one.returncode == 0, one.stderr
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
              "-m", "nfnet_zoo_cli", *common, "-b", "4", "--output", str(tmp_path / "two")]
    two = wait(_spawn(launch, tmp_path), timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es)" in two.stdout
    a, b = _weights(tmp_path / "one" / "last"), _weights(tmp_path / "two" / "last")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    m1 = json.loads((tmp_path / "one" / "metrics.jsonl").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.jsonl").read_text())
    assert m1["clipped_fraction"] == pytest.approx(m2["clipped_fraction"], abs=1e-6)
    assert m1["train_loss"] == pytest.approx(m2["train_loss"], rel=1e-5)


def test_a_refusal_under_torchrun_leaves_the_process_group(tmp_path, capsys):
    # a process that exits with its gloo group alive can abort at exit (seen in CI: SIGABRT,
    # "terminate called without an active exception"), so every exit path of the CLI destroys it
    import torch.distributed as dist
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        assert cli_main(["finetune", "--resume"]) == 2
        assert "--resume needs the run folder" in capsys.readouterr().err
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("torchrun", [False, True])
def test_the_command_keeps_its_status_and_output_when_it_skips_teardown(tmp_path, torchrun):
    env = {k: v for k, v in os.environ.items() if k != "TORCHELASTIC_RUN_ID"}
    env.update(PYTHONPATH=os.pathsep.join(sys.path), **({"TORCHELASTIC_RUN_ID": "t"} if torchrun else {}))
    r = subprocess.run([sys.executable, "-m", "nfnet_zoo_cli", "finetune", "--resume"], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr == "nfnet-zoo finetune: error: --resume needs the run folder: " \
        "--resume RUN (or --output RUN --resume)\n"


@pytest.mark.filterwarnings("ignore:`log_with=tensorboard`")
def test_missing_tracker_package_is_an_error_not_lost_curves(data_dir, tmp_path, capsys, monkeypatch):
    import accelerate.tracking
    from accelerate.utils import LoggerType
    # as if tensorboard were not installed, whether or not it is (Accelerate lists trackers at import)
    monkeypatch.setattr(accelerate.tracking, "_available_trackers",
                        [t for t in accelerate.tracking._available_trackers if t != LoggerType.TENSORBOARD])
    args = ["finetune", *RESUME_FLAGS[:6], "--data-dir", str(data_dir), "--output", str(tmp_path / "o"),
            "--report-to", "tensorboard"]
    assert cli_main(args) == 2
    assert "pip install tensorboard" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# --- the demo's data -------------------------------------------------------------------------------
def test_demo_digits_folder_is_scikit_learns_digits(tmp_path):
    from sklearn.datasets import load_digits
    from nfnet_zoo.demo import build_digits_folder
    from PIL import Image
    digits = load_digits()
    root = build_digits_folder(tmp_path / "digits")
    files = sorted(root.glob("*/*/*.png"))
    assert len(files) == 1797
    val = [f for f in files if f.parts[-3] == "val"]
    assert len(val) == 360  # 20% stratified: every digit in both splits
    assert {f.parent.name for f in val} == {str(d) for d in range(10)}
    for f in files[::97]:
        i = int(f.stem)
        assert f.parent.name == str(digits.target[i])
        img = np.asarray(Image.open(f).resize((20, 20), Image.BOX), dtype=np.float64)[6:14, 6:14]
        assert np.corrcoef(img.ravel(), digits.images[i].ravel())[0, 1] > 0.9
    assert build_digits_folder(tmp_path / "digits") == root  # reused, not rebuilt


def test_a_run_stopped_before_its_first_save_starts_again(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "data.json").write_text("{}")  # what a run interrupted while checking images leaves
    (out / "args.json").write_text("{}")
    (out / "curves.png").write_bytes(b"")  # drawn at the end of an epoch whose state a kill prevented
    assert cli_main(["finetune", "--resume", str(out)]) == 2
    assert "start it again with the same command" in capsys.readouterr().err
    finetune(data_dir=str(data_dir), output=str(out), epochs=1, **TINY)
    assert (out / "model.safetensors").is_file()
    assert (out / "curves.png").read_bytes().startswith(b"\x89PNG")  # replaced by this run's
