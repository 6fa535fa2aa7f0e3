"""A pushed model, as the people who receive it load it: timm and transformers, with and without nfnet-zoo.

References: `nfnet-zoo predict` on each run's validation images (the numbers the run reports); timm's own
NormFreeNet and transformers' TimmWrapper (`AutoModelForImageClassification`, `AutoImageProcessor`,
`pipeline`), the real libraries, in processes that never import nfnet_zoo; the local Hub-protocol server
(tests/hub_server.py). Runs are real `nfnet-zoo finetune` runs: an F-family shape from scratch and from
weights, and `nfnet_zoo_tiny` (an architecture timm's NFNet cannot express).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _images import make_folder

CLI = [sys.executable, "-m", "nfnet_zoo_cli"]
F_SHAPE = ["depths=(1,1,1,1)", "widths=(256,256,256,256)"]  # an F-family stem: timm's NfCfg describes it
LOADERS_SCRIPT = str(Path(__file__).parent / "_loaders.py")
NATIVE_GAP = 1e-3  # what the issue allows timm's own NFNet (erf GELU) against nfnet-zoo's probabilities


def _run(args, env, timeout=600) -> subprocess.CompletedProcess:
    r = subprocess.run([*map(str, args)], env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """Three runs, pushed to a local Hub; each with `nfnet-zoo predict`'s probabilities on its validation images."""
    from hub_server import HubServer

    root = tmp_path_factory.mktemp("sharing")
    server = HubServer(root / "hub", user="alice", token="hf_DummyNfnetZooToken0123456789abcd").start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=server.endpoint, HF_HUB_DISABLE_XET="1", HF_HOME=str(root / "hf_home"),
               HF_TOKEN=server.token, HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_TELEMETRY="1",
               TRANSFORMERS_VERBOSITY="error")
    data = make_folder(root / "data", n_train=8, n_val=4)
    images = sorted(str(p) for p in (data / "val").rglob("*.png"))

    import timm
    from timm.models import save_for_hf

    import nfnet_zoo  # noqa: F401
    from _weights import pretrained_like_
    torch.manual_seed(0)
    start = pretrained_like_(timm.create_model("nfnet_f0", num_classes=3, depths=(1, 1, 1, 1), widths=(256,) * 4))
    save_for_hf(start, root / "start", model_args={"depths": [1, 1, 1, 1], "widths": [256] * 4, "num_classes": 3},
                model_config={"label_names": ["bright", "dark", "mid"]}, safe_serialization=True)
    common = ["--data-dir", data, "--epochs", "1", "-b", "8", "--img-size", "48", "--test-img-size", "64",
              "-j", "0", "--seed", "0"]
    runs = {"f_scratch": ["--model", "nfnet_f0", "--model-kwargs", *F_SHAPE, "--no-pretrained"],
            "f_weights": ["--checkpoint", root / "start", "--lr", "0.01"],
            "tiny": ["--model", "nfnet_zoo_tiny", "--no-pretrained"]}
    out = {"server": server, "env": env, "images": images, "root": root}
    for name, args in runs.items():
        run = root / name
        _run([*CLI, "finetune", *args, *common, "--output", run], env)
        repo = f"{server.user}/{name.replace('_', '-')}"
        _run([*CLI, "push", run, "--repo-id", repo], env)
        predicted = json.loads(_run([*CLI, "predict", run, *images, "-k", "3", "--json"], env).stdout)
        out[name] = {"run": run, "repo": repo, "predict": _probabilities(predicted)}
    yield out
    server.stop()


def _probabilities(results: list[dict]) -> list[list[float]]:
    """predict's JSON as one probability vector per image, by class index."""
    rows = []
    for r in results:
        row = [0.0] * len(r["predictions"])
        for p in r["predictions"]:
            row[p["index"]] = p["probability"]
        rows.append(row)
    return rows


def _load_everywhere(shared, name: str, with_zoo: bool) -> dict:
    r = _run([sys.executable, LOADERS_SCRIPT, "hf-hub:" + shared[name]["repo"], json.dumps(shared["images"]),
              "1" if with_zoo else "0"], shared["env"])
    out = json.loads(r.stdout.splitlines()[-1])
    assert out.pop("nfnet_zoo imported") == with_zoo
    return out


def _gap(reference: list[list[float]], probs: list[list[float]]) -> float:
    return (torch.tensor(reference) - torch.tensor(probs)).abs().max().item()


def _assert_same_decisions(reference: list[list[float]], probs: list[list[float]], gap: float) -> None:
    """Top-1 agrees on every image whose top-1 margin in `reference` is wider than twice the gap."""
    ref, got = torch.tensor(reference), torch.tensor(probs)
    top2 = ref.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * gap
    assert clear.sum() >= len(ref) // 2, "the runs' predictions are too close to call; train longer"
    assert torch.equal(ref.argmax(1)[clear], got.argmax(1)[clear])


