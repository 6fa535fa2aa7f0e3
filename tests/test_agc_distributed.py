"""nfnet_zoo.agc_distributed: two gloo processes (DDP, FSDP2) end with one process's parameters on one
global batch, AGC included; FSDP1 and DeepSpeed refused; Accelerate's gradient accumulation clipped once
per step; prepare_for_fsdp2's timm-compatible state dicts."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from _tiny_nfnet import MODEL_KWARGS, batch, sgd, tiny
from nfnet_zoo import (NFNetZooError, adaptive_clip_grad_, assert_agc_supported, clipped_parameters,
                       prepare_for_fsdp2, unscale_and_clip_, weight_decay_groups)

WORKER = Path(__file__).parent / "_agc_dist_worker.py"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    model = tiny()
    g = torch.Generator().manual_seed(1)
    inputs = dict(model_kwargs=MODEL_KWARGS, state_dict=model.state_dict(), lr=0.2, weight_decay=1e-4,
                  clipping=0.01,
                  batches=[(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g))
                           for _ in range(3)])
    out = tmp_path_factory.mktemp("agc_dist")
    torch.save(inputs, out / "inputs.pt")
    proc = subprocess.run([sys.executable, str(WORKER), str(out)], capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # One process, the whole global batch per step.
    optimizer = torch.optim.SGD(weight_decay_groups(model, inputs["weight_decay"]), lr=inputs["lr"],
                                momentum=0.9, nesterov=True)
    clipped, fractions = clipped_parameters(model), []
    for x, y in inputs["batches"]:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        fractions.append(adaptive_clip_grad_(clipped, inputs["clipping"]).clipped_fraction())
        optimizer.step()
    return torch.load(out / "result.pt", weights_only=False), model.state_dict(), fractions


def _assert_same(state, reference):
    assert list(state) == list(reference)
    for k, want in reference.items():
        assert state[k].shape == want.shape, k  # skip gains stay 0-d: timm-compatible checkpoints
        torch.testing.assert_close(state[k], want, rtol=1e-5, atol=1e-6, msg=k)


def test_ddp_matches_one_process(runs):
    result, reference, fractions = runs
    state, ddp_fractions = result["ddp"]
    assert 0 < min(fractions) and max(fractions) < 1  # AGC is active, not all-or-nothing
    assert ddp_fractions == pytest.approx(fractions)
    _assert_same(state, reference)


def test_fsdp2_matches_one_process(runs):
    result, reference, _ = runs
    state, units = result["fsdp2"]
    _assert_same(state, reference)
    assert len(set(units)) == 1 and units[0] > 0


def test_fsdp1_is_refused(runs):
    result, _, _ = runs
    message = result["fsdp1"]
    assert message is not None and "FSDP1 flattens" in message and "fsdp_version=2" in message
    assert "\n" not in message


# --- in one process ----------------------------------------------------------------------------
def test_accelerate_accumulation_clips_once_on_the_accumulated_gradient():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    x, y = batch(8)
    reference = tiny()
    ref_opt = sgd(reference)
    for _ in range(2):
        ref_opt.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        adaptive_clip_grad_(clipped_parameters(reference))
        ref_opt.step()

    try:
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
        model = tiny()
        model, optimizer = accelerator.prepare(model, sgd(model))
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
    assert_agc_supported(tiny())  # a plain model is fine; FSDP1-wrapped: test_fsdp1_is_refused


def test_prepare_for_fsdp2_keeps_timm_state_dict():
    # Sharded state dicts (0-d again): test_fsdp2_matches_one_process.
    model, reference = tiny(), tiny()
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
    x, y = batch()
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    F.cross_entropy(model(x), y).backward()
    F.cross_entropy(reference(x), y).backward()
    a, b = adaptive_clip_grad_(clipped_parameters(model)), adaptive_clip_grad_(clipped_parameters(reference))
    assert (a.units, a.clipped.item()) == (b.units, b.clipped.item())
    for (n, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad.reshape(q.shape), q.grad, rtol=1e-6, atol=0, msg=n)
