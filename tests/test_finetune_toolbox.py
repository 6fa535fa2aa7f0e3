"""The fine-tuning toolbox of issue 23: --freeze-epochs, --layer-decay, --grad-checkpointing, --patience.

References: the starting weights themselves (torch.equal), timm's own `param_groups_layer_decay` and a hand
computation of its formula, an uninterrupted run (exact resume), the run without the flag (checkpointing), and
the epochs a run whose val top-1 cannot improve must stop at.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from _images import make_folder
from _procs import wait
import nfnet_zoo  # noqa: F401  (registers the variants)
import nfnet_zoo.training.finetune as ft
from nfnet_zoo.training.progress import StopRequest

# 48 training images in 6 batches of 8, 12 for validation; dropout and stochastic depth off
BASE = dict(model="nfnet_zoo_tiny", img_size=32, batch_size=8, workers=0, epochs=2, lr=0.05, drop=0.0,
            drop_path=0.0, seed=5, save_every=0, check_images="none")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("data") / "levels", n_train=16, n_val=4)


def _tiny() -> torch.nn.Module:
    """nfnet_zoo_tiny for 3 classes, seeded, its skip gains 0.5: at SkipInit's 0 every residual branch would get a
    zero gradient, and a test of what moves would prove little."""
    torch.manual_seed(0)
    model = timm.create_model("nfnet_zoo_tiny", num_classes=3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("skipinit_gain"):
                p.fill_(0.5)
    return model


@pytest.fixture(scope="module")
def start(tmp_path_factory) -> Path:
    """Starting weights as a .safetensors file (no label names: the classifier is kept, 3 classes)."""
    model = _tiny()
    path = tmp_path_factory.mktemp("start") / "start.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _run(data_dir: Path, out: Path, **overrides) -> Path:
    return ft.finetune(data_dir=str(data_dir), output=str(out), **{**BASE, **overrides})


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _record_epochs(monkeypatch) -> list[dict]:
    """The trained weights and the EMA's (the exported ones) at each epoch's end."""
    seen: list[dict] = []
    real = ft._end_of_epoch

    def spy(t, metrics):
        copy = lambda m: {k: v.detach().clone() for k, v in m.state_dict().items()}
        seen.append({"model": copy(t.unwrapped), "export": copy(ft._unwrap(t.accelerator, t.eval_model)),
                     "lrs": [g["lr"] for g in t.optimizer.param_groups]})
        real(t, metrics)
    monkeypatch.setattr(ft, "_end_of_epoch", spy)
    return seen


HEAD = ("head.fc.weight", "head.fc.bias")


# --- --freeze-epochs ------------------------------------------------------------------------------------------
def test_freeze_epochs_train_only_the_classifier_then_everything(data_dir, start, tmp_path, monkeypatch):
    """EMA, accumulation, weight decay, momentum and AGC all on: none of them may move a frozen weight."""
    seen = _record_epochs(monkeypatch)
    _run(data_dir, tmp_path / "run", checkpoint=str(start), epochs=2, freeze_epochs=1, model_ema=True,
         model_ema_decay=0.5, grad_accum_steps=2, weight_decay=0.1, clipping=0.05)
    begin = load_file(start)
    backbone = [k for k in begin if k not in HEAD]
    assert len(backbone) > 20
    for kind in ("model", "export"):
        after_frozen = seen[0][kind]
        assert all(torch.equal(after_frozen[k], begin[k]) for k in backbone), kind
        assert all(not torch.equal(after_frozen[k], begin[k]) for k in HEAD), kind
        after = seen[1][kind]  # unfrozen: every backbone weight moves
        moved = [k for k in backbone if not torch.equal(after[k], begin[k])]
        assert len(moved) == len(backbone), sorted(set(backbone) - set(moved))


def test_freeze_epochs_give_each_phase_timms_schedule():
    """fastai's fine_tune: the frozen epochs and the rest each run --sched with its own warmup (the loop calls
    step_update with the run's update count, as here)."""
    from timm.scheduler import create_scheduler_v2
    from nfnet_zoo.training.recipe import FinetuneConfig, build_scheduler

    def lrs(epochs: int, updates: range, **cfg) -> list[float]:
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05)
        if cfg:
            sched = build_scheduler(FinetuneConfig(epochs=epochs, warmup_epochs=0.5, **cfg), opt, 6)
        else:  # the reference: timm's cosine for a run of `epochs`
            sched, _ = create_scheduler_v2(opt, sched="cosine", num_epochs=epochs, warmup_epochs=0.5, warmup_lr=0.0,
                                           min_lr=0.0, step_on_epochs=False, updates_per_epoch=6)
        out = []
        for update in updates:
            sched.step_update(update)
            out.append(opt.param_groups[0]["lr"])
        return out
    # 3 epochs of 6 updates, the first frozen: updates 0-5 are a 1-epoch schedule, 6-17 a fresh 2-epoch one
    assert lrs(3, range(18), freeze_epochs=1) == lrs(1, range(6)) + lrs(2, range(12))
    assert lrs(2, range(12), freeze_epochs=2) == lrs(2, range(12))  # a linear probe: one schedule
    assert lrs(3, range(18), freeze_epochs=1)[6:9] == [0.0, 0.05 / 3, 0.05 * 2 / 3]  # the second warmup


