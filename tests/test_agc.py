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

from nfnet_zoo import (NFNetZooError, adaptive_clip_grad_, fast_kernels, assert_agc_supported, clipped_parameters,
                       prepare_for_fsdp2, unscale_and_clip_, weight_decay_groups)
from nfnet_zoo.models.convert import convert_haiku_checkpoint, load_haiku_checkpoint, timm_keys, to_torch_layout
from nfnet_zoo.models.cpu_kernels import WS_STATS
from nfnet_zoo.models.layers import WSConv2d

DATA = Path(__file__).parent / "data" / "deepmind"


@pytest.fixture(params=[True, False], ids=["fast", "reference"])
def kernels(request):
    """With the CPU kernels (rows of few clipped units rewritten alone, weight norms from the forward
    pass) and without (one multiply per tensor: the branch accelerators take)."""
    with fast_kernels(request.param):
        yield request.param


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


@pytest.mark.usefixtures("kernels")
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


@pytest.mark.usefixtures("kernels")
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


@pytest.mark.usefixtures("kernels")
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


@pytest.mark.parametrize("top", [2.0, 1.1])  # about half the units clipped; a few (rows rewritten alone)
@pytest.mark.parametrize("shape", [(16, 8, 3, 3), (16, 1, 3, 3), (32, 16, 1, 1), (10, 64), (7, 3, 5), "cl"])
@pytest.mark.usefixtures("kernels")
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


@pytest.mark.usefixtures("kernels")
def test_one_call_over_many_tensors_matches_timm_per_tensor():
    # Units of all tensors are clipped in one pass; each tensor must get exactly its own scales back,
    # whether it has no clipped unit, a few (rows rewritten), most, all, or no unit at all.
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


@pytest.mark.usefixtures("kernels")
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


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("clipping,clipped", [(1e4, "none"), (0.02, "a few"), (1e-9, "all")])
def test_low_precision_model_matches_the_float32_computation(dtype, clipping, clipped, device):
    # A model cast to bf16/fp16 (pure low-precision training, FSDP2 mixed precision): real
    # low-precision parameters and gradients, clipped against the float32 clipping of the same values.
    model = _tiny().to(device=device, dtype=dtype)
    x, y = (t.to(device) for t in _batch())
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
    assert few_in_a_tensor or clipped != "a few"  # the row-rewrite case that crashed
    for p, w in zip(params, wide):
        assert p.grad.dtype == dtype
        torch.testing.assert_close(p.grad, w.grad.to(dtype), rtol=2 ** -7 if dtype == torch.bfloat16 else 2 ** -10,
                                   atol=0)


