"""`nfnet-zoo evaluate` and `nfnet-zoo predict` against an independent pipeline.

Reference: timm's `local-dir:` loader and DeepMind's evaluation preprocessing written out here with
PIL (squash-resize to S + 32, bicubic; centre crop S; ImageNet normalisation), on real PNG files.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _images import make_folder
import nfnet_zoo  # noqa: F401
from nfnet_zoo import NFNetZooError
from nfnet_zoo_cli import main as cli_main
from nfnet_zoo.evaluation import evaluate, predict
from nfnet_zoo.training.finetune import finetune

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("eval") / "shapes", n_train=12, n_val=5)


@pytest.fixture(scope="module")
def run(data_dir, tmp_path_factory) -> Path:
    return finetune(model="nfnet_zoo_tiny", data_dir=str(data_dir), output=str(tmp_path_factory.mktemp("r") / "run"),
                    epochs=2, lr=0.1, img_size=32, batch_size=8, workers=0, pretrained=False)


def _reference_logits(run: Path, files: list[Path]) -> torch.Tensor:
    import timm
    model = timm.create_model(f"local-dir:{run}", pretrained=True).eval()
    s = 32
    batch = []
    for f in files:
        img = Image.open(f).convert("RGB").resize((s + 32, s + 32), Image.BICUBIC)
        img = img.crop((16, 16, 16 + s, 16 + s))
        a = (np.asarray(img, dtype=np.float64) / 255 - MEAN) / STD
        batch.append(torch.from_numpy(a.transpose(2, 0, 1)).float())
    with torch.no_grad():
        return model(torch.stack(batch))


def test_evaluate_matches_an_independent_pipeline(run, data_dir):
    files = sorted((data_dir / "val").glob("*/*.png"))
    classes = ["bright", "dark", "mid"]
    target = torch.tensor([classes.index(f.parent.name) for f in files])
    logits = _reference_logits(run, files)
    hit = logits.argmax(1) == target
    result = evaluate(str(run), data_dir, workers=0)
    assert result["num_images"] == len(files) == 15
    assert result["top1"] == pytest.approx(100 * hit.float().mean().item())
    assert result["top5"] == 100.0  # 3 classes: every label is in the top 5
    for i, c in enumerate(classes):
        assert result["per_class"][c]["count"] == 5
        assert result["per_class"][c]["accuracy"] == pytest.approx(100 * hit[target == i].float().mean().item())


def test_predict_matches_an_independent_pipeline(run, data_dir):
    files = sorted((data_dir / "val").glob("*/*.png"))[::4]
    probs = _reference_logits(run, files).softmax(1)
    out = predict(str(run), [str(f) for f in files], topk=3)
    assert [r["image"] for r in out] == [str(f) for f in files]
    for r, p in zip(out, probs):
        got = {q["label"]: q["probability"] for q in r["predictions"]}
        assert list(got) == [["bright", "dark", "mid"][i] for i in p.argsort(descending=True).tolist()]
        assert sum(got.values()) == pytest.approx(1.0, abs=1e-5)
        for q in r["predictions"]:
            assert q["probability"] == pytest.approx(p[q["index"]].item(), abs=1e-5)


def test_cli_json_outputs(run, data_dir, capsys):
    assert cli_main(["evaluate", str(run), "--data-dir", str(data_dir), "-j", "0", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert set(ev) >= {"top1", "top5", "per_class", "num_images"} and ev["num_images"] == 15
    image = next((data_dir / "val" / "dark").glob("*.png"))
    assert cli_main(["predict", str(run), str(image), "-k", "2", "--json"]) == 0
    pr = json.loads(capsys.readouterr().out)
    assert len(pr) == 1 and len(pr[0]["predictions"]) == 2
    assert cli_main(["evaluate", str(run), "--data-dir", str(data_dir), "-j", "0"]) == 0
    text = capsys.readouterr().out
    assert "top-1" in text and "dark" in text


def test_a_subset_of_the_classes_is_evaluated_against_all_of_them(run, data_dir, tmp_path):
    sub = tmp_path / "sub"
    (sub / "mid").mkdir(parents=True)
    for f in (data_dir / "val" / "mid").glob("*.png"):
        (sub / "mid" / f.name).write_bytes(f.read_bytes())
    r = evaluate(str(run), sub, workers=0)
    assert r["num_images"] == 5 and list(r["per_class"]) == ["mid"]


@pytest.mark.parametrize("case, message", [
    ("other_classes", "classes of .* that the model does not know: cats"),
    ("not_a_model_folder", "is not a model folder"),
    ("unreadable_image", "cannot read image"),
    ("unknown_name", "unknown model 'nfnet_fx'; closest"),
])
def test_faults_are_one_line_errors(case, message, run, tmp_path):
    if case == "other_classes":
        make_folder(tmp_path / "d", n_train=1, n_val=0, split=False, classes=("dark",))
        (tmp_path / "d" / "dark").rename(tmp_path / "d" / "cats")
        call = lambda: evaluate(str(run), tmp_path / "d", workers=0)
    elif case == "not_a_model_folder":
        (tmp_path / "empty").mkdir()
        call = lambda: predict(str(tmp_path / "empty"), [])
    elif case == "unreadable_image":
        (tmp_path / "x.png").write_bytes(b"nope")
        call = lambda: predict(str(run), [str(tmp_path / "x.png")])
    else:
        call = lambda: predict("nfnet_fx", [])
    with pytest.raises(NFNetZooError, match=message) as e:
        call()
    assert "\n" not in str(e.value)


def test_registered_name_without_cached_weights(tmp_path, data_dir):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    r = subprocess.run([sys.executable, "-m", "nfnet_zoo_cli", "evaluate", "nfnet_f0", "--data-dir", str(data_dir)],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "not in the local cache" in r.stderr.strip().splitlines()[-1]


# --- the run's own data, and weights that are not cached (issue 15) -----------------------------
def test_a_runs_own_flat_folder_is_scored_on_its_held_out_split_only(tmp_path, capsys):
    flat = make_folder(tmp_path / "flat", n_train=10, n_val=0, split=False)
    run = finetune(model="nfnet_zoo_tiny", data_dir=str(flat), output=str(tmp_path / "run"), epochs=1, lr=0.1,
                   img_size=32, batch_size=8, workers=0, pretrained=False)
    held = json.loads((run / "data.json").read_text())["val"]
    assert 0 < len(held) < 30
    files = [flat / k for k, _ in held]
    classes = ["bright", "dark", "mid"]
    hit = _reference_logits(run, files).argmax(1) == torch.tensor([classes.index(f.parent.name) for f in files])
    result = evaluate(str(run), flat, workers=0)
    assert result["num_images"] == len(held) and "held-out split" in result["split"]
    assert result["top1"] == pytest.approx(100 * hit.float().mean().item())
    assert cli_main(["evaluate", str(run), "--data-dir", str(flat), "-j", "0"]) == 0
    assert f"evaluated on the run's held-out split: {len(held)} images" in capsys.readouterr().out
    # a copy of the folder is other data: all of it is scored
    copy = make_folder(tmp_path / "copy", n_train=10, n_val=0, split=False)
    assert evaluate(str(run), copy, workers=0)["num_images"] == 30
    # a damaged data.json cannot tell: all images, with a warning saying what that means
    (run / "data.json").write_text("{not json")
    with pytest.warns(UserWarning, match="scores include its training images"):
        assert evaluate(str(run), flat, workers=0)["num_images"] == 30


def test_an_unreadable_evaluation_folder_is_one_line(run, tmp_path, capsys):
    for c in ("dark", "mid"):
        (tmp_path / "d" / c).mkdir(parents=True)
        (tmp_path / "d" / c / "x.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    with pytest.warns(UserWarning, match="skipped 2 unreadable"):
        assert cli_main(["evaluate", str(run), "--data-dir", str(tmp_path / "d"), "-j", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("nfnet-zoo evaluate: error: no readable images to evaluate")


_RECORD_CONNECTIONS = """
import socket, sys
calls = []
connect = socket.socket.connect
def recording(self, address):
    calls.append(address)
    return connect(self, address)
