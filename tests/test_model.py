"""timm's model interface on our NFNet, weights changed in place, stochastic depth, beta.

(The serving path, `optimize_for_inference`, is held to the model's bits in tests/test_inference.py.)
"""
import copy

import pytest
import timm
import timm.optim
import torch

import nfnet_zoo  # noqa: F401
from nfnet_zoo.models.layers import StochDepth


@pytest.fixture()
def model():
    torch.manual_seed(0)
    m = timm.create_model("nfnet_zoo_tiny", num_classes=5)
    with torch.no_grad():  # switch the residual branches on, as in a trained model
        for n, p in m.named_parameters():
            if n.endswith("skipinit_gain"):
                p.fill_(1.0)
    return m.eval()


def test_forward_features_and_head(model):
    x = torch.randn(2, 3, 64, 64)
    f = model.forward_features(x)
    assert f.shape == (2, model.num_features, 2, 2)
    assert model.forward_head(f, pre_logits=True).shape == (2, model.num_features)
    assert torch.allclose(model.forward_head(f), model(x))
    assert model.get_classifier() is model.head.fc
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.get_classifier().out_features == 3
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)


def test_no_weight_decay_is_deepminds_partition(model):
    names = model.no_weight_decay()
    params = dict(model.named_parameters())
    for n in params:
        decayed = n not in names
        assert decayed == (n.endswith(".weight")), n
    assert "head.fc.bias" in names and "stages.0.0.skipinit_gain" in names and "stem.conv1.gain" in names


def test_group_matcher_drives_timm_layer_decay(model):
    opt = timm.optim.create_optimizer_v2(model, "sgd", lr=0.1, layer_decay=0.5)
    scales = sorted({g["lr_scale"] for g in opt.param_groups})
    blocks = sum(len(s) for s in model.stages)
    assert len(scales) == 1 + blocks + 1  # stem, one layer per block, then final conv and head


def test_grad_checkpointing_same_grads(model):
    x = torch.randn(2, 3, 64, 64)
    model.train()
    other = copy.deepcopy(model)
    other.set_grad_checkpointing(True)
    torch.manual_seed(1)
    model(x).sum().backward()
    torch.manual_seed(1)
    other(x).sum().backward()
    for (n, p), q in zip(model.named_parameters(), other.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)


def test_features_only_and_intermediates(model):
    x = torch.randn(1, 3, 64, 64)
    feats = timm.create_model("nfnet_zoo_tiny", features_only=True)
    outs = feats(x)
    info = feats.feature_info
    # stem (before its last, strided conv), stages 0-2, final conv: widths (32, 64, 128, 256) x 2
    assert [o.shape[1] for o in outs] == info.channels() == [64, 32, 64, 128, 512]
    assert [64 // o.shape[-1] for o in outs] == info.reduction() == [2, 4, 8, 16, 32]
    final, inter = model.forward_intermediates(x)
    assert len(inter) == 5
    torch.testing.assert_close(final, model.forward_features(x))
    last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
    assert [t.shape[1] for t in last2] == [128, 512]
    sub = timm.create_model("nfnet_zoo_tiny", features_only=True, out_indices=(1, 3))
    assert [o.shape[1] for o in sub(x)] == [32, 128]


def test_parameter_changes_take_effect_at_once(model):
    # Nothing is kept between forward passes: an in-place step, a loaded state, a dtype change all show.
    x = torch.randn(2, 3, 64, 64)
    conv = model.stem.conv1
    with torch.no_grad():
        y0 = model(x)
        assert torch.equal(model(x), y0)
        conv.weight.mul_(1.5).add_(0.1)  # in-place, as an optimizer step does
        fresh = copy.deepcopy(model)
        assert torch.equal(model(x), fresh(x))
        assert not torch.equal(model(x), y0)
        state = copy.deepcopy(fresh.state_dict())
        state["stem.conv2.gain"].mul_(0.5)
        model.load_state_dict(state)
        fresh.load_state_dict(state)
        assert torch.equal(model(x), fresh(x))
        y64 = model.double()(x.double())
        torch.testing.assert_close(y64.float(), model.float()(x), rtol=1e-4, atol=1e-5)


def test_channels_last(model):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y = model(x)
        cl = model.to(memory_format=torch.channels_last)
        torch.testing.assert_close(cl(x.to(memory_format=torch.channels_last)), y, rtol=1e-4, atol=1e-5)


def test_stochastic_depth_drops_whole_samples_without_rescaling():
    sd = StochDepth(0.5).train()
    torch.manual_seed(0)
    x = torch.randn(64, 4, 3, 3)
    y = sd(x)
    kept = [(y[i] == x[i]).all().item() for i in range(64)]
    dropped = [(y[i] == 0).all().item() for i in range(64)]
    assert all(k or d for k, d in zip(kept, dropped)) and 10 < sum(kept) < 54
    assert torch.equal(sd.eval()(x), x)
    m = timm.create_model("nfnet_zoo_tiny", drop_path_rate=0.5)
    rates = [b.drop_path.rate for s in m.stages for b in s]
    n = len(rates)
    assert rates == pytest.approx([0.5 * i / n for i in range(n)])


def test_beta_resets_per_stage():
    m = timm.create_model("nfnet_f0", depths=(1, 2, 3, 1), widths=(16, 32, 32, 32), group_width=8,
                          stem_widths=(8, 8, 8))
    betas = [[b.beta for b in s] for s in m.stages]
    a2 = 0.2 ** 2
    assert betas[0] == [1.0]
    assert betas[1] == pytest.approx([1 / (1 + a2) ** 0.5, 1 / (1 + a2) ** 0.5])
    # The expected variance resets AFTER a stage's first block: that block still sees the old one.
    assert betas[2] == pytest.approx([1 / (1 + 2 * a2) ** 0.5, 1 / (1 + a2) ** 0.5, 1 / (1 + 2 * a2) ** 0.5])
    assert betas[3] == pytest.approx([1 / (1 + 3 * a2) ** 0.5])


def test_autocast_bfloat16_is_close_to_float32(model):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yb = model(x)
        assert model(x).dtype == torch.float32
    assert (yb.float() - y).abs().max() < 0.05 * y.abs().max()


def test_grad_mode_does_not_change_the_output(model):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a = model(x)
    with torch.inference_mode():
        b = model(x)
    assert torch.equal(a, model(x).detach()) and torch.equal(a, b)
