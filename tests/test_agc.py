"""AGC against DeepMind's SGD_AGC and optax AGC outputs, timm's adaptive_clip_grad, and training settings.

References: tests/data/deepmind/tiny_d1_sgd_agc_steps.npz and tiny_d1_agc_param_groups.json (written
by DeepMind's JAX code, see the README there) and `timm.utils.agc.adaptive_clip_grad`.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from timm.optim import create_optimizer_v2
from timm.utils.agc import adaptive_clip_grad as timm_adaptive_clip_grad

from _tiny_nfnet import batch, sgd, tiny
from nfnet_zoo import NFNetZooError, adaptive_clip_grad_, clipped_parameters, weight_decay_groups
from nfnet_zoo.models.convert import convert_haiku_checkpoint, load_haiku_checkpoint, timm_keys, to_torch_layout

DATA = Path(__file__).parent / "data" / "deepmind"


@pytest.fixture(scope="module")
def deepmind():
    """The reference steps, with `ref(prefix)` giving {our parameter name: tensor in our layout}."""
    steps = np.load(DATA / "tiny_d1_sgd_agc_steps.npz")
    manifest = json.loads((DATA / "tiny_d1_params_manifest.json").read_text())
    keys = timm_keys(load_haiku_checkpoint(DATA / "tiny_d1_haiku.npz"))
    flat = {e["flat_key"]: keys[(e["haiku_module"], e["param"])] for e in manifest}
    hyper = {k: float(steps[f"hyper.{k}"])
             for k in ("lr", "weight_decay", "clipping", "eps", "label_smoothing")}

    def ref(prefix):
        return {name: to_torch_layout(steps[f"{prefix}.{k}"], name) for k, name in flat.items()}

    return steps, ref, hyper, keys


@pytest.fixture(scope="module")
def converted_dir(tmp_path_factory):
    return convert_haiku_checkpoint(DATA / "tiny_d1_haiku.npz", tmp_path_factory.mktemp("tiny_d1"))


def _converted(converted_dir):
    return timm.create_model(f"local-dir:{converted_dir}", pretrained=True)


def _assert_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str):
    # Relative to the tensor's largest entry: float32 rounding (~1e-7), far below any semantic change.
    err = ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()
    assert err < tol, f"{what}: relative error {err:.2e} >= {tol:.0e}"


def test_two_sgd_agc_steps_match_deepmind(deepmind, converted_dir, device):
    steps, ref, hyper, _ = deepmind
    model = _converted(converted_dir).to(device)
    params = dict(model.named_parameters())
    optimizer = torch.optim.SGD(weight_decay_groups(model, hyper["weight_decay"]), lr=hyper["lr"],
                                momentum=0.9, nesterov=True)
    clipped = clipped_parameters(model)
    for step in (0, 1):
        grads = ref(f"step{step}.grad")  # DeepMind's gradients: the optimizer alone is under test
        for name, p in params.items():
            p.grad = grads[name].to(device, copy=True)
        stats = adaptive_clip_grad_(clipped, hyper["clipping"], hyper["eps"])
        assert 0 < stats.clipped_fraction() < 1
        optimizer.step()
        want_p, want_m = ref(f"step{step + 1}.param"), ref(f"step{step + 1}.momentum")
        for name, p in params.items():
            _assert_rel(p.detach().cpu(), want_p[name], 2e-6, f"step {step + 1} {name}")
            _assert_rel(optimizer.state[p]["momentum_buffer"].cpu(), want_m[name], 2e-6,
                        f"momentum {step + 1} {name}")


def test_optax_agc_on_all_params_matches_deepmind(deepmind, device):
    steps, ref, hyper, _ = deepmind
    for step in (0, 1):
        params, grads = ref(f"step{step}.param"), ref(f"step{step}.grad")
        want = ref(f"step{step}.agc_optax_clipped_grad_all")
        tensors = {}
        for name, value in params.items():
            tensors[name] = value.to(device, copy=True)
            tensors[name].grad = grads[name].to(device, copy=True)
        adaptive_clip_grad_(tensors.values(), hyper["clipping"], hyper["eps"])
        for name, t in tensors.items():
            _assert_rel(t.grad.cpu(), want[name], 2e-6, f"optax AGC step {step} {name}")
        # The reference distinguishes semantics: timm's clips gains element-wise, not as one unit.
        for name, t in tensors.items():
            t.grad = grads[name].to(device, copy=True)
        timm_adaptive_clip_grad(list(tensors.values()), hyper["clipping"], hyper["eps"])
        gain = next(n for n in tensors if n.endswith(".gain") and not torch.equal(tensors[n].grad.cpu(), want[n]))
        assert (tensors[gain].grad.cpu() - want[gain]).abs().max() > 1e-3 * want[gain].abs().max()


def test_model_backward_reproduces_deepmind_gradients(deepmind, converted_dir, device):
    # The whole chain: converted weights -> our forward/backward -> DeepMind's step-0 gradients.
    steps, ref, hyper, _ = deepmind
    model = _converted(converted_dir).eval().to(device)  # DeepMind ran is_training=False
    x = torch.from_numpy(steps["data.x_nhwc"]).permute(0, 3, 1, 2).to(device)
    labels = torch.from_numpy(steps["data.labels"]).long().to(device)
    loss = F.cross_entropy(model(x), labels, label_smoothing=hyper["label_smoothing"])
    loss.backward()
    assert loss.item() == pytest.approx(float(steps["step0.loss"]), rel=1e-6)
    want = ref("step0.grad")
    for name, p in model.named_parameters():
        _assert_rel(p.grad.cpu(), want[name], 3e-5, f"gradient of {name}")


def test_partition_matches_deepmind(deepmind, converted_dir):
    _, _, _, keys = deepmind
    groups = json.loads((DATA / "tiny_d1_agc_param_groups.json").read_text())
    ours = {f"{m}/{p}": name for (m, p), name in keys.items()}
    no_decay_clipped = {ours[k] for k in groups["gains_biases(no wd, clipped)"]}
    decay_not_clipped = {ours[k] for k in groups["fc_weights(wd, NOT clipped)"]}
    decay_clipped = {ours[k] for k in groups["weights(wd, clipped)"]}
    model = _converted(converted_dir)
    names = {id(p): n for n, p in model.named_parameters()}
    assert set(names.values()) == no_decay_clipped | decay_not_clipped | decay_clipped

    clipped = {names[id(p)] for p in clipped_parameters(model)}
    assert clipped == no_decay_clipped | decay_clipped
    timm_sgd = create_optimizer_v2(model, "sgd", lr=0.1, weight_decay=2e-5)
    assert timm_sgd.defaults["nesterov"] and timm_sgd.defaults["momentum"] == 0.9
    for optimizer_groups in (weight_decay_groups(model, 2e-5), timm_sgd.param_groups):
        decay = {names[id(p)] for g in optimizer_groups if g["weight_decay"] == 2e-5 for p in g["params"]}
        no_decay = {names[id(p)] for g in optimizer_groups if g["weight_decay"] == 0 for p in g["params"]}
        assert no_decay == no_decay_clipped
        assert decay == decay_clipped | decay_not_clipped


@pytest.mark.parametrize("top", [2.0, 1.1])  # about half the units clipped; a few
@pytest.mark.parametrize("shape", [(16, 8, 3, 3), (16, 1, 3, 3), (32, 16, 1, 1), (10, 64), (7, 3, 5), "cl"])
def test_matches_timm_on_weights(shape, top, device):
    # Where both define the unit (one per slice of dim 0), DeepMind's AGC and timm's coincide.
    torch.manual_seed(0)
    fmt = torch.channels_last if shape == "cl" else torch.contiguous_format
    shape = (32, 8, 3, 3) if shape == "cl" else shape
    ratio = torch.linspace(0.2, top, shape[0])[torch.randperm(shape[0])]  # ||g|| / (0.01 ||w||), roughly
    w = torch.randn(shape).contiguous(memory_format=fmt) if len(shape) == 4 else torch.randn(shape)
    g = (torch.randn(shape) * 0.01 * ratio.view(-1, *(1,) * (len(shape) - 1)))
    g = g.contiguous(memory_format=fmt) if len(shape) == 4 else g
    w[0] = 0  # a zero unit: eps floors its norm
    w, g = w.to(device), g.to(device)
    ours, theirs = w.clone(), w.clone()
    ours.grad, theirs.grad = g.clone(), g.clone()
    stats = adaptive_clip_grad_([ours], 0.01, 1e-3)
    timm_adaptive_clip_grad([theirs], 0.01, 1e-3)
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-6, atol=0)
    changed = (ours.grad != g).flatten(1).any(1)
    assert 0 < changed.sum() < shape[0]
    assert stats.clipped.item() == changed.sum().item() and stats.units == shape[0]


def test_one_call_over_many_tensors_matches_timm_per_tensor():
    # Units of all tensors are clipped in one pass; each tensor must get exactly its own scales back,
    # whether it has no clipped unit, a few, most, all, or no unit at all.
    torch.manual_seed(0)
    weights = [((8, 4, 3, 3), 0.5), ((64, 32), 1.1), ((0, 5), 2.0), ((12, 6, 1, 1), 3.0), ((4, 2, 3, 3), 1.1)]
    ours, theirs, grads = [], [], []
    for shape, top in weights:  # ratio ~ ||g_i|| / (0.01 ||w_i||): units above 1 are clipped
        ratio = torch.linspace(0.2, top, shape[0])[torch.randperm(shape[0])]
        grads.append(torch.randn(shape) * 0.01 * ratio.view(-1, *(1,) * (len(shape) - 1)))
    grads.append(torch.randn(32) * 0.1)  # a bias, one unit, clipped
    for g in grads:
        a = torch.randn(g.shape)
        b = a.clone()
        a.grad, b.grad = g.clone(), g.clone()
        ours.append(a)
        theirs.append(b)
    stats = adaptive_clip_grad_(ours, 0.01, 1e-3)
    for t in theirs:
        timm_adaptive_clip_grad([t], 0.01, 1e-3)
    changed = []
    for a, b, g in zip(ours, theirs, grads):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)
        diff = a.grad != g
        changed.append(int(diff.flatten(1).any(1).sum() if g.ndim > 1 else diff.any()))
    units = [len(g) if g.ndim > 1 else 1 for g in grads]
    assert changed[0] == 0 and 0 < changed[1] < units[1] / 4 and changed[3] > units[3] / 4
    assert changed[-1] == 1 and stats.clipped.item() == sum(changed) and stats.units == sum(units)


def test_low_precision_gradients_use_float32_norms():
    torch.manual_seed(0)
    w = torch.randn(64, 32, 3, 3)
    g = torch.randn(64, 32, 3, 3) * 0.02
    ref, low = w.clone(), w.clone().bfloat16()
    ref.grad, low.grad = g.clone(), g.bfloat16()
    adaptive_clip_grad_([ref])
    adaptive_clip_grad_([low])
    assert low.grad.dtype == torch.bfloat16
    torch.testing.assert_close(low.grad.float(), ref.grad, rtol=1.6e-2, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("clipping,clipped", [(1e4, "none"), (0.02, "a few"), (1e-9, "all")])
def test_low_precision_model_matches_the_float32_computation(dtype, clipping, clipped, device):
    # A model cast to bf16/fp16 (pure low-precision training, FSDP2 mixed precision): real
    # low-precision parameters and gradients, clipped against the float32 clipping of the same values.
    model = tiny().to(device=device, dtype=dtype)
    x, y = (t.to(device) for t in batch())
    F.cross_entropy(model(x.to(dtype)).float(), y).backward()
    params = clipped_parameters(model)
    wide = []
    for p in params:
        w = p.detach().float()
        w.grad = p.grad.float()
        wide.append(w)
    moving = sum(int(p.grad.flatten(1).any(1).sum()) if p.ndim > 1 and p.numel() > len(p) else int(p.grad.any())
                 for p in params)  # units with a gradient: clipping can only rescale those
    stats = adaptive_clip_grad_(params, clipping)
    want = adaptive_clip_grad_(wide, clipping)
    assert stats.clipped.item() == want.clipped.item() and stats.units == want.units
    count = stats.clipped.item()
    assert {"none": count == 0, "a few": 0 < count < moving / 2, "all": count == moving}[clipped], (count, moving)
    few_in_a_tensor = any(0 < int((p.grad.float() != w.grad).flatten(1).any(1).sum()) < len(p) / 4
                          for p, w in zip(params, wide) if p.ndim > 1)
    assert few_in_a_tensor or clipped != "a few"  # a few clipped units in a tensor (it once crashed)
    for p, w in zip(params, wide):
        assert p.grad.dtype == dtype
        torch.testing.assert_close(p.grad, w.grad.to(dtype), rtol=2 ** -7 if dtype == torch.bfloat16 else 2 ** -10,
                                   atol=0)


def test_stats_count_units_without_sync():
    w, b, gain, skip = torch.ones(4, 2), torch.ones(4), torch.ones(4, 1, 1, 1), torch.ones(())
    for t in (w, b, gain, skip):
        t.grad = torch.zeros_like(t)
    w.grad[1] = 1.0   # clipped (norm sqrt(2) > 0.01 * sqrt(2))
    gain.grad[0] = 1  # the gain vector is one unit: clipped as a whole
    stats = adaptive_clip_grad_([w, b, gain, skip])
    assert stats.units == 4 + 1 + 1 + 1
    assert isinstance(stats.clipped, torch.Tensor) and stats.clipped.item() == 2
    assert stats.clipped_fraction() == pytest.approx(2 / 7)
    torch.testing.assert_close(gain.grad.flatten(), torch.tensor([0.02, 0, 0, 0]))
    assert adaptive_clip_grad_([torch.ones(3)]).units == 0  # no gradient: nothing to do
    with pytest.raises(NFNetZooError, match="clipping > 0"):
        adaptive_clip_grad_([w], clipping=0)



def test_sharded_tensor_of_an_unknown_kind_is_refused():
    # agc_distributed teaches AGC FSDP2's DTensor; any other torch.distributed tensor is not taken for whole.
    class Sharded(torch.Tensor):
        pass

    Sharded.__module__ = "torch.distributed.elsewhere"
    t = torch.ones(4, 3).as_subclass(Sharded)
    t.grad = torch.ones(4, 3)
    with pytest.raises(NFNetZooError, match=r"sharded parameter \(Sharded\).*import nfnet_zoo.agc_distributed"):
        adaptive_clip_grad_([t])

# --- which parameters, on any timm model ------------------------------------------------------
@pytest.mark.parametrize("name", ["nfnet_zoo_tiny", "resnet18", "vit_tiny_patch16_224", "convnext_atto",
                                  "deit_tiny_distilled_patch16_224", "efficientnet_b0"])
def test_classifier_weight_is_excluded_by_identity(name):
    model = timm.create_model(name, num_classes=10)
    heads = model.pretrained_cfg["classifier"]
    heads = (heads,) if isinstance(heads, str) else heads
    kept = {id(p) for p in clipped_parameters(model)}
    excluded = {n for n, p in model.named_parameters() if id(p) not in kept}
    assert excluded == {f"{h}.weight" for h in heads}
    assert all(f"{h}.bias" not in excluded for h in heads)  # DeepMind clips the classifier bias

    decay = {id(p) for g in weight_decay_groups(model, 0.1) if g["weight_decay"] for p in g["params"]}
    timm_sgd = create_optimizer_v2(model, "sgd", lr=0.1, weight_decay=0.1)
    reference = {id(p) for g in timm_sgd.param_groups if g["weight_decay"] for p in g["params"]}
    assert decay == reference


def test_headless_unknown_and_patterns():
    headless = timm.create_model("resnet18", num_classes=0)
    assert len(clipped_parameters(headless)) == len(list(headless.parameters()))

    plain = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(NFNetZooError) as err:
        clipped_parameters(plain)
    assert "exclude=" in str(err.value) and "\n" not in str(err.value)
    assert [p.shape for p in clipped_parameters(plain, exclude="2.weight")] == [(8, 4), (8,), (2,)]
    plain.pretrained_cfg = {"classifier": "2"}
    assert len(clipped_parameters(plain)) == 3

    vit = timm.create_model("vit_tiny_patch16_224", num_classes=10)
    kept = {id(p) for p in clipped_parameters(vit, exclude=["pos_embed", "cls_token", "blocks.*.norm*"])}
    names = {n for n, p in vit.named_parameters() if id(p) not in kept}
    assert names == {"head.weight", "pos_embed", "cls_token"} | {
        f"blocks.{i}.norm{j}.{t}" for i in range(12) for j in (1, 2) for t in ("weight", "bias")}
    with pytest.raises(NFNetZooError, match="matches no parameter"):
        clipped_parameters(vit, exclude="haed.*")


# --- training settings ------------------------------------------------------------------------
def test_fp16_grad_scaler_unscales_first_and_keeps_skipped_steps():
    x, y = batch()
    reference, scaled = tiny(), tiny()
    ref_opt, opt = sgd(reference), sgd(scaled)
    F.cross_entropy(reference(x), y).backward()
    adaptive_clip_grad_(clipped_parameters(reference))
    ref_opt.step()

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    scaler.scale(F.cross_entropy(scaled(x), y)).backward()
    scaler.unscale_(opt)
    adaptive_clip_grad_(clipped_parameters(scaled))
    scaler.step(opt)
    scaler.update()
    for (n, a), b in zip(reference.named_parameters(), scaled.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=n)

    before = {n: p.detach().clone() for n, p in scaled.named_parameters()}
    opt.zero_grad()
    scaler.scale(F.cross_entropy(scaled(x), y)).backward()
    scaled.stem.conv1.weight.grad[0, 0, 0, 0] = float("inf")  # an fp16 overflow
    scaler.unscale_(opt)
    adaptive_clip_grad_(clipped_parameters(scaled))
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0 ** 11
    assert all(torch.equal(p, before[n]) for n, p in scaled.named_parameters())
