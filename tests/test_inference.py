"""`optimize_for_inference`, the package's one speed path, held to the model it came from: the same bits.

Reference: the model itself in eval mode (the reference layers, the only path), in the same memory
format and autocast dtype.
"""
import copy

import pytest
import timm
import torch

import nfnet_zoo
from nfnet_zoo.models.inference import StandardizedConv2d, standardize_once
from nfnet_zoo.models.layers import WSConv2d
from _weights import pretrained_like_

CL = torch.channels_last


def _model(**kwargs):
    torch.manual_seed(0)
    return pretrained_like_(timm.create_model("nfnet_zoo_tiny", num_classes=5, **kwargs)).eval()


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, "bf16-weights"], ids=["fp32", "bf16-autocast", "bf16-model"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("size", [64, 61])  # odd: uneven SAME padding at every stride
def test_standardized_once_gives_the_models_bits(fmt, dtype, size):
    model = _model().to(memory_format=fmt)
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1)).contiguous(memory_format=fmt)
    if dtype == "bf16-weights":  # a model held in bfloat16: standardised in bfloat16, as its own forward does
        model, x, dtype = model.bfloat16(), x.bfloat16(), None
    served = standardize_once(model)
    assert served.stem.conv1.weight.dtype == model.stem.conv1.weight.dtype
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        assert torch.equal(served(x), model(x))


def test_optimize_for_inference_gives_the_models_bits():
    model = _model()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model.to(memory_format=CL)(x.contiguous(memory_format=CL))
    fast = nfnet_zoo.optimize_for_inference(model)
    out = fast(x.requires_grad_())  # no torch.no_grad() needed: the prepared module enters it
    assert torch.equal(out, want) and not out.requires_grad
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want_bf16 = model(x.detach().contiguous(memory_format=CL)).float()
    assert torch.equal(nfnet_zoo.optimize_for_inference(model, dtype=torch.bfloat16)(x), want_bf16)


def test_the_copy_shares_all_but_the_standardised_weights():
    model = _model()
    before = copy.deepcopy(model.state_dict())
    served = standardize_once(model)
    convs = [n for n, m in model.named_modules() if isinstance(m, WSConv2d)]
    assert convs and all(isinstance(served.get_submodule(n), StandardizedConv2d) for n in convs)
    assert not any(isinstance(m, WSConv2d) for m in served.modules())
    own = {id(p) for p in model.parameters()}
    fresh = [n for n, p in served.named_parameters() if id(p) not in own]
    assert sorted(fresh) == sorted(f"{n}.weight" for n in convs)  # biases, SE, head, skip gains: shared
    for n in convs:  # gain * standardise(W), computed by the reference's own function
        ws = model.get_submodule(n)
        assert torch.equal(served.get_submodule(n).weight, ws.standardized_weight().detach())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model is untouched
    assert isinstance(model.stem.conv1, WSConv2d)


def test_the_model_stays_trainable_and_gives_saliency():
    model = _model()
    nfnet_zoo.optimize_for_inference(model)
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    model(x)[0, 1].backward()  # saliency: through the model itself, as the docstring says
    assert x.grad is not None and x.grad.abs().sum() > 0
    model.train().requires_grad_(True)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_the_served_copy_is_a_snapshot():
    model = _model()
    x = torch.randn(2, 3, 64, 64)
    served = standardize_once(model)
    with torch.no_grad():
        before = served(x)
        model.stem.conv1.weight.mul_(2.0)  # changed after: the copy keeps the standardised snapshot...
        assert torch.equal(served(x), before)
        assert torch.equal(standardize_once(model)(x), model(x))  # ...a new call sees the change


def test_fast_kernels_is_a_deprecated_no_op():
    model = _model()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
        with pytest.warns(DeprecationWarning, match="does nothing"):
            with nfnet_zoo.fast_kernels(False):
                assert torch.equal(model(x), want)


def test_make_bench_speed_path_table_runs_and_finds_the_same_bits():
    """`make bench`'s on/off table (benchmarks/bench.py), on a tiny model: every case measured, same bits."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench

    rows = bench.bench_speed_path(_model(), torch.device("cpu"), batch=1, size=32, repeats=1)
    assert [r["case"] for r in rows] == ["eval fp32, NCHW", "eval bfloat16 autocast, NCHW", "eval fp32, channels_last",
                                         "eval bfloat16 autocast, channels_last"]
    assert all(r["same_bits"] and r["on_s"] > 0 and r["off_s"] > 0 for r in rows)
    table = bench._speed_path_lines(rows)
    assert sum(line.startswith("| eval") for line in table) == 4 + 3  # measured, plus the removed kernels' eval rows


def test_make_bench_export_table_runs_and_onnxruntime_gives_the_logits():
    """`make bench`'s exported-model table (benchmarks/bench.py) on a tiny model: one ONNX file at batch 1 and 2,
    every runtime measured, onnxruntime's logits within float32 rounding of the eager model's."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench

    ours = _model()
    theirs = copy.deepcopy(ours)
    rows = bench.bench_export(theirs, ours, (1, 2), size=32, repeats=1)
    assert [r["batch"] for r in rows] == [1, 2]
    assert all(r[f"{k}_s"] > 0 for r in rows for k in ("timm", "ours", "onnxruntime", "optimize_for_inference"))
    assert all(r["dev"]["onnxruntime"] < 1e-5 and r["dev"]["optimize_for_inference"] < 1e-5 for r in rows)
    assert sum(line.startswith("| 1 x 32") or line.startswith("| 2 x 32") for line in bench._export_lines(rows, 1)) == 2