LOADERS = ("timm", "AutoModelForImageClassification", "TimmWrapperForImageClassification", "pipeline")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["f_scratch", "f_weights"])
def test_an_f_family_run_loads_in_plain_timm_and_transformers_near_nfnet_zoo(shared, name):
    reference = shared[name]["predict"]
    for with_zoo in (False, True):
        loaded = _load_everywhere(shared, name, with_zoo)
        for loader in LOADERS:  # timm's own NormFreeNet in every case: what config.json names
            probs = loaded[loader]
            assert not isinstance(probs, dict), (with_zoo, loader, probs)
            gap = _gap(reference, probs)
            assert gap <= NATIVE_GAP, (with_zoo, loader, gap)
            _assert_same_decisions(reference, probs, gap)
        if with_zoo:  # nfnet-zoo's own loader builds the recorded architecture: predict's numbers exactly
            assert loaded["nfnet_zoo.load_model"] == reference


@pytest.mark.slow
def test_an_architecture_timm_cannot_express_fails_loudly_without_nfnet_zoo_and_is_exact_with_it(shared):
    plain = _load_everywhere(shared, "tiny", with_zoo=False)
    assert "Unknown model (nfnet_zoo_tiny)" in plain["timm"]["error"]
    for loader in LOADERS[1:]:  # transformers says which architecture its timm lacks
        assert "nfnet_zoo_tiny" in plain[loader]["error"], plain[loader]
    zoo = _load_everywhere(shared, "tiny", with_zoo=True)
    reference = shared["tiny"]["predict"]
    assert zoo["timm"] == reference and zoo["nfnet_zoo.load_model"] == reference
    for loader in LOADERS[1:]:  # transformers' own preprocessing and softmax: float32 rounding only
        assert _gap(reference, zoo[loader]) <= 1e-6, (loader, zoo[loader])


def test_config_and_card_say_what_loads_the_model(shared):
    from huggingface_hub import ModelCard

    files = {name: shared["server"].files(shared[name]["repo"]) for name in ("f_scratch", "f_weights", "tiny")}
    configs = {name: json.loads(f["config.json"]) for name, f in files.items()}
    for name, config in configs.items():
        assert "num_classes" not in config["model_args"]  # transformers passes num_classes itself
        pcfg = config["pretrained_cfg"]
        # the evaluation's preprocessing for every loader: 64 px, DeepMind's squash crop from 96
        assert pcfg["input_size"] == pcfg["test_input_size"] == [3, 64, 64]
        assert pcfg["crop_mode"] == "squash" and pcfg["crop_pct"] == pytest.approx(64 / 96)
        assert "tag" not in pcfg and "origin_url" not in pcfg  # not DeepMind's released weights
    assert configs["f_scratch"]["architecture"] == configs["f_weights"]["architecture"] == "dm_nfnet_f0"
    assert configs["f_scratch"]["nfnet_zoo"] == {"architecture": "nfnet_f0", "model_args": {
        "depths": [1, 1, 1, 1], "widths": [256, 256, 256, 256], "global_pool": "avg"}}
    assert configs["f_scratch"]["pretrained_cfg"]["notes"] == ["trained from scratch with nfnet-zoo"]
    assert configs["f_weights"]["pretrained_cfg"]["notes"] == ["fine-tuned with nfnet-zoo from the local weights "
                                                               "start"]
    assert configs["tiny"]["architecture"] == "nfnet_zoo_tiny" and configs["tiny"]["nfnet_zoo"]["architecture"] == \
        "nfnet_zoo_tiny"

    cards = {name: ModelCard(f["README.md"].decode()) for name, f in files.items()}
    for name, card in cards.items():
        assert card.data.datasets is None  # a local folder's name is not a Hub dataset id
        assert card.data.eval_results[0].dataset_type == "imagefolder"
    assert cards["f_scratch"].data.library_name == "timm" and "trained from scratch" in cards["f_scratch"].text
    assert cards["tiny"].data.library_name is None  # the Hub's timm snippet would lack the import
    assert "pip install nfnet-zoo" in cards["tiny"].text and "import nfnet_zoo" in cards["tiny"].text
    assert "`dm_nfnet_f0`" in cards["f_scratch"].text and "nfnet_zoo.load_model" in cards["f_scratch"].text


def test_predict_from_the_hub_is_predict_from_the_run(shared):
    for name in ("f_scratch", "tiny"):
        r = _run([*CLI, "predict", f"hf-hub:{shared[name]['repo']}", *shared["images"], "-k", "3", "--json"],
                 shared["env"])
        assert _probabilities(json.loads(r.stdout)) == shared[name]["predict"]


