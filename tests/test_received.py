"""Model folders and Hub repos someone sent you: every damage is one line, before anything large is allocated.

References: real files on disk (a model folder as `save_for_hf` and the shared form write it, then damaged
the ways a hostile sender can), the real huggingface_hub client against the local Hub server, and the
process's own peak memory (resource.getrusage) for a config that asks for a gigantic network.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from _images import make_folder

CLI = [sys.executable, "-m", "nfnet_zoo_cli"]
LABELS = ["bright", "dark", "mid"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny model folder in the shared form (what finetune writes), and an image folder of its classes."""
    import timm
    from timm.models import save_for_hf

    import nfnet_zoo  # noqa: F401
    from nfnet_zoo.models.shared_config import rewrite_shared

    root = tmp_path_factory.mktemp("received")
    torch.manual_seed(0)
    model = timm.create_model("nfnet_zoo_tiny", num_classes=3)
    save_for_hf(model, root / "model", model_config={"label_names": LABELS}, model_args={},
                safe_serialization=True)
    rewrite_shared(root / "model" / "config.json", eval_size=32, notes=["test"])
    make_folder(root / "data", n_train=2, n_val=2, split=False)
    return root / "model"


def _damaged(model_dir: Path, tmp_path: Path, damage: str) -> Path:
    import shutil
    folder = Path(shutil.copytree(model_dir, tmp_path / "model"))
    cfg = json.loads((folder / "config.json").read_text())
    weights = load_file(folder / "model.safetensors")
    if damage == "not strict":  # timm's loader would take this and leave a random backbone
        cfg["pretrained_cfg"]["pretrained_strict"] = False
        weights = {k: v for k, v in weights.items() if k.startswith("head.")}
    elif damage == "nan weights":
        weights = {k: torch.full_like(v, float("nan")) for k, v in weights.items()}
    elif damage == "int64 weights":
        weights = {k: v.round().long() for k, v in weights.items()}
    elif damage == "group_width 0":
        cfg["nfnet_zoo"]["model_args"]["group_width"] = 0
    elif damage == "mean of 2 values":
        cfg["pretrained_cfg"]["mean"] = [0.5, 0.5]
    elif damage == "label_names too short":
        cfg["label_names"] = LABELS[:2]
    elif damage == "label_names a dict":
        cfg["label_names"] = dict(enumerate(LABELS))
    elif damage == "test_input_size 20000":
        cfg["pretrained_cfg"]["test_input_size"] = [3, 20000, 20000]
    elif damage == "section not an object":
        cfg["nfnet_zoo"] = 5
    elif damage == "section architecture 3":
        cfg["nfnet_zoo"]["architecture"] = 3
    elif damage == "section model_args a list":
        cfg["nfnet_zoo"]["model_args"] = [1, 2]
    elif damage == "section loads a file":
        cfg["nfnet_zoo"]["model_args"]["checkpoint_path"] = str(tmp_path / "evil.pth")
    elif damage == "interpolation nope":
        cfg["pretrained_cfg"]["interpolation"] = "nope"
    elif damage == "num_classes 10**9":
        cfg["num_classes"] = 10 ** 9
        cfg.pop("label_names")
    elif damage == "truncated weights":
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "non-JSON config":
        (folder / "config.json").write_text("<html>not json</html>")
    if damage not in ("truncated weights", "non-JSON config", "none"):
        (folder / "config.json").write_text(json.dumps(cfg))
        save_file(weights, folder / "model.safetensors")
    return folder


DAMAGES = {"not strict": "missing", "nan weights": "NaN or infinite", "int64 weights": "not floating point",
           "group_width 0": "does not build", "mean of 2 values": "pretrained_cfg.mean",
           "label_names too short": "label_names", "label_names a dict": "label_names",
           "test_input_size 20000": "pretrained_cfg.test_input_size", "truncated weights": "truncated",
           "non-JSON config": "config.json is damaged", "section not an object": "nfnet_zoo is 5",
           "section architecture 3": "nfnet_zoo.architecture is 3", "section model_args a list": "nfnet_zoo.model_args",
           "section loads a file": "checkpoint_path: files or downloads to load",
           "interpolation nope": "pretrained_cfg.interpolation", "num_classes 10**9": "does not fit"}


def _one_line(args, env=None) -> str:
    """`nfnet-zoo ARGS` in a process of its own: exit 2 and one line."""
    r = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, env=env, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    return lines[0]


def _one_line_here(args, capsys) -> str:
    """The same in this process (the command's code path is the same; an interpreter start costs seconds)."""
    from nfnet_zoo_cli import main
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, (code, err)
    return err[0]


@pytest.mark.parametrize("damage", list(DAMAGES))
@pytest.mark.parametrize("form", ["folder", "local-dir:"])
def test_a_damaged_model_folder_is_one_line_for_predict(model_dir, tmp_path, damage, form, capsys):
    folder = _damaged(model_dir, tmp_path, damage)
    image = next((model_dir.parent / "data").rglob("*.png"))
    line = _one_line_here(["predict", f"{'' if form == 'folder' else form}{folder}", image], capsys)
    assert line.startswith("nfnet-zoo predict: error: ") and DAMAGES[damage] in line and str(folder) in line, line


@pytest.mark.parametrize("damage", ["not strict", "nan weights", "int64 weights", "group_width 0",
                                    "label_names a dict", "test_input_size 20000"])
