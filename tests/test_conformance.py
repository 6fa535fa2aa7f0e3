"""Our NFNet against DeepMind's own forward pass (tests/data/deepmind/tiny_d1_io.npz).

The reference was computed by DeepMind's official JAX code; our model gets its weights through the
converter, so this checks the converter and the network together, activation by activation.
"""
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import nfnet_zoo  # noqa: F401  (registers the variants)
from nfnet_zoo.models.convert import convert_haiku_checkpoint, load_haiku_checkpoint, timm_keys

DATA = Path(__file__).parent / "data" / "deepmind"


@pytest.fixture(scope="module")
def tiny_d1(tmp_path_factory, device):
    out = convert_haiku_checkpoint(DATA / "tiny_d1_haiku.npz", tmp_path_factory.mktemp("tiny_d1"))
    return timm.create_model(f"local-dir:{out}", pretrained=True).eval().to(device)


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(DATA / "tiny_d1_io.npz"))


def _nchw(a: np.ndarray) -> torch.Tensor:
    a = torch.from_numpy(a)
    return a.permute(0, 3, 1, 2) if a.ndim == 4 else a


def _record(model, reference, tag):
    """Run `model` on the reference input, capturing every activation the reference stores."""
    keys = timm_keys(load_haiku_checkpoint(DATA / "tiny_d1_haiku.npz"))
    module_of = {m: k.rsplit(".", 1)[0] for (m, _), k in keys.items()}  # haiku module -> our module
    got, hooks = {}, []
    modules = dict(model.named_modules())

    def keep(name, scale=1.0):
        def hook(_m, _i, out):
            got[name] = out.detach().cpu() * scale
        return hook

    for ref_key in reference:
        if not ref_key.startswith(tag + "."):
            continue
        name = ref_key[len(tag) + 1:]
        if name.endswith("/~/squeeze_excite.sigmoid_gate"):
            block = module_of[name.split("/~/squeeze_excite")[0] + "/~/conv0"].rsplit(".", 1)[0]
            hooks.append(modules[block + ".attn_last"].register_forward_hook(keep(name, 0.5)))  # ours is 2*sigmoid
        elif name.endswith(".out") and name[:-4] in module_of and "nf_block" in name and "/~/" not in name[9:]:
            block = module_of[name[:-4] + "/~/conv0"].rsplit(".", 1)[0]
            hooks.append(modules[block].register_forward_hook(keep(name)))
        elif name.endswith(".out") and name[:-4] in module_of:
            hooks.append(modules[module_of[name[:-4]]].register_forward_hook(keep(name)))
    hooks.append(model.stem.register_forward_hook(keep("stem.out")))
    with torch.no_grad():
        x = _nchw(reference[f"{tag}.x_nhwc"]).to(next(model.parameters()).device)
        got["pool"] = model.forward_head(model.forward_features(x), pre_logits=True).cpu()
        got["logits"] = model(x).cpu()
    for h in hooks:
        h.remove()
    return got


@pytest.mark.parametrize("tag", ["even", "odd"])
def test_every_activation_matches_deepmind(tiny_d1, reference, tag):
    got = _record(tiny_d1, reference, tag)
    expected = {k[len(tag) + 1:]: v for k, v in reference.items()
                if k.startswith(tag + ".") and not k.endswith((".x_nhwc", ".res_avg_var"))}
    assert set(expected) <= set(got), sorted(set(expected) - set(got))
    # 4 stem convs + stem.out + 4 blocks x (5 convs, SE gate, block output) + final conv + pool + logits
    assert len(expected) == 4 + 1 + 4 * 7 + 1 + 2
    for name, ref in expected.items():
        ref_t = _nchw(ref) if "sigmoid_gate" not in name else torch.from_numpy(ref).permute(0, 3, 1, 2)
        out = got[name]
        assert out.shape == ref_t.shape, name
        tol = 1e-4 if name == "logits" else 1e-4 * max(1.0, ref_t.abs().max().item())
        err = (out - ref_t).abs().max().item()
        assert err <= tol, f"{tag} {name}: max abs error {err:.3g} > {tol:.3g}"


def test_odd_input_exercises_asymmetric_padding(reference):
    # 37x45 makes SAME padding of the strided convs symmetric on one axis and not on the other.
    assert reference["odd.x_nhwc"].shape[1:3] == (37, 45)
    assert reference["even.x_nhwc"].shape[1:3] == (64, 64)


def test_symmetric_padding_would_fail(tiny_d1, reference, device):
    """The reference is sensitive to the padding convention: a check that the test can fail."""
    from nfnet_zoo.models import layers

    x = _nchw(reference["even.x_nhwc"]).to(device)
    original = layers.same_padding
    try:
        layers.same_padding = lambda size, k, s: ((k - 1) // 2, (k - 1) // 2)
        with torch.no_grad():
            wrong = tiny_d1(x).cpu()
    finally:
        layers.same_padding = original
    assert (wrong - torch.from_numpy(reference["even.logits"])).abs().max() > 1e-2


def test_channels_last_matches(tiny_d1, reference, device):
    x = _nchw(reference["odd.x_nhwc"]).to(device)
    model = tiny_d1.to(memory_format=torch.channels_last)
    try:
        with torch.no_grad():
            y = model(x.to(memory_format=torch.channels_last)).cpu()
    finally:
        tiny_d1.to(memory_format=torch.contiguous_format)
    assert (y - torch.from_numpy(reference["odd.logits"])).abs().max() <= 1e-4
