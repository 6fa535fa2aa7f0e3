"""Our models where timm's run: the behaviours of timm's tests/test_models.py, TorchScript, FX,
torch.func, torch.export, device/dtype construction.

Each case runs for `nfnet_zoo_tiny` and `nfnet_f0`; the TorchScript, FX and device cases also for
timm's own `dm_nfnet_f0`, the control that defines "passes in timm" (it passes the others too). Inputs
are small, as in timm's suite. The eager model is the only path, so FX (exact in timm's
`test_model_forward_fx`), TorchScript, features through FX and torch.export give its bits exactly.
"""
import inspect

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import set_layer_config
try:
    from timm.layers._fx import get_notrace_functions, get_notrace_modules
except ImportError:  # timm < 1.0.17 kept them in timm.models
    from timm.models._features_fx import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import nfnet_zoo  # noqa: F401

OURS = ["nfnet_zoo_tiny", "nfnet_f0"]
MODELS = OURS + ["dm_nfnet_f0"]  # the control, where timm's model is cheap to run here
FX_KWARGS = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())


def _create(name, **kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs)
    with torch.no_grad():  # residual branches on, so that every parameter gets a gradient
        for n, p in model.named_parameters():
            if n.endswith("skipinit_gain"):
                p.fill_(0.5)
    return model


def _input(batch=1, size=64):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", OURS)
def test_forward(name):
    model = _create(name).eval()
    out = model(_input())
    assert out.shape == (1, 1000) and not out.isnan().any()


@pytest.mark.parametrize("name", OURS)
def test_backward(name):
    model = _create(name, num_classes=42).train()
    out = model(_input(2))
    out.mean().backward()
    assert out.shape == (2, 42)
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


@pytest.mark.parametrize("name", OURS)
def test_default_cfgs(name):
    model = _create(name).eval()
    cfg, sd = model.pretrained_cfg, model.state_dict()
    x, small = torch.randn(1, *cfg["input_size"]), _input()  # the pooled sizes on small inputs: 64 / 32
    with torch.no_grad():
        assert model.forward_features(x).shape[-2:] == cfg["pool_size"]
        model.reset_classifier(0)
        assert model(small).shape == (1, model.num_features)
        model.reset_classifier(0, "")
        assert model(small).shape == (1, model.num_features, 2, 2)
        headless = timm.create_model(name, num_classes=0, global_pool="").eval()
        assert headless(small).shape == (1, model.num_features, 2, 2)
    assert cfg["classifier"] + ".weight" in sd and cfg["first_conv"] + ".weight" in sd


@pytest.mark.parametrize("name", OURS)
def test_features_only_and_intermediates(name):
    x = _input()
    features = _create(name, features_only=True).eval()
    model = _create(name).eval()
    with torch.no_grad():
        outs = features(x)
        assert len(outs) == len(features.feature_info.channels()) >= 4
        assert [o.shape[1] for o in outs] == features.feature_info.channels()
        final, inter = model.forward_intermediates(x)
        assert torch.equal(final, model.forward_features(x))
        for a, b in zip(inter, outs):  # the same weights (same seed): the same features
            assert torch.equal(a, b)


@pytest.mark.parametrize("name", MODELS)
def test_torchscript(name):
    with set_layer_config(scriptable=True):
        model = _create(name).eval()
    x = _input()
    scripted = torch.jit.script(model)
    with torch.no_grad():
        assert torch.equal(scripted(x), model(x))


@pytest.mark.parametrize("name", MODELS)
def test_fx_forward_backward_and_script(name):
    model = _create(name).eval()
    x = _input()
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=FX_KWARGS)
    fx = create_feature_extractor(model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]],
                                  tracer_kwargs=FX_KWARGS)
    with torch.no_grad():
        y = model(x)
        (out,) = fx(x).values()
        assert torch.equal(out, y)  # timm's test_model_forward_fx: exact
        assert torch.equal(torch.jit.script(fx)(x)[train_nodes[-1]], y)
    fx.train()
    (out,) = fx(_input(2)).values()
    out.mean().backward()
    assert all(p.grad is not None for p in fx.parameters())


@pytest.mark.parametrize("name", MODELS)
def test_features_fx_with_torchscript(name):
    # How detection and segmentation code takes a backbone: timm's FX feature wrapper, then scripted.
    with set_layer_config(scriptable=True):
        model = _create(name, features_only=True, feature_cls="fx").eval()
    x = _input()
    reference = _create(name, features_only=True).eval()
    with torch.no_grad():
        outs = torch.jit.script(model)(x)
        for a, b in zip(outs, reference(x)):
            assert torch.equal(a, b)


