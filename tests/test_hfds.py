"""`--data-dir hfds/NAME[:CONFIG][@REVISION]`: a Hub dataset by name, read through `datasets` at a pinned commit.

References: a local Hub-protocol server (tests/hub_server.py) that the real huggingface_hub client uploads to and
`datasets.load_dataset` reads from; the uploaded parquet files read back with pyarrow and PIL (a colour per class,
so each row's label is checkable from its pixels).
"""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from nfnet_zoo import NFNetZooError
from nfnet_zoo.data.hfds import parse_hub_id

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
REPO = "alice/colours"
_ROWS = "rows"  # where the fixture keeps each commit's parquet files (the reference the tests read)


def _png(colour: str) -> dict:
    b = io.BytesIO()
    Image.new("RGB", (8, 8), COLOURS[colour]).save(b, "PNG")
    return {"bytes": b.getvalue(), "path": None}


def _dataset(splits: dict, classes=("red", "green")):
    """A DatasetDict from {split: [colour or None (unlabelled: -1), ...]}: an Image and a ClassLabel column."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image as HFImage
    features = Features({"image": HFImage(), "label": ClassLabel(names=list(classes))})
    return DatasetDict({s: Dataset.from_dict({"image": [_png(c or "blue") for c in colours],
                                              "label": [classes.index(c) if c else -1 for c in colours]},
                                             features=features) for s, colours in splits.items()})


def _upload(api, folder: Path, files: dict, repo: str = REPO) -> str:
    """Write `files` ({path: DatasetDict split or text}) under `folder`, upload them as one commit; its id."""
    for path, content in files.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            (folder / path).write_text(content)
        else:
            content.to_parquet(str(folder / path))
    return api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="dataset").oid


CARD = """---
configs:
- config_name: default
  default: true
  data_files:
  - {split: train, path: data/train-*}
  - {split: validation, path: data/validation-*}
  - {split: test, path: data/test-*}
- config_name: three
  data_files:
  - {split: train, path: three/train-*}
  - {split: test, path: three/test-*}
---
"""


@pytest.fixture
def colours(hub, tmp_path, monkeypatch):
    """alice/colours on the local Hub: commit A (branch v1 too) with train (6 rows), validation (2) and an unlabelled
    test split (-1), and a config `three` with 3 classes; then commit B on main, whose train split is 4 other rows.
    Returns (environment for a subprocess, {"A": commit, "B": commit}, folder of A's files)."""
    import huggingface_hub.constants
    from huggingface_hub import HfApi
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    api = HfApi(endpoint=hub.endpoint, token=hub.token)
    api.create_repo(REPO, repo_type="dataset")
    a = _dataset({"train": ["red", "green"] * 3, "validation": ["green", "red"], "test": [None, None]})
    three = _dataset({"train": ["red", "green", "blue"] * 2, "test": [None] * 3}, classes=("red", "green", "blue"))
    files_a = {f"data/{s}-00000-of-00001.parquet": a[s] for s in a} | {
        f"three/{s}-00000-of-00001.parquet": three[s] for s in three} | {"README.md": CARD}
    commit_a = _upload(api, tmp_path / "A", files_a)
    api.create_branch(REPO, branch="v1", revision=commit_a, repo_type="dataset")
    b = _dataset({"train": ["green", "green", "red", "red"]})
    commit_b = _upload(api, tmp_path / "B", {"data/train-00000-of-00001.parquet": b["train"]})
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.endpoint, HF_HUB_DISABLE_XET="1", HF_HOME=str(tmp_path / "hf_home"),
               HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_TELEMETRY="1", HF_TOKEN=hub.token)
    return env, {"A": commit_a, "B": commit_b}, tmp_path


def _reference(folder: Path, split: str, config_dir: str = "data") -> list[tuple[str, int, str]]:
    """(split/row, label, colour of its pixels) of the uploaded file, read with pyarrow and PIL: the rows a run must
    list."""
    [path] = (folder / config_dir).glob(f"{split}-*.parquet")
    table = pq.read_table(path).to_pylist()
    return [(f"{split}/{i}", r["label"], _colour(Image.open(io.BytesIO(r["image"]["bytes"]))))
            for i, r in enumerate(table)]