def test_evaluate_and_finetune_checkpoint_refuse_the_same(model_dir, tmp_path, damage, capsys):
    folder = _damaged(model_dir, tmp_path, damage)
    data = model_dir.parent / "data"
    line = _one_line_here(["evaluate", folder, "--data-dir", data, "-j", "0"], capsys)
    assert line.startswith("nfnet-zoo evaluate: error: ") and DAMAGES[damage] in line, line
    line = _one_line_here(["finetune", "--checkpoint", folder, "--data-dir", data, "--output", tmp_path / "ft",
                           "-j", "0", "--img-size", "32", "-b", "2"], capsys)
    assert line.startswith("nfnet-zoo finetune: error: --checkpoint ") and DAMAGES[damage] in line, line
    # one process's warnings (the classifier replaced) go to stderr too: the line is the last
    assert not (tmp_path / "ft").exists()


_PEAK = r"""
import resource, sys
from nfnet_zoo_cli import main
code = main(sys.argv[1:])
print(code, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def test_a_small_config_that_asks_for_a_huge_network_allocates_nothing(model_dir, tmp_path):
    folder = _damaged(model_dir, tmp_path, "none")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["nfnet_zoo"]["model_args"]["widths"] = [65536] * 4  # about 80 GB of float32 weights
    (folder / "config.json").write_text(json.dumps(cfg))
    image = next((model_dir.parent / "data").rglob("*.png"))
    peaks = {}
    for name, model in (("tiny", model_dir), ("huge", folder)):
        r = subprocess.run([sys.executable, "-c", _PEAK, "predict", str(model), str(image)], capture_output=True,
                           text=True, timeout=300)
        code, peaks[name] = map(int, r.stdout.splitlines()[-1].split())
        assert code == (2 if name == "huge" else 0), r.stderr
    assert "does not fit" in r.stderr, r.stderr
    assert peaks["huge"] < peaks["tiny"] + 200, peaks  # MB: refused before its 80 GB were asked for


def test_hub_repos_that_do_not_fit_or_are_truncated_are_one_line_downloaded_or_cached(hub, model_dir, tmp_path,
                                                                                       monkeypatch):
    import huggingface_hub.constants
    from huggingface_hub import HfApi

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)  # the local server speaks LFS

    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.endpoint, HF_HUB_DISABLE_XET="1", HF_HOME=str(tmp_path / "hf_home"),
               HF_TOKEN=hub.token, HF_HUB_DISABLE_PROGRESS_BARS="1")
    api = HfApi(endpoint=hub.endpoint, token=hub.token)
    image = next((model_dir.parent / "data").rglob("*.png"))
    for damage, words in (("group_width 0", "does not build"), ("truncated weights", "truncated"),
                          ("not strict", "missing")):
        folder = _damaged(model_dir, tmp_path / damage.replace(" ", "_"), damage)
        repo = f"{hub.user}/{damage.replace(' ', '-')}"
        api.create_repo(repo)
        api.upload_folder(repo_id=repo, folder_path=folder)
        for attempt in ("downloaded", "cached"):
            line = _one_line(["predict", f"hf-hub:{repo}", image], env)
            assert line.startswith("nfnet-zoo predict: error: ") and f"hf-hub:{repo}" in line, (attempt, line)
            assert words in line and "could not be downloaded" not in line, (attempt, line)


def test_a_bare_weights_file_with_integers_or_nan_is_refused_by_finetune_checkpoint(model_dir, tmp_path, capsys):
    data = model_dir.parent / "data"
    weights = load_file(model_dir / "model.safetensors")
    for name, state in (("int", {k: v.long() for k, v in weights.items()}),
                        ("nan", {k: v * float("nan") for k, v in weights.items()})):
        save_file(state, tmp_path / f"{name}.safetensors")
        line = _one_line_here(["finetune", "--model", "nfnet_zoo_tiny", "--checkpoint", tmp_path / f"{name}.safetensors",
                               "--data-dir", data, "--output", tmp_path / name, "-j", "0", "--img-size", "32", "-b", "2"],
                              capsys)
        assert ("not floating point" if name == "int" else "NaN or infinite") in line, line


def test_a_model_folder_whose_files_link_out_of_it_is_refused(model_dir, tmp_path, capsys):
    import shutil
    folder = Path(shutil.copytree(model_dir, tmp_path / "model"))
    other = Path(shutil.copytree(model_dir, tmp_path / "elsewhere"))
    image = next((model_dir.parent / "data").rglob("*.png"))
    for name in ("config.json", "model.safetensors"):
        (folder / name).unlink()
        (folder / name).symlink_to(other / name)
        for args in (["predict", folder, image], ["predict", f"local-dir:{folder}", image],
                     ["finetune", "--checkpoint", folder, "--data-dir", model_dir.parent / "data", "--output",
                      tmp_path / "ft", "-j", "0", "--img-size", "32", "-b", "2"]):
            line = _one_line_here(args, capsys)
            assert f"{folder / name} is a link out of its folder" in line, line
        (folder / name).unlink()
        shutil.copy(other / name, folder / name)


@pytest.mark.parametrize("damage", ["not strict", "group_width 0", "section model_args a list", "interpolation nope",
                                    "num_classes 10**9", "section loads a file"])
def test_push_refuses_what_predict_refuses(model_dir, tmp_path, damage, capsys):
    folder = _damaged(model_dir, tmp_path, damage)
    line = _one_line_here(["push", folder, "--repo-id", "someone/x", "--dry-run"], capsys)
    assert line.startswith("nfnet-zoo push: error: ") and DAMAGES[damage] in line, line