def test_torchvision_feature_extractor_plain(name="nfnet_zoo_tiny"):
    # torchvision's extractor with no timm leaf lists: our SAME padding is an FX leaf by itself.
    model = _create(name).eval()
    fx = create_feature_extractor(model, return_nodes={"stages.1": "c3", "stages.3": "c5"})
    x = _input()
    with torch.no_grad():
        out = fx(x)
        _, inter = model.forward_intermediates(x, indices=[2])
    assert torch.equal(out["c3"], inter[0])
    assert out["c5"].shape[1] == model.cfg.widths[-1]


@pytest.mark.parametrize("name", MODELS)
def test_meta_device_and_dtype(name):
    from timm.models.nfnet import NormFreeNet
    if name.startswith("dm_") and "device" not in inspect.signature(NormFreeNet).parameters:
        with pytest.raises(TypeError):  # timm's own NFNet takes device and dtype from timm 1.0.21 on; ours always
            timm.create_model(name, device="meta")
        return
    model = timm.create_model(name, device="meta")
    assert all(p.is_meta for p in model.parameters())
    half = timm.create_model(name, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())


def test_meta_builds_f6_without_allocating():
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = timm.create_model("nfnet_f6", device="meta")
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert sum(p.numel() for p in model.parameters()) > 400e6 and grown_mb < 200  # 1.7 GB in float32
    model.to_empty(device="cpu")  # the path to real memory, as on a GPU: same constructor, same call


def test_per_sample_gradients_with_vmap_equal_a_loop():
    from torch.func import functional_call, grad, vmap

    model = _create("nfnet_zoo_tiny", num_classes=5, drop_rate=0.0).eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = _input(3, 32), torch.tensor([0, 3, 4])

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    batched = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(3):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        for n, p in model.named_parameters():
            torch.testing.assert_close(batched[n][i], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_jacrev_of_the_logits():
    from torch.func import functional_call, jacrev

    model = _create("nfnet_zoo_tiny", num_classes=3).eval()
    x = _input(1, 32)
    jac = jacrev(lambda inp: functional_call(model, dict(model.named_parameters()), (inp,)))(x)
    x.requires_grad_()
    rows = [torch.autograd.grad(model(x)[0, k], x)[0] for k in range(3)]
    torch.testing.assert_close(jac[0], torch.stack(rows), rtol=1e-4, atol=1e-6)


def test_export_gives_the_eager_logits():
    model = _create("nfnet_zoo_tiny").eval()
    x = _input(2)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        assert torch.equal(exported.module()(x), model(x))


def test_dynamo_onnx_export_gives_the_eager_logits(tmp_path):
    """torch.onnx.export(dynamo=True), run by onnxruntime (the `onnx` extra, part of the test extra)."""
    import onnxruntime
    model = _create("nfnet_zoo_tiny").eval()
    x = _input(2)
    torch.onnx.export(model, (x,), dynamo=True).save(str(tmp_path / "tiny.onnx"))
    session = onnxruntime.InferenceSession(str(tmp_path / "tiny.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(logits), model(x), rtol=1e-4, atol=1e-5)


def test_compile_fullgraph_and_export():
    model = _create("nfnet_zoo_tiny", num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y = model(x)
        compiled = torch.compile(model, fullgraph=True, backend="eager")  # fullgraph: no graph breaks
        assert torch.equal(compiled(x), y)
    model.train()
    torch.compile(model, fullgraph=True, backend="eager")(x).sum().backward()
    model.eval()
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        assert torch.equal(exported.module()(x), y)


# --- Inductor ------------------------------------------------------------------------------------
def _inductor_code(fn, x):
    from torch._inductor.utils import run_and_get_code

    out, code = run_and_get_code(fn, x)
    return out, "\n".join(code)


def test_inductor_computes_the_eager_logits():
    model = _create("nfnet_zoo_tiny", num_classes=5, depths=(1, 1, 1, 1)).eval()
    x = _input(2, 32)
    with torch.no_grad():
        out, code = _inductor_code(torch.compile(model), x)
        torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-5)
    assert "rsqrt" in code  # not frozen: the standardisation runs on every call (the contrast below)


def test_optimize_for_inference_compile_freezes_the_standardisation():
    from nfnet_zoo import optimize_for_inference

    model = _create("nfnet_zoo_tiny", num_classes=5, depths=(1, 1, 1, 1)).eval()
    x = _input(2, 32)
    with torch.no_grad():
        want = model(x)
    out, code = _inductor_code(optimize_for_inference(model, compile=True), x)  # called with grad enabled
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    assert "rsqrt" not in code and "var_mean" not in code  # folded into constants by Inductor's freezing