def _colour(img: Image.Image) -> str:
    pixel = tuple(np.asarray(img.convert("RGB"))[0, 0])
    return next(name for name, rgb in COLOURS.items() if rgb == pixel)


def _cli(env: dict, cwd: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nfnet_zoo_cli", *map(str, args)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


# Run in a fresh interpreter, with the environment's HF_* read at import: each line of argv[1:] is a --data-dir to
# load (check none), or RUN/data.json whose rows are read back through the run's opener (what a resume reads).
_PROBE = """
import json, sys, warnings
warnings.simplefilter("ignore")
import numpy as np
from nfnet_zoo import NFNetZooError
from nfnet_zoo.data import ImageData, load_image_data
COLOURS = {(255, 0, 0): "red", (0, 255, 0): "green", (0, 0, 255): "blue"}
for arg in sys.argv[1:]:
    try:
        data = ImageData.load(arg) if arg.endswith(".json") else load_image_data(arg, check="none", workers=0)
        opener = data.opener()
        rows = {s: [(k, lab, COLOURS[tuple(np.asarray(opener(k))[0, 0])]) for k, lab in getattr(data, s)]
                for s in ("train", "val")}
        print(json.dumps(dict(root=data.root, config=data.config, revision=data.revision, classes=data.classes,
                              **rows)))
    except NFNetZooError as e:
        print(json.dumps({"error": str(e)}))
"""


def _probe(env: dict, cwd: Path, *args) -> list[dict]:
    r = subprocess.run([sys.executable, "-c", _PROBE, *map(str, args)], env=env, cwd=cwd, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def _triples(rows) -> list[tuple]:
    return [tuple(r) for r in rows]


# --- tests -------------------------------------------------------------------------------------------
def test_finetune_on_a_hub_dataset_records_its_commit_and_evaluate_scores_the_held_out_split(colours, hub,
                                                                                             monkeypatch):
    env, commits, tmp = colours
    r = _cli(env, tmp, "finetune", "--model", "nfnet_zoo_tiny", "--data-dir", f"hfds/{REPO}:default@main",
             "--epochs", "1", "--batch-size", "2", "--img-size", "32", "-j", "0", "--check-images", "none")
    assert r.returncode == 0, r.stderr
    run = tmp / "runs" / "nfnet_zoo_tiny-colours"  # the default run folder: no : or @ in its name
    data = json.loads((run / "data.json").read_text())
    # the fixture pushed B last: main is B, and the run records B's commit, not "main"
    assert (data["root"], data["config"], data["revision"]) == (f"hfds/{REPO}", "default", commits["B"])
    reference_train = _reference(tmp / "B", "train")
    assert data["train"] == [[k, lab] for k, lab, _ in reference_train]
    # validation is B's validation split (kept from A); the unlabelled test split is never validation
    assert data["val"] == [[k, lab] for k, lab, _ in _reference(tmp / "A", "validation")]
    assert data["classes"] == ["red", "green"]
    assert "on 4 images (2 classes), validating on 2" in r.stdout
    r = _cli(env, tmp, "evaluate", run, "--data-dir", f"hfds/{REPO}", "-j", "0", "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["num_images"] == 2 and "held-out split" in result["split"]
    # the Hub moves on (main's train split now has 2 rows): a resume still reads B's 4 rows, which C lacks
    from huggingface_hub import HfApi
    c = _dataset({"train": ["red", "green"]})["train"]
    _upload(HfApi(endpoint=hub.endpoint, token=hub.token), tmp / "C", {"data/train-00000-of-00001.parquet": c})
    r = _cli(env, tmp, "finetune", "--resume", run.relative_to(tmp), "--epochs", "2", "-j", "0")
    assert r.returncode == 0, r.stderr
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert json.loads((run / "data.json").read_text()) == data
    from huggingface_hub import ModelCard
    from nfnet_zoo import push_to_hub
    # push names the dataset in the card's metadata without being told (from the run's own folder: the draft card
    # names the run as finetune was given it, and a draft that differs counts as edited)
    monkeypatch.chdir(tmp)
    push_to_hub(run.relative_to(tmp), "alice/tiny-colours", token=hub.token, endpoint=hub.endpoint)
    card = ModelCard(hub.files("alice/tiny-colours")["README.md"].decode())
    assert card.data.datasets == [REPO]


def test_revision_config_resume_and_offline_read_the_pinned_rows(colours):
    env, commits, tmp = colours
    run_a = tmp / "run_a"
    run_a.mkdir()
    a_train = _reference(tmp / "A", "train")
    pinned, at_main, three = _probe(env, tmp, f"hfds/{REPO}@v1", f"hfds/{REPO}", f"hfds/{REPO}:three@{commits['A']}")
    assert pinned["revision"] == commits["A"] and _triples(pinned["train"]) == a_train  # the branch's commit
    assert at_main["revision"] == commits["B"] and _triples(at_main["train"]) == _reference(tmp / "B", "train")
    assert three["config"] == "three" and three["classes"] == ["red", "green", "blue"]
    # no validation split and an unlabelled test split: --val-split holds out one image per class from train
    assert sorted(_triples(three["train"] + three["val"])) == sorted(_reference(tmp / "A", "train", "three"))
    assert len(three["val"]) == 3 and {r[0].split("/")[0] for r in three["val"]} == {"train"}
    # a run's data.json written at A (as finetune writes it), read back offline while the cache holds A and B
    (run_a / "data.json").write_text(json.dumps({k: pinned[k] for k in ("root", "config", "revision", "classes")} | {
        "kind": "hf", "image_column": "image", "train": [r[:2] for r in pinned["train"]],
        "val": [r[:2] for r in pinned["val"]]}))
    offline = {**env, "HF_HUB_OFFLINE": "1"}
    resumed, main_offline, pinned_offline, not_cached = _probe(
        offline, tmp, run_a / "data.json", f"hfds/{REPO}", f"hfds/{REPO}@{commits['A']}", "hfds/alice/other")
    assert _triples(resumed["train"]) == a_train and resumed["revision"] == commits["A"]
    assert main_offline["revision"] == commits["B"]  # main as last resolved online
    assert _triples(pinned_offline["train"]) == a_train
    assert "not in the Hugging Face cache and HF_HUB_OFFLINE=1" in not_cached["error"]


def test_bad_hub_dataset_ids_are_one_line_errors(colours, hub):
    env, commits, tmp = colours
    from huggingface_hub import HfApi
    api = HfApi(endpoint=hub.endpoint, token=hub.token)
    api.create_repo("alice/tabular", repo_type="dataset")
    from datasets import Dataset
    _upload(api, tmp / "tab", {"data/train-00000-of-00001.parquet": Dataset.from_dict({"x": [1, 2], "label": [0, 1]})},
            repo="alice/tabular")
    api.create_repo("alice/empty", repo_type="dataset")  # .gitattributes only: no data files
    errors = [r["error"] for r in _probe(env, tmp, "hfds/alice/nope", f"hfds/{REPO}:gray", f"hfds/{REPO}@v9",
                                         "hfds/alice/tabular", "hfds/alice/empty")]
    assert "no Hub dataset 'alice/nope'" in errors[0]
    assert "no config 'gray'; its configs are default, three" in errors[1]
    assert "no revision 'v9'" in errors[2]
    assert "no Image column" in errors[3]
    assert "datasets cannot read hfds/alice/empty" in errors[4]
    unreachable = _probe({**env, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp / "empty")}, tmp,
                         f"hfds/{REPO}")
    assert "cannot reach the Hugging Face Hub" in unreachable[0]["error"]
    assert all("\n" not in e for e in errors + [unreachable[0]["error"]])


@pytest.mark.parametrize("given, words", [
    ("hfds/", "names no dataset"), ("hfds/a b", "is not a Hub dataset name"), ("hfds/x/y/z", "is not a Hub dataset"),
    ("hfds/beans:", "config '' is empty"), ("hfds/beans@", "revision '' is empty"),
    ("hfds/beans@a b", "has characters"), ("hfds/beans:..", "has characters")])
def test_malformed_ids_are_refused_before_any_request(given, words):
    with pytest.raises(NFNetZooError, match=words):
        parse_hub_id(given)


def test_a_well_formed_id_is_split_into_name_config_and_revision():
    assert parse_hub_id("hfds/beans") == parse_hub_id("hfds/beans")
    got = parse_hub_id("hfds/user/name:cfg@refs/pr/1")
    assert (got.name, got.config, got.revision, got.root) == ("user/name", "cfg", "refs/pr/1", "hfds/user/name")