class _StopAtUpdate(StopRequest):
    """Ctrl-C, as the loop sees it, at its `at`-th look (once per optimizer update with one process)."""

    at = 0

    def __init__(self):
        super().__init__()
        self.looks = 0

    @property
    def requested(self) -> bool:
        self.looks += 1
        return self.looks >= self.at

    @requested.setter
    def requested(self, value: bool) -> None:
        pass


def test_a_run_stopped_while_frozen_resumes_exactly(data_dir, start, tmp_path, monkeypatch):
    args = dict(checkpoint=str(start), epochs=2, freeze_epochs=1, model_ema=True, grad_accum_steps=2,
                drop=0.2, drop_path=0.1, mixup=0.4)
    whole = _run(data_dir, tmp_path / "whole", **args)
    _StopAtUpdate.at = 2  # 3 updates per epoch: the middle of the first (frozen) epoch
    monkeypatch.setattr(ft, "StopRequest", _StopAtUpdate)
    with pytest.raises(KeyboardInterrupt):
        _run(data_dir, tmp_path / "cut", **args)
    assert not (tmp_path / "cut" / "metrics.jsonl").exists()
    monkeypatch.undo()
    cut = ft.finetune(resume=str(tmp_path / "cut"))
    for folder in ("last", "state", "."):
        assert _same(_weights(cut / folder), _weights(whole / folder)), folder
    assert _same(load_file(cut / "state" / "ema.safetensors"), load_file(whole / "state" / "ema.safetensors"))
    begin, after = load_file(start), _weights(whole / "last")
    assert any(not torch.equal(after[k], begin[k]) for k in begin if k not in HEAD)  # epoch 2 trained the backbone


def test_a_linear_probe_resumed_with_more_epochs_then_trains_everything(start, tmp_path):
    """--freeze-epochs = --epochs, then --resume --epochs more: the second phase's own schedule, from its warmup."""
    data = make_folder(tmp_path / "small", n_train=8, n_val=4)  # 24 images: 3 updates per epoch
    run = _run(data, tmp_path / "probe", checkpoint=str(start), epochs=1, freeze_epochs=1)
    begin = load_file(start)
    assert all(torch.equal(_weights(run / "last")[k], begin[k]) for k in begin if k not in HEAD)
    ft.finetune(resume=str(run), epochs=3)
    after = _weights(run / "last")
    assert all(not torch.equal(after[k], begin[k]) for k in begin if k not in HEAD)
    # a 2-epoch cosine of 6 updates, 3 of warmup, from update 3 of the run: after epoch 2 it stands at its middle
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == pytest.approx([0.0, 0.025, 0.0], abs=1e-15)


def test_freeze_epochs_under_two_processes(data_dir, start, tmp_path):
    """DDP: the frozen phase drops the all-reduced gradients; a linear probe under torchrun keeps the backbone."""
    out = tmp_path / "two"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
              "nfnet_zoo_cli", "finetune", "--model", "nfnet_zoo_tiny", "--checkpoint", str(start), "--img-size", "32", "-b", "4", "--epochs", "1",
              "--freeze-epochs", "1", "--lr", "0.1", "--data-dir", str(data_dir), "-j", "0", "--save-every", "0",
              "--check-images", "none", "--output", str(out)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    r = wait(subprocess.Popen(launch, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True), 300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es)" in r.stdout
    begin, after = load_file(start), _weights(out / "last")
    assert all(torch.equal(after[k], begin[k]) for k in begin if k not in HEAD)
    assert all(not torch.equal(after[k], begin[k]) for k in HEAD)


