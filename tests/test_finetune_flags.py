"""Every fine-tuning flag in a short CPU run that checks its effect, and timm's augmentation, optimizers
and schedules by name.

References: timm's own transform, optimizer and scheduler factories built independently, a second run
of the same recipe in another form (NCHW for channels_last, one large batch for accumulation, eager
for torch.compile, float32 for bf16), the weights read back from the run folder, and the validation
loss recomputed from the exported weights with timm's loader.
"""
from __future__ import annotations

import importlib
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file

from _images import make_folder
import nfnet_zoo  # noqa: F401  (registers the variants)
from nfnet_zoo_cli import main as cli_main

ft = importlib.import_module("nfnet_zoo.training.finetune")  # the module (the package exports a function of that name)
recipe = importlib.import_module("nfnet_zoo.training.recipe")

# 48 training images in 6 batches of 8, 12 for validation; dropout and stochastic depth off so that runs
# of one recipe in two forms can be compared.
BASE = dict(model="nfnet_zoo_tiny", img_size=32, batch_size=8, workers=0, pretrained=False, epochs=1, lr=0.05,
            drop=0.0, drop_path=0.0, seed=5, save_every=0)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("data") / "levels", n_train=16, n_val=4)


def _run(data_dir: Path, out: Path, **overrides) -> Path:
    return ft.finetune(data_dir=str(data_dir), output=str(out), **{**BASE, **overrides})


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def _assert_close(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k, **tol)


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def baseline(data_dir, tmp_path_factory) -> Path:
    """The recipe in its plain form: float32, NCHW, batch 8, eager."""
    return _run(data_dir, tmp_path_factory.mktemp("runs") / "baseline")


def _spy(monkeypatch, name: str, after):
    """Wrap finetune's builder `name`; `after(result)` sees what it built."""
    real = getattr(ft, name)

    def wrapped(*args, **kwargs):
        out = real(*args, **kwargs)
        after(out)
        return out
    monkeypatch.setattr(ft, name, wrapped)


# --- timm's augmentation, optimizers and schedules ----------------------------------------------------
def test_randaugment_adamw_cosine_run_end_to_end(data_dir, tmp_path, monkeypatch):
    from nfnet_zoo.agc import weight_decay_groups
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler
    seen = {}
    _spy(monkeypatch, "build_model", lambda out: seen.setdefault("model", out[0]))
    _spy(monkeypatch, "build_optimizer", lambda out: seen.setdefault("optimizer", out))
    _spy(monkeypatch, "build_scheduler", lambda out: seen.setdefault("scheduler", out))
    _spy(monkeypatch, "build_loaders", lambda out: seen.setdefault("train_tf", out[0].dataset.transform))
    out = tmp_path / "run"
    code = cli_main(["finetune", "--model", "nfnet_zoo_tiny", "--no-pretrained", "--data-dir", str(data_dir),
                     "--output", str(out), "--img-size", "32", "-b", "8", "-j", "0", "--epochs", "2",
                     "--aa", "rand-m9-mstd0.5-inc1", "--opt", "adamw", "--lr", "1e-3", "--sched", "cosine",
                     "--warmup-epochs", "0", "--opt-kwargs", "betas=(0.8,0.99)"])
    assert code == 0
    args = json.loads((out / "args.json").read_text())
    assert (args["aa"], args["opt"], args["sched"]) == ("rand-m9-mstd0.5-inc1", "adamw", "cosine")
    assert any(type(t).__name__ == "RandAugment" for t in seen["train_tf"].transforms)
    # timm's AdamW (whatever class timm's factory gives for the name) over DeepMind's decay groups
    opt, model = seen["optimizer"], seen["model"]
    assert type(opt) is type(create_optimizer_v2([torch.zeros(1, requires_grad=True)], "adamw"))
    ours = [({id(p) for p in g["params"]}, g["weight_decay"]) for g in opt.param_groups]
    expected = [({id(p) for p in g["params"]}, g["weight_decay"]) for g in weight_decay_groups(model, 2e-5)]
    assert sorted(ours, key=lambda x: x[1]) == sorted(expected, key=lambda x: x[1])
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, 2e-5}
    assert all(g["betas"] == (0.8, 0.99) for g in opt.param_groups)
    # timm's cosine, per update: 12 updates, the lr of the last epoch's end is the schedule's at update 12
    sched = seen["scheduler"]
    assert isinstance(sched, CosineLRScheduler) and sched.t_in_epochs is False and sched.t_initial == 12
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["lr"] == pytest.approx(1e-3 * (1 + np.cos(np.pi * 6 / 12)) / 2)
    assert all(np.isfinite(r["train_loss"]) for r in rows)


