"""The resumable state (runstate.py) under two processes: each writes its own RNG file, the main process
the replicated model and optimizer, and a run killed and resumed with two processes ends with the weights
of one never interrupted (the reference: that uninterrupted 2-process run, compared bit for bit)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from _images import make_folder
from _procs import wait

FLAGS = ["--model", "nfnet_zoo_tiny", "--img-size", "32", "-b", "4", "--epochs", "2", "--lr", "0.05", "--mixup", "0.4",
         "--drop", "0.2", "--drop-path", "0.1", "--seed", "5", "--clipping", "0.05", "-j", "0", "--no-pretrained"]


def _launch(args: list, tmp_path: Path) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1")
    env.pop("PYTEST_CURRENT_TEST", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "nfnet_zoo_cli", "finetune", *map(str, args)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _finish(p: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    r = wait(p, timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    """SIGKILL (or `sig`) a launcher and its workers (torchrun starts each worker in a session of its own)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    for child in children:
        _kill_tree(int(child), sig)
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def test_two_processes_killed_and_resumed_end_with_the_same_weights(tmp_path):
    data = make_folder(tmp_path / "data", n_train=40, n_val=2)  # 15 steps an epoch: killed well before the end
    ref, run = tmp_path / "ref", tmp_path / "run"
    _finish(_launch([*FLAGS, "--data-dir", data, "--output", ref, "--save-every", "0"], tmp_path))
    p = _launch([*FLAGS, "--data-dir", data, "--output", run, "--save-every", "2"], tmp_path)
    t = time.monotonic()
    while not (run / "state" / "manifest.json").is_file():
        assert p.poll() is None and time.monotonic() - t < 240, p.communicate()
        time.sleep(0.02)
    _kill_tree(p.pid)
    p.communicate()
    manifest = json.loads((run / "state" / "manifest.json").read_text())
    assert manifest["processes"] == 2 and {"rng_0.json", "rng_1.json"} <= set(manifest["files"])
    done = len((run / "metrics.jsonl").read_text().splitlines()) if (run / "metrics.jsonl").exists() else 0
    assert done < 2, "the run finished before it was killed; the test proves nothing"
    r = _finish(_launch(["--resume", run], tmp_path))
    assert "resuming" in r.stdout
    for sub in ("last", "."):
        a, b = load_file(ref / sub / "model.safetensors"), load_file(run / sub / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub


def test_sigterm_to_every_process_of_a_two_process_job_saves_and_resumes(tmp_path):
    """What scancel does: SIGTERM to torchrun, both training processes and their DataLoader workers. The workers
    used to die first: "DataLoader worker ... is killed by signal" and nothing saved at the stop."""
    data = make_folder(tmp_path / "data", n_train=40, n_val=2)
    run = tmp_path / "run"
    p = _launch([*FLAGS, "-j", "1", "--data-dir", data, "--output", run, "--save-every", "2"], tmp_path)
    t = time.monotonic()
    while not (run / "state" / "manifest.json").is_file():
        assert p.poll() is None and time.monotonic() - t < 240, p.communicate()
        time.sleep(0.02)
    time.sleep(0.5)
    _kill_tree(p.pid, signal.SIGTERM)
    err = wait(p, 200).stderr
    # torchrun itself reports the signal (its SignalException); the training processes save and stop
    assert err.count("stopped at epoch") == 1 and "state saved" in err, err[-3000:]
    assert "killed by signal" not in err and "RuntimeError" not in err, err[-3000:]
    done = len((run / "metrics.jsonl").read_text().splitlines()) if (run / "metrics.jsonl").exists() else 0
    assert done < 2, "the run finished before the signal; the test proves nothing"
    r = _finish(_launch(["--resume", run, "-j", "1"], tmp_path))
    assert "resuming" in r.stdout and len((run / "metrics.jsonl").read_text().splitlines()) == 2


def test_fsdp2_state_is_saved_whole_and_resumed_exactly(tmp_path):
    """torch's FSDP2 on two CPU processes: the state holds full tensors (rank 0 writes them, each process its
    generators) and a fresh sharded model resumed from it trains on bit for bit as the uninterrupted one."""
    worker = Path(__file__).parent / "_runstate_fsdp_worker.py"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent.parent / "src"),
                                                       os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, str(worker), str(tmp_path)], capture_output=True, text=True, timeout=300,
                       env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["progress"] == {"step": 3} and result["tensors"] > 50
    assert {"rng_0.json", "rng_1.json", "model.safetensors", "optimizer.safetensors"} <= set(result["files"])
    import timm
    import nfnet_zoo  # noqa: F401
    whole = timm.create_model("nfnet_zoo_tiny", num_classes=3).state_dict()  # unsharded: the shapes to find
    saved = load_file(tmp_path / "run" / "state" / "model.safetensors")
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in whole.items()}
    assert result["equal"]


class _OneProcess:
    """The part of accelerate.Accelerator that runstate.py uses, for one process with a CPU GradScaler (the fp16
    path Accelerate takes only on GPUs)."""

    process_index, is_main_process, num_processes = 0, True, 1

    def __init__(self, scaler=None):
        self.scaler = scaler

    def wait_for_everyone(self):
        pass


def _pieces(seed: int):
    import timm
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3
    import nfnet_zoo  # noqa: F401
    torch.manual_seed(seed)
    model = timm.create_model("nfnet_zoo_tiny", num_classes=3, drop_rate=0.2)
    opt = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05)  # step tensors and a betas tuple
    sched, _ = create_scheduler_v2(opt, sched="cosine", num_epochs=2, warmup_epochs=1, step_on_epochs=False,
                                   updates_per_epoch=4)
    return model, opt, sched, ModelEmaV3(model, decay=0.9), torch.amp.GradScaler("cpu", init_scale=2.0 ** 10,
                                                                                  growth_interval=2)


def _train(model, opt, sched, ema, scaler, start: int, n: int) -> None:
    import torch.nn.functional as F
    for i in range(start, start + n):
        x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 3, (4,))
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        sched.step_update(i + 1)
        ema.update(model, step=i + 1)


def test_adamw_ema_and_grad_scaler_resume_exactly(tmp_path):
    """The reference: the same objects trained on without a save/load in between, compared bit for bit."""
    from nfnet_zoo.training.runstate import load_run_state, save_run_state
    model, opt, sched, ema, scaler = _pieces(0)
    torch.manual_seed(1)
    _train(model, opt, sched, ema, scaler, 0, 3)
    save_run_state(_OneProcess(scaler), tmp_path, model, opt, sched, {"step": 3}, ema)
    _train(model, opt, sched, ema, scaler, 3, 3)
    model2, opt2, sched2, ema2, scaler2 = _pieces(5)
    torch.manual_seed(6)
    progress = load_run_state(_OneProcess(scaler2), tmp_path, model2, opt2, sched2, {"step": 0}, ema2)
    assert progress == {"step": 3}
    _train(model2, opt2, sched2, ema2, scaler2, 3, 3)
    for a, b in ((model, model2), (ema, ema2)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert scaler.state_dict() == scaler2.state_dict() and sched.state_dict() == sched2.state_dict()
    assert [tuple(g["betas"]) for g in opt2.param_groups] == [tuple(g["betas"]) for g in opt.param_groups]