@pytest.mark.parametrize("epochs, freeze", [(2, 3), (1, 100_000)])
def test_freeze_epochs_beyond_the_run_are_refused_in_one_line(epochs, freeze, data_dir, tmp_path, capsys):
    from nfnet_zoo_cli import main
    assert main(["finetune", "--model", "nfnet_zoo_tiny", "--data-dir", str(data_dir), "--output",
                 str(tmp_path / "r"), "--epochs", str(epochs), "--freeze-epochs", str(freeze)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"nfnet-zoo finetune: error: --freeze-epochs {freeze} is more than --epochs {epochs}; pass "
                   f"--epochs {freeze} or more, or --freeze-epochs {epochs} or fewer (equal: a linear probe) in a "
                   f"new run"], err
    assert not (tmp_path / "r").exists()


# --- --layer-decay --------------------------------------------------------------------------------------------
def _layer_of(name: str, blocks: list[str]) -> int:
    """timm's layer id by hand: the stem 0, each block (stages.i.j) one more, final_conv with the last block (our
    group_matcher gives it timm's MATCH_PREV_GROUP), the classifier (matched by nothing) the last."""
    if name.startswith("stem"):
        return 0
    if name.startswith("final_conv"):
        return len(blocks)
    block = next((b for b in blocks if name.startswith(b + ".")), None)
    return blocks.index(block) + 1 if block else len(blocks) + 1


def test_layer_decay_scales_each_layer_as_timms_formula_and_keeps_the_decay_set(start):
    from nfnet_zoo.agc import clipped_parameters
    from nfnet_zoo.training.recipe import FinetuneConfig, build_optimizer
    torch.manual_seed(0)
    model = timm.create_model("nfnet_zoo_tiny", num_classes=3)
    blocks = sorted({".".join(n.split(".")[:3]) for n, _ in model.named_parameters() if n.startswith("stages.")},
                    key=lambda b: tuple(map(int, b.split(".")[1:])))
    plain = build_optimizer(FinetuneConfig(), model, 0.1)
    decayed = build_optimizer(FinetuneConfig(layer_decay=0.7), model, 0.1)
    scale = {id(p): g["lr_scale"] for g in decayed.param_groups for p in g["params"]}
    layers = len(blocks) + 2
    for name, p in model.named_parameters():
        assert scale[id(p)] == pytest.approx(0.7 ** (layers - 1 - _layer_of(name, blocks)), rel=1e-12), name
    assert scale[id(model.stem.conv1.weight)] == pytest.approx(0.7 ** 6) and layers == 7  # 5 blocks
    assert scale[id(model.head.fc.weight)] == 1.0
    decay_set = lambda opt: {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decay_set(decayed) == decay_set(plain) and len(decay_set(plain)) > 10
    assert sum(len(g["params"]) for g in decayed.param_groups) == len(list(model.parameters()))
    clipped = {id(p) for p in clipped_parameters(model)}  # AGC's exclusion does not look at the groups
    assert id(model.head.fc.weight) not in clipped and len(clipped) == len(list(model.parameters())) - 1


def test_layer_decay_moves_early_layers_less_by_their_scale():
    """One SGD step through timm's scheduler: each weight moves by its layer's scale times its move without (in
    float64: a float32 difference of weights before and after loses the digits of a move 64 times smaller)."""
    from nfnet_zoo.training.recipe import FinetuneConfig, build_optimizer, build_scheduler
    x, y = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 1])
    moves = {}
    for layer_decay in (None, 0.5):
        model = _tiny().double()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        cfg = FinetuneConfig(layer_decay=layer_decay, warmup_epochs=0, epochs=1)
        opt = build_optimizer(cfg, model, 0.1)
        build_scheduler(cfg, opt, 10).step_update(0)
        torch.nn.functional.cross_entropy(model(x.double()), y).backward()
        opt.step()
        moves[layer_decay] = {n: p.detach() - before[n] for n, p in model.named_parameters()}
        scales = {n: g["lr_scale"] for g in opt.param_groups for n, p in model.named_parameters()
                  for q in g["params"] if p is q} if layer_decay else None
    stem, head = "stem.conv1.weight", "head.fc.weight"
    assert scales[stem] == pytest.approx(0.5 ** 6) and scales[head] == 1.0
    for name, move in moves[None].items():
        torch.testing.assert_close(moves[0.5][name], scales[name] * move, rtol=1e-9, atol=1e-15, msg=name)
    assert moves[0.5][stem].abs().max() < 0.1 * moves[None][stem].abs().max() != 0
    assert torch.equal(moves[0.5][head], moves[None][head])


# --- --grad-checkpointing -------------------------------------------------------------------------------------
def _saved_for_backward(checkpointing: bool) -> int:
    """Bytes autograd keeps from one training forward (batch 8): the storages of the tensors saved for backward,
    each once, as saved_tensors_hooks sees them. A checkpointed stage saves its input through the same hooks
    (torch.utils.checkpoint) and its inner activations not at all."""
    model = _tiny()
    model.set_grad_checkpointing(checkpointing)
    storages: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model(torch.randn(8, 3, 32, 32)).sum()
    return sum(storages.values())