@pytest.mark.usefixtures("kernels")
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
def _tiny(seed=0):
    torch.manual_seed(seed)
    model = timm.create_model("nfnet_zoo_tiny", num_classes=10, depths=(1, 1, 1, 1), widths=(32, 64, 96, 128),
                              group_width=8, drop_rate=0.0, stochdepth_rate=0.0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("skipinit_gain"):
                p.fill_(0.5)  # residual branches on, so every parameter gets a gradient
    return model


def _batch(n=4, size=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


def _sgd(model):
    return torch.optim.SGD(weight_decay_groups(model, 1e-4), lr=0.2, momentum=0.9, nesterov=True)


@pytest.mark.usefixtures("kernels")
def test_fp16_grad_scaler_unscales_first_and_keeps_skipped_steps():
    x, y = _batch()
    reference, scaled = _tiny(), _tiny()
    ref_opt, opt = _sgd(reference), _sgd(scaled)
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


@pytest.mark.usefixtures("kernels")
def test_accelerate_accumulation_clips_once_on_the_accumulated_gradient():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    x, y = _batch(8)
    reference = _tiny()
    ref_opt = _sgd(reference)
    for _ in range(2):
        ref_opt.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        adaptive_clip_grad_(clipped_parameters(reference))
        ref_opt.step()

    try:
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
        model = _tiny()
        model, optimizer = accelerator.prepare(model, _sgd(model))
        clipped, results = clipped_parameters(model), []
        for _ in range(2):
            for micro in (slice(0, 4), slice(4, 8)):
                with accelerator.accumulate(model):
                    accelerator.backward(F.cross_entropy(model(x[micro]), y[micro]))
                    results.append(unscale_and_clip_(accelerator, clipped))
                    optimizer.step()
                    optimizer.zero_grad()
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    assert [r is None for r in results] == [True, False, True, False]
    for (n, a), b in zip(reference.named_parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=n)


def test_refuses_fsdp1_and_deepspeed():
    import inspect

    import accelerate
    from accelerate import Accelerator, FullyShardedDataParallelPlugin
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DistributedType

    # A real Accelerator with the configuration Accelerate sets up under FSDP / DeepSpeed launches.
    # accelerate < 1.6 (make test-floors) has only FSDP1: its plugin takes no fsdp_version
    has_fsdp2 = "fsdp_version" in inspect.signature(FullyShardedDataParallelPlugin).parameters
    try:
        accelerator = Accelerator(cpu=True)
        assert_agc_supported(accelerator)
        state = accelerator.state
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = FullyShardedDataParallelPlugin(**({"fsdp_version": 1} if has_fsdp2 else {}))
        with pytest.raises(NFNetZooError) as err:
            assert_agc_supported(accelerator)
        message = str(err.value)
        assert "FSDP1" in message and "fsdp_version=2" in message and "DDP" in message and "\n" not in message
        if has_fsdp2:
            state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
            assert accelerator.is_fsdp2
            assert_agc_supported(accelerator)
        else:  # the version found and the one FSDP2 needs
            assert (f"accelerate {accelerate.__version__} found, nfnet-zoo needs >= 1.6: "
                    "pip install -U 'accelerate>=1.6'") in message
        state.distributed_type = DistributedType.DEEPSPEED
        with pytest.raises(NFNetZooError, match="DeepSpeed flattens"):
            unscale_and_clip_(accelerator, [])
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    assert_agc_supported(_tiny())  # a plain model is fine; FSDP1-wrapped: tests/test_agc_distributed.py


@pytest.mark.usefixtures("kernels")
def test_prepare_for_fsdp2_keeps_timm_state_dict():
    # Sharded state dicts (0-d again) are checked in tests/test_agc_distributed.py.
    model, reference = _tiny(), _tiny()
    before = list(model.parameters())
    prepare_for_fsdp2(model)
    assert model.stages[0][0].skipinit_gain.shape == (1,)
    assert all(p is q for p, q in zip(model.parameters(), before))  # an optimizer built before stays valid
    sd, ref_sd = model.state_dict(), reference.state_dict()
    assert list(sd) == list(ref_sd)
    assert all(torch.equal(sd[k].reshape(ref_sd[k].shape), ref_sd[k]) for k in sd)
    with torch.no_grad():
        reference.stages[1][0].skipinit_gain.fill_(0.25)
    model.load_state_dict(reference.state_dict())  # a timm checkpoint, 0-d skip gains
    assert model.stages[1][0].skipinit_gain.item() == 0.25
    model.load_state_dict(model.state_dict())
    x, y = _batch()
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    F.cross_entropy(model(x), y).backward()
    F.cross_entropy(reference(x), y).backward()
    a, b = adaptive_clip_grad_(clipped_parameters(model)), adaptive_clip_grad_(clipped_parameters(reference))
    assert (a.units, a.clipped.item()) == (b.units, b.clipped.item())
    for (n, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad.reshape(q.shape), q.grad, rtol=1e-6, atol=0, msg=n)


# --- weight norms left by the forward pass --------------------------------------------------
def _clip_twice(model, clipping, after_forward=lambda: None):
    """AGC as a training step runs it, then again on the same gradients with the weights read."""
    x, y = _batch()
    F.cross_entropy(model(x), y).backward()
    after_forward()
    params = clipped_parameters(model)
    left = sum(WS_STATS in p.__dict__ for p in params)
    grads = [p.grad.clone() for p in params]
    first = adaptive_clip_grad_(params, clipping)
    assert not any(WS_STATS in p.__dict__ for p in params)  # each is used once
    fast = [p.grad.clone() for p in params]
    for p, g in zip(params, grads):
        p.grad.copy_(g)
    second = adaptive_clip_grad_(params, clipping)
    return left, first, second, fast, [p.grad for p in params]


def test_weight_norms_left_by_the_forward_pass_equal_the_read_ones():
    model = _tiny()
    n_convs = sum(isinstance(m, WSConv2d) for m in model.modules())
    left, first, second, fast, read = _clip_twice(model, 0.05)
    assert left == n_convs
    assert 0 < first.clipped.item() == second.clipped.item() < first.units  # the test can tell
    for a, b in zip(fast, read):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def test_weight_changed_after_the_forward_pass_is_read_again():
    model = _tiny()
    conv = model.stages[1][0].conv2

    def update():
        with torch.no_grad():
            conv.weight.mul_(3.0)  # an in-place update between forward and clipping
    # Nearly every unit clips, so each clipped gradient is proportional to its weight norm.
    _, first, second, fast, read = _clip_twice(model, 1e-5, update)
    assert first.clipped.item() > first.units // 2
    for a, b in zip(fast, read):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