socket.socket.connect = recording
from nfnet_zoo_cli import main
rc = main(sys.argv[1:])
print(f"connections: {len(calls)}", file=sys.stderr)
sys.exit(rc)
"""


@pytest.mark.parametrize("network", ["HF_HUB_OFFLINE", "unreachable"])
def test_weights_that_are_not_cached_fail_at_once_offline(network, tmp_path, data_dir):
    env = dict(os.environ, HF_HOME=str(tmp_path / "empty-hf-home"))
    env.pop("HF_HUB_OFFLINE", None)
    if network == "HF_HUB_OFFLINE":
        env["HF_HUB_OFFLINE"] = "1"
    else:  # a closed port: each download attempt is refused, and the Hub client retries 5 times
        env["HF_ENDPOINT"] = "http://127.0.0.1:9"
    r = subprocess.run([sys.executable, "-c", _RECORD_CONNECTIONS, "evaluate", "nfnet_f0", "--data-dir", str(data_dir)],
                       env=env, capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr
    why = "HF_HUB_OFFLINE is set" if network == "HF_HUB_OFFLINE" else "the Hugging Face Hub cannot be reached"
    assert lines[-2] == (f"nfnet-zoo evaluate: error: pretrained weights for nfnet_f0 are not in the local cache and "
                         f"{why}; connect to the Hub once (with HF_HUB_OFFLINE unset), or pass a run folder or "
                         f"local-dir:PATH instead")
    assert lines[-1] == f"connections: {0 if network == 'HF_HUB_OFFLINE' else 1}"  # one probe, no retries


def test_the_hub_probe_against_a_real_server(hub, monkeypatch):
    from huggingface_hub import constants
    from nfnet_zoo.models.load import _hub_reachable
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    assert _hub_reachable()
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    assert not _hub_reachable()


def test_tta_averages_the_probabilities_of_the_image_and_its_mirror(run, data_dir, tmp_path, capsys):
    """--tta against the reference pipeline with torch.flip: the mean of the two softmaxes; and its effect: an image
    and its mirrored file get the same scores with --tta, different ones without (the model is not symmetric)."""
    files = sorted((data_dir / "val").glob("*/*.png"))
    x_logits = _reference_logits(run, files)
    mirrored = tmp_path / "mirrored"
    for f in files:
        (mirrored / f.parent.name).mkdir(parents=True, exist_ok=True)
        Image.open(f).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(mirrored / f.parent.name / f.name)
    m_files = sorted(mirrored.glob("*/*.png"))
    m_logits = _reference_logits(run, m_files)  # the mirror's preprocessing = the flip of the image's: same crop
    ref = (x_logits.softmax(1) + m_logits.softmax(1)) / 2
    plain = predict(str(run), [str(f) for f in files], topk=3)
    tta = predict(str(run), [str(f) for f in files], topk=3, tta=True)
    tta_m = predict(str(run), [str(f) for f in m_files], topk=3, tta=True)
    probs = lambda r: torch.tensor([{q["index"]: q["probability"] for q in r["predictions"]}[i] for i in range(3)])
    plain_m = predict(str(run), [str(f) for f in m_files], topk=3)
    assert max((probs(a) - probs(b)).abs().max().item() for a, b in zip(plain, plain_m)) > 1e-3  # flip matters
    for a, b, p in zip(tta, tta_m, ref):
        assert torch.allclose(probs(a), p, atol=1e-5) and torch.allclose(probs(b), p, atol=1e-5)
    classes = ["bright", "dark", "mid"]
    target = torch.tensor([classes.index(f.parent.name) for f in files])
    hit = ref.argmax(1) == target
    for folder in (data_dir, mirrored):
        result = evaluate(str(run), folder, workers=0, tta=True)
        assert result["tta"] is True and result["top1"] == pytest.approx(100 * hit.float().mean().item())
        for i, c in enumerate(classes):
            assert result["per_class"][c]["accuracy"] == pytest.approx(100 * hit[target == i].float().mean().item())
    # the command line passes it on
    assert cli_main(["evaluate", str(run), "--data-dir", str(mirrored), "-j", "0", "--tta", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(100 * hit.float().mean().item())
    assert cli_main(["predict", str(run), str(m_files[0]), "-k", "3", "--tta", "--jsonl"]) == 0
    assert torch.allclose(probs(json.loads(capsys.readouterr().out)), ref[0], atol=1e-5)