def test_grad_checkpointing_keeps_less_for_backward():
    plain, checkpointed = _saved_for_backward(False), _saved_for_backward(True)
    assert checkpointed < 0.6 * plain, (checkpointed, plain)  # 3.5 MB instead of 6.9 MB when written


def test_grad_checkpointing_trains_to_the_same_weights(data_dir, start, tmp_path, monkeypatch):
    """Recomputing a stage in the backward pass runs the same kernels on the same inputs: the same bits (CPU)."""
    import nfnet_zoo.models.nfnet as nfnet
    calls = []
    real = nfnet.checkpoint_seq
    monkeypatch.setattr(nfnet, "checkpoint_seq", lambda *a, **k: calls.append(1) or real(*a, **k))
    plain = _run(data_dir, tmp_path / "plain", checkpoint=str(start), epochs=1)
    assert not calls
    checkpointed = _run(data_dir, tmp_path / "ckpt", checkpoint=str(start), epochs=1, grad_checkpointing=True)
    assert len(calls) >= 6  # every training step of the 6 went through it
    assert _same(_weights(checkpointed / "last"), _weights(plain / "last"))


# --- --patience -----------------------------------------------------------------------------------------------
def test_patience_stops_a_run_that_cannot_improve_and_resume_keeps_it_stopped(data_dir, start, tmp_path, capsys):
    """lr 1e-12 without weight decay leaves every weight's bits (a move below float32's resolution): val top-1 is
    epoch 1's at every epoch, never better, so --patience 1 stops after epoch 2 of 4."""
    from nfnet_zoo_cli import main
    rows = lambda run: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # it also carries --layer-decay (and a constant schedule): the lr it reports is the classifier's, not the stem's
    run = _run(data_dir, tmp_path / "run", checkpoint=str(start), epochs=4, lr=1e-12, weight_decay=0.0,
               warmup_epochs=0, sched="constant", layer_decay=0.5, patience=1)
    out = capsys.readouterr().out
    assert [r["epoch"] for r in rows(run)] == [1, 2]
    assert [r["lr"] for r in rows(run)] == [1e-12, 1e-12]
    assert rows(run)[0]["top1"] == rows(run)[1]["top1"]
    summary = json.loads((run / "summary.json").read_text())
    reason = "patience 1: val top-1 has not improved on epoch 1's"
    assert summary["stopped"].startswith(f"early at epoch 2 of 4: {reason}"), summary["stopped"]
    assert summary["epochs_trained"] == 2 and summary["best_epoch"] == 1
    assert f"stopped early at epoch 2 of 4: {reason}" in out
    assert "stopped early at epoch 2 of 4" in (run / "README.md").read_text()  # the model card
    assert (run / "last" / "model.safetensors").is_file() and (run / "model.safetensors").is_file()
    state = load_file(run / "state" / "model.safetensors")

    assert main(["finetune", "--resume", str(run), "--epochs", "5"]) == 0  # stopped early: it stays stopped
    assert f"stopped early at epoch 2 ({reason}" in capsys.readouterr().out
    assert len(rows(run)) == 2 and _same(load_file(run / "state" / "model.safetensors"), state)
    assert json.loads((run / "summary.json").read_text())["stopped"] == summary["stopped"].replace("of 4", "of 5")

    assert main(["finetune", "--resume", str(run), "--patience", "0", "--epochs", "3"]) == 0  # off: on to --epochs
    assert [r["epoch"] for r in rows(run)] == [1, 2, 3]
    assert json.loads((run / "summary.json").read_text())["stopped"] == "after --epochs 3"


def test_patience_without_a_val_split_never_stops(tmp_path):
    """The run above, without val images: --patience 1 would stop it after epoch 2."""
    data = make_folder(tmp_path / "flat", n_train=8, n_val=0, split=False)
    run = _run(data, tmp_path / "run", epochs=3, lr=1e-12, weight_decay=0.0, patience=1, val_split=0.0,
               pretrained=False)
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    assert json.loads((run / "summary.json").read_text())["stopped"] == "after --epochs 3"


def test_grad_checkpointing_of_a_timm_family_without_it_is_one_line(data_dir, tmp_path, capsys):
    from nfnet_zoo_cli import main
    assert main(["finetune", "--model", "dla46_c", "--no-pretrained", "--data-dir", str(data_dir), "--output",
                 str(tmp_path / "r"), "--img-size", "32", "-j", "0", "--check-images", "none",
                 "--grad-checkpointing"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["nfnet-zoo finetune: error: --grad-checkpointing: dla46_c does not support it (gradient "
                   "checkpointing not supported); leave the flag out"], err