def _train_samples(data_dir: Path, aa, epochs=(0, 1), index=3, model="nfnet_zoo_tiny"):
    """(dataset, [sample `index` at each epoch]) from the run's own loaders; crops and flips off."""
    from nfnet_zoo.data import load_image_data
    cfg = recipe.FinetuneConfig(model=model, data_dir=str(data_dir), img_size=32, batch_size=8, workers=0,
                                scale=(1.0, 1.0), hflip=0.0, aa=aa, seed=11)
    with torch.device("meta"):
        m = timm.create_model(model, num_classes=3)

    class _Acc:
        num_processes, device = 1, torch.device("cpu")
    data = load_image_data(str(data_dir), 0.1, "skip", 0)
    train, _, _ = recipe.build_loaders(cfg, data, m, _Acc())
    return train.dataset, [train.dataset[(index, e)][0] for e in epochs]


def test_randaugment_is_timms_and_visible(data_dir):
    from timm.data import create_transform, resolve_data_config
    from timm.data.auto_augment import RandAugment
    from nfnet_zoo.data import sample_seed
    aa = "rand-m9-mstd0.5-inc1"
    dataset, (e0, e1) = _train_samples(data_dir, aa)
    ra = [t for t in dataset.transform.transforms if isinstance(t, RandAugment)]
    assert len(ra) == 1 and ra[0].num_layers == 2
    # With full-image crops and no flips only RandAugment varies between epochs ...
    assert not torch.equal(e0, e1)
    _, (p0, p1) = _train_samples(data_dir, None)
    assert torch.equal(p0, p1)
    # ... and it is exactly timm's transform, built from the same arguments, on the sample's seed.
    with torch.device("meta"):
        dc = resolve_data_config(model=timm.create_model("nfnet_zoo_tiny"))
    reference = create_transform(32, is_training=True, scale=(1.0, 1.0), hflip=0.0, color_jitter=0.0,
                                 auto_augment=aa, interpolation=dc["interpolation"], mean=dc["mean"], std=dc["std"])
    key = dataset.samples[3][0]
    for epoch, ours in ((0, e0), (1, e1)):
        s = sample_seed(11, epoch, 3)
        random.seed(s), np.random.seed(s), torch.manual_seed(s)
        assert torch.equal(reference(dataset.opener(key)), ours)


def test_deepmind_randaugment_levels():
    assert [recipe.deepmind_randaugment(f"nfnet_f{i}") for i in (0, 1, 3, 7)] == [
        "rand-n4-m5", "rand-n4-m10", "rand-n4-m15-mmax15", "rand-n4-m15-mmax15"]
    assert recipe.deepmind_randaugment("nfnet_f2_plus.dm_in1k") == "rand-n4-m10"
    with pytest.raises(nfnet_zoo.NFNetZooError, match="--aa deepmind needs an NFNet-F variant"):
        recipe.deepmind_randaugment("resnet50")


def test_aa_deepmind_builds_the_variants_randaugment(data_dir):
    from timm.data.auto_augment import RandAugment
    dataset, _ = _train_samples(data_dir, "deepmind", epochs=(0,), model="nfnet_f3")
    ra = [t for t in dataset.transform.transforms if isinstance(t, RandAugment)][0]
    assert ra.num_layers == 4 and {op.magnitude for op in ra.ops} == {15} and ra.ops[0].magnitude_max == 15