def test_push_names_a_hub_dataset_only_when_told(shared, tmp_path):
    from huggingface_hub import ModelCard

    run, env = shared["f_scratch"]["run"], shared["env"]
    repo = f"{shared['server'].user}/with-dataset"
    _run([*CLI, "push", run, "--repo-id", repo, "--dataset", "beans"], env)
    card = ModelCard(shared["server"].files(repo)["README.md"].decode())
    assert card.data.datasets == ["beans"] and card.data.eval_results[0].dataset_type == "beans"
    r = subprocess.run([*CLI, "push", run, "--repo-id", repo, "--dataset", "not a/dataset/id"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--dataset 'not a/dataset/id'" in r.stderr


def test_an_older_run_folder_is_pushed_in_the_shared_form(tmp_path):
    import timm
    from timm.models import save_for_hf

    import nfnet_zoo
    from nfnet_zoo.hub.push import push_to_hub

    run = tmp_path / "old"
    model = timm.create_model("nfnet_f0", num_classes=2, depths=(1, 1, 1, 1), widths=(256,) * 4)
    save_for_hf(model, run, model_args={"num_classes": 2, "depths": [1, 1, 1, 1], "widths": [256] * 4},
                safe_serialization=True)  # what finetune wrote before the shared form
    nfnet_zoo.write_model_card(run)
    files = {f.path: f for f in push_to_hub(run, "someone/old", dry_run=True).files}
    config = json.loads(files["config.json"].source)
    assert "converted to the shared form" in files["config.json"].note
    assert config["architecture"] == "dm_nfnet_f0" and "num_classes" not in config["model_args"]
    assert config["nfnet_zoo"]["architecture"] == "nfnet_f0"


_TIMM_OWN = r"""
import json, sys
import torch, timm
from timm.models import save_for_hf
torch.manual_seed(0)
out = {}
for name, args in (("depths", dict(depths=[1, 1, 1, 1])), ("channels", dict(depths=[1, 1, 1, 1], channels=[256] * 4,
                                                                           num_features=512))):
    model = timm.create_model("nfnet_f0", num_classes=3, **args).eval()
    save_for_hf(model, f"{sys.argv[1]}/{name}", model_args=args, safe_serialization=True)
    with torch.no_grad():
        out[name] = model(torch.linspace(-1, 1, 2 * 3 * 40 * 40).reshape(2, 3, 40, 40)).tolist()
print(json.dumps(out))
"""


@pytest.mark.slow
def test_a_checkpoint_of_timms_own_nfnet_f0_still_loads_after_import_nfnet_zoo(tmp_path):
    """timm's own nfnet_f0 is another network (no skip gains); importing nfnet_zoo must not strand it."""
    import timm

    import nfnet_zoo  # noqa: F401

    r = subprocess.run([sys.executable, "-c", _TIMM_OWN, str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    expected = json.loads(r.stdout.splitlines()[-1])
    x = torch.linspace(-1, 1, 2 * 3 * 40 * 40).reshape(2, 3, 40, 40)
    for name in ("depths", "channels"):
        with pytest.warns(UserWarning, match="timm's own nfnet_f0"):
            model = timm.create_model(f"local-dir:{tmp_path / name}", pretrained=True).eval()
        assert type(model).__name__ == "NormFreeNet"
        with torch.no_grad():
            assert model(x).tolist() == expected[name]
        with pytest.warns(UserWarning, match="timm's own nfnet_f0"):
            assert type(nfnet_zoo.load_model(str(tmp_path / name))).__name__ == "NormFreeNet"
        # push leaves timm's own config.json as plain timm wrote it (never converted into DeepMind's NFNet)
        with pytest.warns(UserWarning, match="timm's own nfnet_f0"):
            files = {f.path: f for f in nfnet_zoo.push_to_hub(tmp_path / name, "someone/own", dry_run=True).files}
        assert files["config.json"].source == tmp_path / name / "config.json" and "timm's own" in files["config.json"].note


def test_settings_timm_cannot_take_fall_back_to_nfnet_zoo_custom():
    """An activation timm's NfCfg has a gamma for but no function (softplus ...), a bottleneck timm rounds
    otherwise: not timm-native, and the shared config is still written (a crash there ended runs after epoch 1)."""
    import nfnet_zoo  # noqa: F401
    from nfnet_zoo.models.shared_config import share_config, timm_native

    for args in ({"activation": "softplus"}, {"activation": "identity"}, {"activation": "log_sigmoid"},
                 {"expansion": 0.25}):
        assert timm_native("nfnet_f0", args) is None, args
        shared = share_config({"architecture": "nfnet_f0", "num_classes": 2, "model_args": args})
        assert shared["architecture"] == "nfnet_zoo_custom" and shared["nfnet_zoo"]["model_args"] == args
