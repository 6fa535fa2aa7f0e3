"""Two gloo processes (DDP, FSDP2) end with one process's parameters on one global batch, AGC included."""
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from nfnet_zoo import adaptive_clip_grad_, clipped_parameters, weight_decay_groups

WORKER = Path(__file__).parent / "_agc_dist_worker.py"
MODEL_KWARGS = dict(num_classes=10, depths=(1, 1, 1, 1), widths=(32, 64, 96, 128), group_width=8,
                    drop_rate=0.0, stochdepth_rate=0.0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model("nfnet_zoo_tiny", **MODEL_KWARGS)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("skipinit_gain"):
                p.fill_(0.5)  # residual branches on, so every parameter gets a gradient
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