@pytest.mark.parametrize("flags, words", [
    (["--opt", "adamx"], "--opt adamx: .*closest: adamax"),
    (["--aa", "rand-q9"], "--aa rand-q9 is not a timm augmentation policy"),
    (["--opt", "sgd", "--opt-kwargs", "bogus=1"], "--opt sgd: .*--opt-kwargs"),
    (["--aa", "deepmind"], "--aa deepmind needs an NFNet-F variant"),
    (["--sched", "step", "--decay-epochs", "0"], "--decay-epochs must be a number in .0, 100000., got 0.0"),
    (["--opt", "adamw", "--opt-kwargs", "betas=oops"], "--opt adamw: .*not supported.*; check --opt-kwargs"),
    (["--torchcompile", "nonsense"], "'NONSENSE' is not a valid DynamoBackend.*--torchcompile"),
])
def test_unknown_timm_names_are_one_line_errors(flags, words, data_dir, tmp_path, capsys):
    code = cli_main(["finetune", "--model", "nfnet_zoo_tiny", "--data-dir", str(data_dir), "--output",
                     str(tmp_path / "o"), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and __import__("re").search(words, err[0]), err
    assert not (tmp_path / "o").exists()


def test_plateau_schedule_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["finetune", "--model", "nfnet_zoo_tiny", "--data-dir", "x", "--sched", "plateau"])
    assert e.value.code == 2 and "invalid choice: 'plateau'" in capsys.readouterr().err


def test_multistep_schedule_decays_at_its_milestone_per_update(data_dir, tmp_path):
    run = _run(data_dir, tmp_path / "run", epochs=3, sched="multistep", decay_milestones=[1, 2], decay_rate=0.5,
               warmup_epochs=0)
    lrs = [json.loads(x)["lr"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    # each epoch's row holds the lr after its last update: milestones at updates 6 and 12 have passed
    assert lrs == pytest.approx([0.05 * 0.5, 0.05 * 0.25, 0.05 * 0.25])


# --- --model-ema ------------------------------------------------------------------------------------
def test_ema_is_made_from_the_prepared_model(data_dir, tmp_path, monkeypatch):
    """A model that `prepare` moves (here: to float64, a stand-in for cuda that a CPU can show) must have
    its EMA where it ends up; an EMA copied before `prepare` stays behind and cannot follow it."""
    from accelerate import Accelerator
    real = Accelerator.prepare_model

    def prepare_and_move(self, model, *args, **kwargs):
        model = real(self, model, *args, **kwargs).to(torch.float64)
        model.register_forward_pre_hook(lambda m, inputs: tuple(x.double() for x in inputs))  # batches follow
        return model
    monkeypatch.setattr(Accelerator, "prepare_model", prepare_and_move)
    run = _run(data_dir, tmp_path / "run", model_ema=True, model_ema_decay=0.5)
    weights = _weights(run / "last")
    assert {t.dtype for t in weights.values()} == {torch.float64}
    assert all(torch.isfinite(t).all() for t in weights.values())


def _val_loss_of_export(folder: Path, data_dir: Path) -> float:
    """Cross-entropy of the exported weights on the val images, with timm's loader and its eval transform."""
    from PIL import Image
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    cfg = timm.data.resolve_data_config({}, model=model, use_test_size=True)
    tf = timm.data.create_transform(**cfg)
    classes = model.pretrained_cfg["label_names"]
    files = sorted((data_dir / "val").glob("*/*.png"))
    x = torch.stack([tf(Image.open(f).convert("RGB")) for f in files])
    y = torch.tensor([classes.index(f.parent.name) for f in files])
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(model(x), y).item()


def test_ema_weights_are_the_ones_validated_and_exported(baseline, data_dir, tmp_path):
    # decay 0: the EMA is the model after every update, so the run is the baseline, exported through the EMA
    same = _run(data_dir, tmp_path / "decay0", model_ema=True, model_ema_decay=0.0)
    _assert_close(_weights(same / "last"), _weights(baseline / "last"), rtol=0, atol=0)
    ema = _run(data_dir, tmp_path / "ema", model_ema=True, model_ema_decay=0.7)
    exported = _weights(ema / "last")
    assert _max_diff(exported, _weights(baseline / "last")) > 1e-3  # averaged weights, not the model's
    # what was validated is what was exported (and differs from the model's validation)
    row = json.loads((ema / "metrics.jsonl").read_text())
    assert row["val_loss"] == pytest.approx(_val_loss_of_export(ema / "last", data_dir), rel=1e-4)
    assert row["val_loss"] != pytest.approx(json.loads((baseline / "metrics.jsonl").read_text())["val_loss"], rel=1e-3)


# --- precision, memory format, accumulation, compile ---------------------------------------------------
def _record_training_forward(monkeypatch, seen: dict):
    """Hooks on the built model: the input layout, the first conv's weight layout and output dtype in training."""
    def after(out):
        model = out[0]
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))

        def pre(m, inputs):
            if m.training:
                seen.setdefault("input_channels_last", []).append(
                    inputs[0].is_contiguous(memory_format=torch.channels_last))
                seen.setdefault("weight_channels_last", []).append(
                    conv.weight.is_contiguous(memory_format=torch.channels_last))

        def post(m, inputs, output):
            if m.training:
                seen.setdefault("dtypes", set()).add(output.dtype)
        model.register_forward_pre_hook(pre)
        conv.register_forward_hook(post)
    _spy(monkeypatch, "build_model", after)


def test_bf16_autocast_trains_in_bf16_and_ends_near_float32(baseline, data_dir, tmp_path, monkeypatch):
    seen = {}
    _record_training_forward(monkeypatch, seen)
    run = _run(data_dir, tmp_path / "bf16", mixed_precision="bf16")
    assert seen["dtypes"] == {torch.bfloat16}
    ours, ref = _weights(run / "last"), _weights(baseline / "last")
    assert {t.dtype for t in ours.values()} == {torch.float32}  # float32 master weights, exported as such
    assert 1e-5 < _max_diff(ours, ref) < 0.1


def test_channels_last_runs_channels_last_and_matches_nchw(baseline, data_dir, tmp_path, monkeypatch):
    seen = {}
    _record_training_forward(monkeypatch, seen)
    run = _run(data_dir, tmp_path / "cl", channels_last=True)
    assert all(seen["input_channels_last"]) and all(seen["weight_channels_last"]) and len(seen["dtypes"]) == 1
    _assert_close(_weights(run / "last"), _weights(baseline / "last"), rtol=1e-4, atol=1e-5)


def test_grad_accum_equals_the_large_batch(data_dir, tmp_path):
    large = _run(data_dir, tmp_path / "b16", batch_size=16)
    accum = _run(data_dir, tmp_path / "b8x2", batch_size=8, grad_accum_steps=2)
    assert json.loads((accum / "args.json").read_text())["grad_accum_steps"] == 2
    _assert_close(_weights(accum / "last"), _weights(large / "last"), rtol=1e-4, atol=1e-5)
    a, b = (json.loads((r / "metrics.jsonl").read_text()) for r in (accum, large))
    assert a["lr"] == b["lr"] and a["clipped_fraction"] == pytest.approx(b["clipped_fraction"], abs=1e-6)


def test_mixup_cutmix_train_on_timms_soft_targets(data_dir, tmp_path, monkeypatch):
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    seen = {"targets": []}

    def after(out):
        mixup, loss_fn = out
        seen["mixup"], seen["loss"] = mixup, loss_fn
        real_forward = loss_fn.forward
        loss_fn.forward = lambda x, target: (seen["targets"].append(target), real_forward(x, target))[1]
    _spy(monkeypatch, "build_losses", after)
    _run(data_dir, tmp_path / "mix", mixup=0.8, cutmix=1.0, smoothing=0.0)
    assert isinstance(seen["mixup"], Mixup) and isinstance(seen["loss"], SoftTargetCrossEntropy)
    assert seen["mixup"].mixup_alpha == 0.8 and seen["mixup"].cutmix_alpha == 1.0
    y = torch.cat(seen["targets"])
    assert y.shape == (48, 3) and y.dtype == torch.float32
    torch.testing.assert_close(y.sum(1), torch.ones(48))
    assert ((y > 0) & (y < 1)).any(1).float().mean() > 0.5  # most rows blend two labels


def test_drop_path_sets_the_blocks_rates(data_dir, tmp_path, monkeypatch):
    seen = {}
    _spy(monkeypatch, "build_model", lambda out: seen.setdefault("model", out[0]))
    _run(data_dir, tmp_path / "dp", drop_path=0.4, drop=0.3)
    model = seen["model"]
    rates = [getattr(m, "rate", getattr(m, "drop_prob", None)) for n, m in model.named_modules()
             if n.endswith("drop_path")]
    n = len(rates)
    assert n == 5 and rates == pytest.approx([0.4 * i / n for i in range(n)])  # DeepMind: rate * index / blocks
    assert model.drop_rate == 0.3


def test_checkpoint_starts_from_its_weights(baseline, data_dir, tmp_path):
    start = _weights(baseline)
    # a learning rate too small to move the weights: the run ends where it started
    run = _run(data_dir, tmp_path / "ckpt", model=None, checkpoint=str(baseline), lr=1e-12, weight_decay=0.0,
               warmup_epochs=0)
    _assert_close(_weights(run / "last"), start, rtol=0, atol=1e-6)
    fresh = _run(data_dir, tmp_path / "fresh", lr=1e-12, weight_decay=0.0, warmup_epochs=0)
    assert _max_diff(_weights(fresh / "last"), start) > 1e-2


def test_torchcompile_trains_the_compiled_model_like_eager(data_dir, tmp_path):
    from torch._dynamo.utils import counters
    torch._dynamo.reset()  # shapes compiled by earlier tests would make dynamo trace this one dynamic (slow)
    counters.clear()
    # aot_eager: the graphs dynamo and AOT autograd hand Inductor, run without Inductor's C++ codegen,
    # which took over 10 minutes for this training graph on the 2-core CI machine. Inductor itself is
    # tested on the model (test_inductor_computes_the_eager_logits, optimize_for_inference's freezing).
    # batch 4: 12 training steps and 3 validation batches of one shape each (no shape recompiles)
    small = dict(img_size=16, batch_size=4)
    eager = _run(data_dir, tmp_path / "eager", **small)
    compiled = _run(data_dir, tmp_path / "compiled", torchcompile="aot_eager", **small)
    assert counters["stats"]["unique_graphs"] > 0  # dynamo captured the training model
    assert json.loads((compiled / "args.json").read_text())["torchcompile"] == "aot_eager"
    _assert_close(_weights(compiled / "last"), _weights(eager / "last"), rtol=1e-3, atol=1e-4)
    # the export is the plain module's state dict (no `_orig_mod.` prefix) and loads with timm
    model = timm.create_model(f"local-dir:{compiled}", pretrained=True)
    assert set(model.state_dict()) == set(_weights(compiled))


def test_default_workers_stay_within_the_cpus_available():
    """On a machine with one CPU for us, the default -j of finetune, evaluate and demo passes torch's own
    check of the worker count (DataLoader.check_worker_number_rationality warns above it)."""
    script = """
import os, warnings
os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
from torch.utils.data import DataLoader
from nfnet_zoo_cli import build_parser
from nfnet_zoo.training.recipe import FinetuneConfig
parse = build_parser().parse_args
counts = [FinetuneConfig(model="m", data_dir="d").workers, parse(["evaluate", "m", "--data-dir", "d"]).workers,
          parse(["demo"]).workers]
warnings.simplefilter("error")
for n in counts:
    DataLoader(range(4), num_workers=n).check_worker_number_rationality()
print(counts)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[1, 1, 1]", r.stderr[-2000:]
