"""Registration in timm's factory, the variant table, pretrained configs and Hub weight loading."""
import functools
import json
import os
import subprocess
import sys
import textwrap
import warnings
from unittest import mock

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import nfnet_zoo
from nfnet_zoo import NFNetZooError
from nfnet_zoo.models.variants import VARIANTS
from _weights import pretrained_like_

F_NAMES = [f"nfnet_f{i}" for i in range(8)]
ALL_NAMES = F_NAMES + [f"nfnet_f{i}_plus" for i in range(8)] + ["nfnet_zoo_tiny"]


def test_every_name_is_registered_and_builds():
    assert set(ALL_NAMES) <= set(timm.list_models("nfnet_*"))
    for name in ALL_NAMES:
        with torch.device("meta"):
            model = timm.create_model(name)
        assert isinstance(model, nfnet_zoo.NFNet), name
        cfg = VARIANTS[name]
        assert [len(s) for s in model.stages] == list(cfg.depths)
    assert isinstance(timm.create_model("nfnet_zoo_tiny"), nfnet_zoo.NFNet)


def test_paper_table():
    for i, k in enumerate(range(1, 9)):
        f, plus = VARIANTS[f"nfnet_f{i}"], VARIANTS[f"nfnet_f{i}_plus"]
        assert f.depths == tuple(d * k for d in (1, 2, 6, 3)) == plus.depths
        assert f.widths == (256, 512, 1536, 1536) and plus.widths == (384, 768, 2048, 2048)
    assert [VARIANTS[n].drop_rate for n in F_NAMES] == [0.2, 0.3, 0.4, 0.4, 0.5, 0.5, 0.5, 0.5]
    assert [VARIANTS[n].test_size for n in F_NAMES] == [256, 320, 352, 416, 512, 544, 576, 608]


@pytest.mark.parametrize("i", range(7))
def test_strict_load_of_timm_dm_nfnet(i):
    """timm's dm_nfnet_fN state dicts (the Hub weights' format) load strictly into ours."""
    # timm 1.0.20's NormFreeNet reads its drop-path rates with torch.linspace(...).tolist(), which no meta
    # tensor can answer: its linspace runs on the CPU (the rates are plain floats either way)
    on_cpu = functools.partial(torch.linspace, device="cpu")
    with torch.device("meta"), mock.patch.object(torch, "linspace", on_cpu):
        ours = timm.create_model(f"nfnet_f{i}")
        theirs = timm.create_model(f"dm_nfnet_f{i}")
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


def test_timm_dm_nfnet_differs_only_by_the_documented_numerics():
    """Same weights as timm's dm_nfnet_f0: stock timm deviates (erf GELU, eps inside the sqrt of the
    weight standardisation); with those two swapped for DeepMind's forms, the two models agree."""
    from timm.models.nfnet import GammaAct

    torch.manual_seed(0)
    theirs = pretrained_like_(timm.create_model("dm_nfnet_f0").eval())
    ours = timm.create_model("nfnet_f0").eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        y = ours(x)
        stock = (theirs(x) - y).abs().max().item()
        for m in theirs.modules():
            if hasattr(m, "scale") and hasattr(m, "eps"):
                m.eps = 1e-12  # DeepMind: rsqrt(max(var * fan_in, 1e-4)), no eps for non-degenerate weights
            if isinstance(m, GammaAct):
                m.act_fn = lambda t, inplace=False: F.gelu(t, approximate="tanh")
        aligned = (theirs(x) - y).abs().max().item()
    assert stock > 1e-2, stock       # measured 0.014-0.025 (seeds 0-2): why stock dm_nfnet is not the reference
    assert aligned < 1e-4, aligned    # measured 7e-6: the rest is float32 rounding


def test_import_hides_only_our_overwrite_warning():
    code = "import warnings; warnings.simplefilter('always'); import nfnet_zoo"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and "Overwriting" not in r.stderr, r.stderr
    from timm.models import register_model

    def nfnet_zoo_test_duplicate():
        pass

    register_model(nfnet_zoo_test_duplicate)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        register_model(nfnet_zoo_test_duplicate)
    assert any("Overwriting nfnet_zoo_test_duplicate" in str(w.message) for w in caught)


def test_timm_dm_nfnet_untouched():
    from timm.models._registry import _model_to_module

    assert _model_to_module["dm_nfnet_f0"] == "nfnet"
    assert type(timm.create_model("dm_nfnet_f0", pretrained=False)).__name__ == "NormFreeNet"
    assert timm.get_pretrained_cfg("dm_nfnet_f0.dm_in1k").architecture == "dm_nfnet_f0"


