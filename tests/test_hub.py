"""Publishing to the Hub: push, publish, model cards and zoo configs.

References: a local Hub-protocol server (tests/hub_server.py, written from huggingface_hub's
client code), the real huggingface_hub client and timm loading from it in a fresh process,
DeepMind's parameter shapes (tests/data/deepmind) and the paper's parameter and FLOP counts.
"""
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub import ModelCard

import nfnet_zoo
from nfnet_zoo import NFNetZooError, push_to_hub
from nfnet_zoo.models.cards import build_zoo_card, measure_model, write_zoo_cards, zoo_tags
from nfnet_zoo.hub.push import COMMIT_ATTEMPTS, publish_checkpoint
from nfnet_zoo.models.shared_config import rewrite_shared

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data" / "deepmind"
LABELS = ["cat", "dog", "fish"]


# --- helpers -----------------------------------------------------------------------------------
@pytest.fixture
def run(tmp_path):
    """A run folder by the fine-tuning contract, without training: tiny model, 3 classes."""
    from timm.models import save_for_hf

    run = tmp_path / "run"
    torch.manual_seed(0)
    model = timm.create_model("nfnet_zoo_tiny", num_classes=len(LABELS))
    save_for_hf(model, run, model_config={"label_names": LABELS}, model_args={"num_classes": len(LABELS)},
                safe_serialization=True)
    rewrite_shared(run / "config.json", eval_size=64, notes=["fine-tuned with nfnet-zoo"])  # as finetune does
    metrics = [dict(epoch=e, train_loss=1.2 / e, val_loss=1.1 / e, top1=50.0 + 10 * e, top5=100.0, lr=0.05 / e,
                    images_per_sec=120.0, clipped_fraction=0.02) for e in (1, 2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    (run / "args.json").write_text(json.dumps(dict(
        model="nfnet_zoo_tiny", data_dir="/data/pets", epochs=2, batch_size=8, lr=None, lr_base=0.1, momentum=0.9,
        weight_decay=2e-5, smoothing=0.1, clipping=0.01, img_size=64, mixed_precision="no", pretrained=True,
        base_model="timm/dm_nfnet_f0.dm_in1k", dataset="pets")))
    (run / "summary.json").write_text(json.dumps(dict(
        best_epoch=2, top1=70.0, top5=100.0, val_loss=0.55, num_train=30, num_val=9, num_classes=3,
        label_names=LABELS, model="nfnet_zoo_tiny", base_model="timm/dm_nfnet_f0.dm_in1k", img_size=64,
        train_time_s=3.2)))
    (run / "state").mkdir()
    (run / "state" / "optimizer.bin").write_bytes(os.urandom(64))
    torch.save({"w": torch.zeros(2)}, run / "pytorch_model.bin")  # a pickle: must never be uploaded
    nfnet_zoo.write_model_card(run)
    return run


def _tree_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _env(hub, tmp_path, token: bool = True) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.endpoint, HF_HUB_DISABLE_XET="1", HF_HOME=str(tmp_path / "hf_home"),
               HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_TELEMETRY="1")
    if token:
        env["HF_TOKEN"] = hub.token
    return env


def _cli(env: dict, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nfnet_zoo_cli", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=300)


def _requests(hub, since: int, method: str, part: str) -> list:
    return [r for r in hub.log[since:] if r[0] == method and part in r[1]]


_LOADER = """
import io, json, re, sys, contextlib
import nfnet_zoo, timm, torch
from PIL import Image
from huggingface_hub import ModelCard
from safetensors.torch import load_file

repo_id, reference, image = sys.argv[1:4]
model = timm.create_model("hf-hub:" + repo_id, pretrained=True)
ref, sd = load_file(reference), model.state_dict()
identical = sorted(sd) == sorted(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)
card = ModelCard.load(repo_id)
# Run the card's own usage snippet on a real image file.
snippet = re.search(r"```python\\n(.*?)```", card.text, re.S).group(1).replace("image.jpg", image)
out = io.StringIO()
with contextlib.redirect_stdout(out):
    exec(snippet, {})
d = card.data
print(json.dumps(dict(identical=identical, labels=model.pretrained_cfg.get("label_names"),
                      library_name=d.library_name, base_model=d.base_model, license=d.license,
                      results=[(r.metric_type, r.metric_value, r.dataset_name, r.dataset_split)
                               for r in d.eval_results or []],
                      usage_output=out.getvalue().splitlines())))
"""


def _load_from_hub(env: dict, tmp_path: Path, repo_id: str, reference: Path) -> dict:
    """timm.create_model('hf-hub:...') and ModelCard.load in a fresh process."""
    from PIL import Image

    image = tmp_path / "image.png"
    Image.new("RGB", (80, 60), (200, 120, 40)).save(image)
    r = subprocess.run([sys.executable, "-c", _LOADER, repo_id, str(reference), str(image)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.splitlines()[-1])


def _assert_one_line_error(r: subprocess.CompletedProcess, *words: str) -> str:
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    errors = [line for line in lines if ": error: " in line]
    assert len(errors) == 1 and errors[0] == lines[-1] and errors[0].startswith("nfnet-zoo "), r.stderr
    assert all("retrying" in line for line in lines[:-1]), r.stderr  # only our retry notices before it
    for w in words:
        assert w in errors[0], errors[0]
    return errors[0]


def _assert_token_nowhere(hub, tmp_path: Path, outputs: list[str]) -> None:
    assert hub.token not in "\n".join(outputs)
    for p in tmp_path.rglob("*"):
        if p.is_file():
            assert hub.token.encode() not in p.read_bytes(), p


# --- push ----------------------------------------------------------------------------------------
@pytest.fixture
def in_process(hub, monkeypatch):
    """For pushes inside this process: Xet off, the dummy token, and no retry sleeps (huggingface_hub's or ours)."""
    import huggingface_hub.constants
    import huggingface_hub.utils._http

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(huggingface_hub.utils._http.time, "sleep", lambda s: None)
    monkeypatch.setenv("HF_TOKEN", hub.token)


def _main(capsys, *args) -> tuple[int, str, str]:
    """`nfnet-zoo ARGS` in this process (for steps where a fresh interpreter adds nothing)."""
    from nfnet_zoo_cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_push_round_trip_and_unchanged_repush(hub, run, tmp_path, in_process, capsys):
    env, repo = _env(hub, tmp_path), f"{hub.user}/tiny-pets"
    before = _tree_hashes(run)

    code, dry, err = _main(capsys, "push", run, "--repo-id", repo, "--endpoint", hub.endpoint, "--dry-run")
    assert code == 0 and hub.log == []  # nothing contacted
    listed = [line.split()[0] for line in dry.splitlines()[1:] if not line.strip().startswith("not")]
    assert listed == ["model.safetensors", "config.json", "README.md"]
    assert "state/" in dry and "pytorch_model.bin" in dry.split("not uploaded:")[1]

    hub.faults.drop_upload = 1  # one dropped LFS upload: huggingface_hub's own retry must carry it
    pushed = _cli({**env, "HF_DEBUG": "1"}, "push", run, "--repo-id", repo)  # debug: every request logged
    assert pushed.returncode == 0, pushed.stderr
    assert "authorization: <TOKEN>" in pushed.stderr  # huggingface_hub's request log, the token masked
    assert [r[2] for r in _requests(hub, 0, "PUT", "/upload/")] == [0, 200]  # dropped once, sent once more
    files = hub.files(repo)
    assert sorted(files) == [".gitattributes", "README.md", "config.json", "model.safetensors"]
    assert files["model.safetensors"] == (run / "model.safetensors").read_bytes()
    assert files["config.json"] == (run / "config.json").read_bytes()
    assert f'"hf-hub:{repo}"' in files["README.md"].decode()  # the draft card, filled in with the repo id

    loaded = _load_from_hub(env, tmp_path, repo, run / "model.safetensors")
    assert loaded["identical"] and loaded["labels"] == LABELS
    # nfnet_zoo_tiny is not one of timm's architectures: no `library_name: timm`, whose Hub snippet lacks the import
    assert loaded["library_name"] is None and loaded["base_model"] == "timm/dm_nfnet_f0.dm_in1k"
    summary = json.loads((run / "summary.json").read_text())
    assert loaded["results"] == [["accuracy", summary["top1"], "pets", "validation"],
                                 ["top_5_accuracy", summary["top5"], "pets", "validation"]]
    assert len(loaded["usage_output"]) == 3 and all(line.split(":")[0] in LABELS for line in loaded["usage_output"])

    commits, mark = hub.commits(repo), len(hub.log)
    code, again, err = _main(capsys, "push", run, "--repo-id", repo, "--endpoint", hub.endpoint)
    assert code == 0 and "up to date" in again
    assert hub.commits(repo) == commits
    assert not _requests(hub, mark, "POST", "/commit/") and not _requests(hub, mark, "PUT", "/upload/")

    assert _tree_hashes(run) == before
    _assert_token_nowhere(hub, tmp_path, [dry, pushed.stdout, pushed.stderr, again, err])


def test_push_uploads_the_training_curves_and_the_card_shows_them(hub, run, in_process):
    from PIL import Image

    from nfnet_zoo.training.curves import write_curves

    assert "![" not in (run / "README.md").read_text() and "curves.png" not in (run / "README.md").read_text()
    dry = push_to_hub(run, f"{hub.user}/x", endpoint=hub.endpoint, dry_run=True)
    assert [f.path for f in dry.files] == ["model.safetensors", "config.json", "README.md"]  # none drawn: none sent

    write_curves(run)  # `nfnet-zoo curves RUN` after the run: RUN/README.md is still the draft without the image
    repo, before = f"{hub.user}/with-curves", _tree_hashes(run)
    result = push_to_hub(run, repo, endpoint=hub.endpoint)
    assert result.uploaded == ["model.safetensors", "config.json", "README.md", "curves.png"]
    files = hub.files(repo)
    assert files["curves.png"] == (run / "curves.png").read_bytes()
    card = ModelCard(files["README.md"].decode())
    assert "![Training curves](curves.png)" in card.text  # relative: the Hub shows the repo's file
    assert f'"hf-hub:{repo}"' in card.text  # still recognised as the draft, filled in with the repo id
    with Image.open(run / "curves.png") as im:
        assert im.format == "PNG" and im.size == (1000, 700)
    assert _tree_hashes(run) == before  # push never writes into RUN
    assert not push_to_hub(run, repo, endpoint=hub.endpoint).uploaded  # unchanged: no new commit


@pytest.mark.parametrize("fault, words", [
    ("commit_500", ("HTTP 500", "re-run `nfnet-zoo push")),
    ("drop_commit", ("re-run `nfnet-zoo push",)),
    ("refuse_token", ("HTTP 401", "token", "re-run `nfnet-zoo push")),
])
def test_push_fault_gives_one_line_error_keeps_folder_and_next_push_succeeds(hub, run, tmp_path, in_process,
                                                                             fault, words):
    env, repo = _env(hub, tmp_path), f"{hub.user}/faulty"
    before = _tree_hashes(run)
    setattr(hub.faults, fault, True if fault == "refuse_token" else COMMIT_ATTEMPTS)  # outlasts our retries
    failed = _cli(env, "push", run, "--repo-id", repo)
    _assert_one_line_error(failed, *words)
    assert _tree_hashes(run) == before
    assert not hub.store.exists(repo) or "model.safetensors" not in hub.files(repo)

    # Second push: a transient fault of the same kind is retried and the push completes.
    setattr(hub.faults, fault, False if fault == "refuse_token" else 1)
    mark = len(hub.log)
    assert push_to_hub(run, repo, endpoint=hub.endpoint).uploaded
    assert hub.files(repo)["model.safetensors"] == (run / "model.safetensors").read_bytes()
    if fault != "refuse_token":
        assert len(_requests(hub, mark, "POST", "/commit/")) == 2  # our retry of the commit
        assert not _requests(hub, mark, "PUT", "/upload/")  # the weights reached the Hub the first time
    assert _tree_hashes(run) == before
    _assert_token_nowhere(hub, tmp_path, [failed.stdout, failed.stderr])


def test_upload_dropped_for_good_is_one_line_error_and_not_retried_twice(hub, run, in_process):
    repo, before = f"{hub.user}/dropped", _tree_hashes(run)
    hub.faults.drop_upload = 100
    with pytest.raises(NFNetZooError) as e:
        push_to_hub(run, repo, token=hub.token, endpoint=hub.endpoint)
    assert "\n" not in str(e.value) and "re-run `nfnet-zoo push" in str(e.value) and hub.token not in str(e.value)
    assert len(_requests(hub, 0, "PUT", "/upload/")) == 6  # huggingface_hub's 1 + 5 tries; none added by us
    assert not _requests(hub, 0, "POST", "/commit/")
    assert _tree_hashes(run) == before
    hub.faults.drop_upload = 0
    assert push_to_hub(run, repo, token=hub.token, endpoint=hub.endpoint).uploaded


def test_commit_whose_answer_was_lost_is_not_made_twice(hub, run, in_process):
    repo = f"{hub.user}/lost-answer"
    hub.faults.lose_commit_answer = 1  # the commit lands, its answer never arrives
    result = push_to_hub(run, repo, token=hub.token, endpoint=hub.endpoint)
    assert len(_requests(hub, 0, "POST", "/commit/")) == 1  # the re-check found it: no second commit
    assert len(hub.commits(repo)) == 2 and result.commit == hub.commits(repo)[0]  # repo creation + ours
    assert result.uploaded == ["model.safetensors", "config.json", "README.md"]


def test_branch_pull_request_and_edited_card(hub, run, in_process):
    repo = f"{hub.user}/branches"
    main = push_to_hub(run, repo, token=hub.token, endpoint=hub.endpoint)
    dev = push_to_hub(run, repo, revision="dev", token=hub.token, endpoint=hub.endpoint)
    assert dev.commit == main.commit and not dev.uploaded  # branch created from main: nothing new to push
    (run / "README.md").write_text((run / "README.md").read_text() + "\nEdited by hand.\n")
    pr = push_to_hub(run, repo, create_pr=True, commit_message="Better card", token=hub.token,
                     endpoint=hub.endpoint)
    assert pr.uploaded == ["README.md"] and pr.pr_url.endswith("/discussions/1")
    assert hub.files(repo, "refs/pr/1")["README.md"] == (run / "README.md").read_bytes()  # edited card as is
    assert hub.commits(repo)[0] == main.commit  # main did not move


@pytest.mark.parametrize("case, words", [
    ("no_weights", "model.safetensors"),
    ("corrupt_weights", "not a readable safetensors"),
    ("bad_repo_id", "NAMESPACE/NAME"),
    ("other_namespace", "HTTP 403"),
    ("bad_card_metadata", "model card metadata"),
    ("no_token", "hf auth login"),
    ("curves_link", "curves.png is a link"),
    ("curves_not_png", "curves.png is not a PNG file"),
    ("readme_link", "README.md is a link"),
    ("config_link", "config.json is a link"),
    ("weights_link", "model.safetensors is a link"),
])
def test_push_refuses_bad_input_with_one_line(hub, run, in_process, monkeypatch, tmp_path, case, words):
    repo, token = f"{hub.user}/bad", hub.token
    if case == "no_weights":
        (run / "model.safetensors").unlink()
    elif case == "corrupt_weights":
        (run / "model.safetensors").write_bytes((run / "model.safetensors").read_bytes()[:1000])
    elif case == "bad_repo_id":
        repo = "just-a-name"
    elif case == "other_namespace":
        repo = "someone-else/model"
    elif case == "bad_card_metadata":
        text = (run / "README.md").read_text().replace("value: 70.0", "value: high")
        (run / "README.md").write_text(text)
    elif case == "curves_link":  # a run folder from someone else, linking to a file of yours
        (tmp_path / "secret.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"private")
        (run / "curves.png").symlink_to(tmp_path / "secret.png")
    elif case.endswith("_link"):  # README.md -> ~/.aws/credentials (starting with --- to reach the YAML check) ...
        name = {"readme": "README.md", "config": "config.json", "weights": "model.safetensors"}[case[:-5]]
        secret = tmp_path / "secret"
        secret.write_bytes(b"---\naws_secret_access_key: private\n---\n" if name == "README.md" else
                           (run / name).read_bytes())
        (run / name).unlink()
        (run / name).symlink_to(secret)
    elif case == "curves_not_png":
        (run / "curves.png").write_text("not an image")
    elif case == "no_token":
        token = None
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_home"))
        monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "empty_home" / "token"))
    before = _tree_hashes(run)
    with pytest.raises(NFNetZooError) as e:
        push_to_hub(run, repo, token=token, endpoint=hub.endpoint)
    assert words in str(e.value) and "\n" not in str(e.value)
    assert _tree_hashes(run) == before
    assert not _requests(hub, 0, "POST", "/commit/")
    if case.endswith("_link"):  # refused before anything was sent (the card's YAML check included)
        assert not hub.log


def test_local_hub_answers_missing_things_as_the_hub_does(hub, run, in_process, tmp_path):
    # The real client's own error classes, raised from the server's X-Error-Code headers.
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    repo = f"{hub.user}/errors"
    push_to_hub(run, repo, endpoint=hub.endpoint)
    get = dict(endpoint=hub.endpoint, cache_dir=tmp_path / "cache")
    assert Path(hf_hub_download(repo, "config.json", **get)).read_bytes() == (run / "config.json").read_bytes()
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(repo, "missing.json", **get)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo, "config.json", revision="no-such-branch", **get)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(f"{hub.user}/no-such-repo", "config.json", **get)


# --- publish -------------------------------------------------------------------------------------
def test_publish_deepmind_checkpoint_round_trip(hub, tmp_path, in_process, capsys):
    env, repo = _env(hub, tmp_path), f"{hub.user}/tiny-d1"
    src = tmp_path / "downloads" / "tiny_d1_haiku.npz"
    src.parent.mkdir()
    src.write_bytes((DATA / "tiny_d1_haiku.npz").read_bytes())
    code, out, err = _main(capsys, "publish", src, "--repo-id", repo, "--endpoint", hub.endpoint)
    assert code == 0 and out.startswith("pushed model.safetensors, config.json, README.md"), err
    assert list(src.parent.iterdir()) == [src]  # converted in a temporary folder, nothing left beside src
    reference = nfnet_zoo.convert_haiku_checkpoint(DATA / "tiny_d1_haiku.npz", tmp_path / "converted")
    assert hub.files(repo)["config.json"] == (reference / "config.json").read_bytes()
    loaded = _load_from_hub(env, tmp_path, repo, reference / "model.safetensors")
    # tiny_d1 is no shape timm's NFNet can express: `nfnet_zoo_custom`, no `library_name: timm`
    assert json.loads(hub.files(repo)["config.json"])["architecture"] == "nfnet_zoo_custom"
    assert loaded["identical"] and loaded["library_name"] is None and loaded["results"] == []
    assert len(loaded["usage_output"]) == 5
    _assert_token_nowhere(hub, tmp_path, [out, err])


def test_publish_of_a_released_variant_uses_zoo_card_and_config(tmp_path, monkeypatch):
    # An official F0 checkpoint's tensors, by DeepMind's own list of names and shapes (values are zeros).
    import numpy as np

    import nfnet_zoo.models.convert

    shapes = json.loads((DATA / "f0_param_shapes.json").read_text())
    params = {}
    for module, name, shape in shapes:
        params.setdefault(module, {})[name] = np.zeros(shape, np.float32)
    monkeypatch.setattr(nfnet_zoo.models.convert, "load_haiku_checkpoint", lambda path: params)
    result = publish_checkpoint(tmp_path / "F0_haiku.npz", "nfnet-zoo/nfnet_f0.dm_in1k", dry_run=True)
    files = {f.path: f for f in result.files}
    assert files["README.md"].source == str(build_zoo_card("nfnet_f0.dm_in1k")).encode()
    committed = ROOT / "hub_configs" / "nfnet_f0.dm_in1k" / "config.json"
    assert files["config.json"].source == committed.read_bytes()


# --- zoo cards and configs -----------------------------------------------------------------------
# Brock et al. 2021, Table 3: parameters (millions) and FLOPs (billions, counted as multiply-adds)
# at the test resolution of F0-F6.
PAPER_PARAMS_M = [71.5, 132.6, 193.8, 254.9, 316.1, 377.2, 438.4]
PAPER_GFLOPS = [12.38, 35.54, 62.59, 114.76, 215.24, 289.76, 377.28]


def test_regenerating_zoo_cards_and_configs_changes_nothing(tmp_path):
    written = write_zoo_cards(tmp_path)
    generated = sorted(str(p.relative_to(tmp_path)) for p in written)
    committed = sorted(str(p.relative_to(ROOT)) for d in ("model_cards", "hub_configs")
                       for p in (ROOT / d).rglob("*") if p.is_file())
    assert generated == committed
    for rel in committed:
        assert (tmp_path / rel).read_bytes() == (ROOT / rel).read_bytes(), f"{rel} is stale: run `make cards`"
    assert write_zoo_cards(tmp_path) == []  # deterministic: a second run rewrites nothing


def test_zoo_cards_carry_deepmind_results_and_measured_sizes():
    assert zoo_tags() == [f"nfnet_f{i}.dm_in1k" for i in range(7)]
    f0_params = sum(math.prod(shape) for _, _, shape in json.loads((DATA / "f0_param_shapes.json").read_text()))
    for i, tag in enumerate(zoo_tags()):
        cfg = nfnet_zoo.VARIANTS[tag.split(".")[0]]
        params, (_, gmacs_test) = measure_model(tag.split(".")[0], (cfg.train_size, cfg.test_size))
        assert round(params / 1e6, 1) == PAPER_PARAMS_M[i]
        assert round(gmacs_test, 2) == PAPER_GFLOPS[i]
        if i == 0:
            assert params == f0_params
        card = ModelCard.load(ROOT / "model_cards" / tag / "README.md")
        assert card.data.library_name == "timm" and card.data.license == "apache-2.0"
        assert [(r.metric_type, r.metric_value) for r in card.data.eval_results] == [
            ("accuracy", nfnet_zoo.DM_ACCURACY[i][0]), ("top_5_accuracy", nfnet_zoo.DM_ACCURACY[i][1])]
        assert f"{params:,}" in card.text and f"{gmacs_test:.2f} at {cfg.test_size} x {cfg.test_size}" in card.text
        config = json.loads((ROOT / "hub_configs" / tag / "config.json").read_text())
        # plain timm loads the mirror as its own dm_nfnet_fN; nfnet-zoo builds the recorded exact architecture
        assert config["architecture"] == "dm_" + tag.split(".")[0] and config["num_classes"] == 1000
        assert config["nfnet_zoo"]["architecture"] == tag.split(".")[0]
        assert config["model_args"] == {"std_conv_eps": 1e-10, "global_pool": "avg"}
        # DeepMind's evaluation for every loader: test size, squash-resize to test + 32
        size = [3, cfg.test_size, cfg.test_size]
        assert config["pretrained_cfg"]["test_input_size"] == config["pretrained_cfg"]["input_size"] == size
        assert "pip install nfnet-zoo" in card.text and card.data.datasets == ["imagenet-1k"]