def test_pretrained_configs():
    for i in range(7):
        cfg = timm.get_pretrained_cfg(f"nfnet_f{i}.dm_in1k")
        v = VARIANTS[f"nfnet_f{i}"]
        assert cfg.hf_hub_id == f"timm/dm_nfnet_f{i}.dm_in1k"
        assert cfg.input_size == (3, v.train_size, v.train_size)
        assert cfg.test_input_size == (3, v.test_size, v.test_size)
        assert cfg.crop_pct == pytest.approx(v.test_size / (v.test_size + 32))
        assert (cfg.interpolation, cfg.crop_mode) == ("bicubic", "squash")
        assert cfg.paper_ids == "arXiv:2102.06171" and cfg.classifier == "head.fc"
    assert timm.get_pretrained_cfg("nfnet_f1").hf_hub_id == "timm/dm_nfnet_f1.dm_in1k"  # default tag
    assert timm.is_model_pretrained("nfnet_f1") and not timm.is_model_pretrained("nfnet_f7")


def test_deepmind_eval_transform():
    model = timm.create_model("nfnet_zoo_tiny")
    model.pretrained_cfg = timm.get_pretrained_cfg("nfnet_f1.dm_in1k").to_dict()
    cfg = timm.data.resolve_data_config({}, model=model, use_test_size=True)
    t = timm.data.create_transform(**cfg)
    resize = t.transforms[0]
    assert tuple(resize.size) == (352, 352)  # squash-resize to S + 32, then centre crop S
    assert t.transforms[1].size == (320, 320)


@pytest.mark.parametrize("name", ["nfnet_f7", "nfnet_f0_plus", "nfnet_zoo_tiny"])
def test_no_weights_is_a_clear_error(name):
    with pytest.raises(NFNetZooError, match="has no released pretrained weights"):
        timm.create_model(name, pretrained=True)


def test_unknown_name_is_one_line():
    with pytest.raises(RuntimeError, match="Unknown model") as e:
        timm.create_model("nfnet_f9")
    assert "\n" not in str(e.value)


def test_overrides_describe_any_shape():
    m = timm.create_model("nfnet_f0", depths=(1, 1, 1, 1), widths=(32, 64, 96, 128), group_width=8,
                          se_ratio=0.25, activation="silu", alpha=0.3, expansion=0.75, num_classes=5,
                          stochdepth_rate=0.2)
    assert m.stages[1][0].conv2.weight.shape == (48, 8, 3, 3)  # 64 * 0.75 = 48, groups of 8
    assert m.stages[0][0].attn_last.fc1.out_channels == 8
    assert m.stages[0][0].act1.activation == "silu" and m.stages[0][0].alpha == 0.3
    assert m.stages[3][0].drop_path.rate == pytest.approx(0.2 * 3 / 4)
    assert m.get_classifier().out_features == 5


def _hf_cache(root, repo, state_dict):
    """A Hugging Face cache laid out as huggingface_hub writes it, holding one safetensors file."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = root / "hub" / f"models--{repo.replace('/', '--')}"
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    save_file(state_dict, str(snap / "model.safetensors"))
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)


def test_pretrained_loads_from_the_hub_cache_offline(tmp_path):
    torch.manual_seed(0)
    weights = {k: v.contiguous() for k, v in timm.create_model("dm_nfnet_f0").state_dict().items()}
    _hf_cache(tmp_path, "timm/dm_nfnet_f0.dm_in1k", weights)
    save_file(weights, str(tmp_path / "expected.safetensors"))
    script = textwrap.dedent(f"""
        import torch, timm, nfnet_zoo
        from safetensors.torch import load_file
        expected = load_file({str(tmp_path / 'expected.safetensors')!r})
        m = timm.create_model("nfnet_f0", pretrained=True)
        assert all(torch.equal(v, expected[k]) for k, v in m.state_dict().items())
        m7 = timm.create_model("nfnet_f0", pretrained=True, num_classes=7)
        sd = m7.state_dict()
        assert sd["head.fc.weight"].shape == (7, 3072)
        assert all(torch.equal(v, expected[k]) for k, v in sd.items() if not k.startswith("head."))
        print("ok")
    """)
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_readme_table_matches_variant_table():
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for i, (top1, top5) in nfnet_zoo.DM_ACCURACY.items():
        v = VARIANTS[f"nfnet_f{i}"]
        assert f"| `nfnet_f{i}` | {v.train_size} | {v.test_size} |" in readme
        assert f"| {top1} | {top5} |" in readme
    assert json.loads(json.dumps(nfnet_zoo.list_pretrained_names()))[0] == "nfnet_f0.dm_in1k"
