"""Data sources besides class folders (nfnet_zoo.data.sources and the table/parquet paths of nfnet_zoo.data): parquet
and arrow files in the Hub's layout, image folders with metadata.csv/jsonl, CSV files of path and label.

References: pyarrow reading the parquet files, the csv and json modules reading the tables, and each image's own
colour (class k is red, green or blue), so a label that reaches the wrong image is seen.
"""
from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import nfnet_zoo  # noqa: F401  (registers the variants)
from nfnet_zoo import NFNetZooError
from nfnet_zoo.data import load_eval_samples, load_image_data
from nfnet_zoo.evaluation import evaluate
from nfnet_zoo.training.finetune import finetune
from nfnet_zoo_cli import main as cli_main

datasets = pytest.importorskip("datasets")
pq = pytest.importorskip("pyarrow.parquet")

COLOURS = ["red", "green", "blue"]  # class k has channel k at 255
TINY = dict(model="nfnet_zoo_tiny", img_size=16, batch_size=4, workers=0, pretrained=False, epochs=1, lr=0.05)


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """load_dataset's arrow cache goes to this test's folder, never to the user's."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def _image(colour: str, i: int) -> Image.Image:
    rgb = [i, i, i]  # each image its own bytes
    rgb[COLOURS.index(colour)] = 255
    return Image.new("RGB", (16, 16), tuple(rgb))


def _png(colour: str, i: int) -> bytes:
    b = io.BytesIO()
    _image(colour, i).save(b, "PNG")
    return b.getvalue()


def _colour(img: Image.Image) -> str:
    return COLOURS[int(np.argmax(np.asarray(img.convert("RGB"))[0, 0]))]


def _dataset(n: int, start: int = 0, unlabelled: bool = False, coarse: bool = False):
    features = {"image": datasets.Image(), "label": datasets.ClassLabel(names=COLOURS)}
    rows = {"image": [{"bytes": _png(COLOURS[i % 3], start + i), "path": None} for i in range(n)],
            "label": [-1 if unlabelled else i % 3 for i in range(n)]}
    if coarse:  # a second label column
        features["coarse"] = datasets.ClassLabel(names=["warm", "cold"])
        rows["coarse"] = [0 if i % 3 == 0 else 1 for i in range(n)]
    return datasets.Dataset.from_dict(rows, features=datasets.Features(features))


def _parquet(path: Path, n: int, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    _dataset(n, **kw).to_parquet(str(path))
    return path


def _parquet_colours(path: Path, column: str = "label") -> list[tuple[str, str]]:
    """(the label's class name, the image's colour) of each row, read by pyarrow alone."""
    table = pq.read_table(path)
    return [(COLOURS[lab], _colour(Image.open(io.BytesIO(img["bytes"]))))
            for img, lab in zip(table.column("image").to_pylist(), table.column(column).to_pylist())]


def _hub_layout(root: Path) -> Path:
    _parquet(root / "data" / "train-00000-of-00001.parquet", 12)
    _parquet(root / "data" / "validation-00000-of-00001.parquet", 6, start=100)
    _parquet(root / "data" / "test-00000-of-00001.parquet", 3, start=200, unlabelled=True)
    return root


def _image_files(folder: Path, n: int, start: int = 0) -> list[tuple[str, str]]:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        colour = COLOURS[i % 3]
        _image(colour, start + i).save(folder / f"img{start + i}.png")
        rows.append((f"img{start + i}.png", colour))
    return rows


def _write_csv(path: Path, rows, header=("file_name", "label")) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _weights(run: Path) -> dict:
    return load_file(run / "model.safetensors")


def _resumes_exactly(data_dir: Path, tmp_path: Path, **kw) -> Path:
    """Two epochs in one go, and one epoch then --resume for the second: the same weights."""
    whole = finetune(data_dir=str(data_dir), output=str(tmp_path / "whole"), **{**TINY, **kw, "epochs": 2})
    part = finetune(data_dir=str(data_dir), output=str(tmp_path / "part"), **TINY, **kw)
    finetune(resume=str(part), epochs=2)
    a, b = _weights(whole), _weights(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return whole


# --- parquet and arrow files in the Hub's layout ----------------------------------------------------------------
def test_hub_parquet_layout_trains_validates_resumes_and_evaluates(tmp_path, capsys):
    root = _hub_layout(tmp_path / "hub")
    run = _resumes_exactly(root, tmp_path)
    data = json.loads((run / "data.json").read_text())
    assert data["kind"] == "hf" and data["builder"] == "parquet" and data["classes"] == COLOURS
    assert sorted(data["data_files"]) == ["test", "train", "validation"]
    # train from train-*.parquet, validation from validation-*.parquet; the unlabelled test split is never used
    assert sorted(k for k, _ in data["train"]) == sorted(f"train/{i}" for i in range(12))
    assert sorted(k for k, _ in data["val"]) == sorted(f"validation/{i}" for i in range(6))
    for split, file in (("train", "train-00000-of-00001"), ("validation", "validation-00000-of-00001")):
        reference = _parquet_colours(root / "data" / f"{file}.parquet")
        for key, label in data["train" if split == "train" else "val"]:
            name, colour = reference[int(key.split("/")[1])]
            assert COLOURS[label] == name == colour
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["epoch"] == 2
    # evaluate: the run's own data -> its held-out (validation) rows; one parquet file -> all of its rows
    assert evaluate(str(run), root, workers=0)["num_images"] == 6
    single = root / "data" / "test-00000-of-00001.parquet"
    other = _parquet(tmp_path / "other" / "rows.parquet", 5, start=50)
    result = evaluate(str(run), other, workers=0)
    assert result["num_images"] == 5 and "all images" in result["split"]
    capsys.readouterr()
    assert cli_main(["evaluate", str(run), "--data-dir", str(other), "-j", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_images"] == 5
    with pytest.raises(NFNetZooError, match="no readable images to evaluate"):  # all -1: nothing to score
        with pytest.warns(UserWarning):
            load_eval_samples(single, workers=1)


def test_hub_layouts_split_names_configs_and_arrow(tmp_path):
    # DIR/train.parquet + DIR/val.parquet: val is the Hub's validation split
    flat = tmp_path / "flat"
    _parquet(flat / "train.parquet", 9)
    _parquet(flat / "val.parquet", 3, start=100)
    data = load_image_data(flat, workers=1)
    assert data.data_files == {"train": [str(flat / "train.parquet")], "validation": [str(flat / "val.parquet")]}
    assert [k for k, _ in data.val] == ["validation/0", "validation/1", "validation/2"]
    # DIR/<config>/train-*.parquet: the one config; two configs: refused, naming them
    _parquet(tmp_path / "cfg" / "default" / "train-00000-of-00002.parquet", 6)
    _parquet(tmp_path / "cfg" / "default" / "train-00001-of-00002.parquet", 6, start=6)
    data = load_image_data(tmp_path / "cfg", workers=1)
    assert len(data.train) + len(data.val) == 12 and len(data.val) == 3  # --val-split 0.1, per class: one each
    assert data.train[0][0].startswith("train/")
    _parquet(tmp_path / "cfg" / "fine" / "train-00000-of-00001.parquet", 6)
    with pytest.raises(NFNetZooError, match=r"2 configs \(default, fine\).*--data-dir"):
        load_image_data(tmp_path / "cfg", workers=1)
    # arrow files (the stream format save_to_disk and the Hub's loaders write)
    _dataset(9).save_to_disk(str(tmp_path / "saved"))
    arrow = tmp_path / "arrow" / "data"
    arrow.mkdir(parents=True)
    shutil.copy(next((tmp_path / "saved").glob("*.arrow")), arrow / "train-00000-of-00001.arrow")
    data = load_image_data(tmp_path / "arrow", val_split=0.34, workers=1)
    assert data.builder == "arrow" and len(data.train) == 6 and len(data.val) == 3
    opener = data.opener()
    assert all(_colour(opener(k)) == COLOURS[lab] for k, lab in data.train + data.val)


def test_several_label_columns_are_refused_and_target_and_input_keys_choose(tmp_path):
    root = tmp_path / "two"
    _parquet(root / "data" / "train-00000-of-00001.parquet", 9, coarse=True)
    with pytest.raises(NFNetZooError, match=r"2 ClassLabel columns \(label, coarse\); choose one with --target-key"):
        load_image_data(root, workers=1)
    data = load_image_data(root, val_split=0.0, workers=1, target_key="coarse")
    reference = pq.read_table(root / "data" / "train-00000-of-00001.parquet").column("coarse").to_pylist()
    assert data.classes == ["warm", "cold"] and [lab for _, lab in data.train] == reference
    with pytest.raises(NFNetZooError, match="no column 'kind' \\(--target-key\\); its columns are image, label, coarse"):
        load_image_data(root, workers=1, target_key="kind")
    with pytest.raises(NFNetZooError, match="--input-key label is not an Image column"):
        load_image_data(root, workers=1, input_key="label", target_key="label")


# --- tables: image folders with metadata files, CSV files --------------------------------------------------------
def test_metadata_split_folders_train_and_validate_on_their_files(tmp_path):
    root = tmp_path / "meta"
    train = _image_files(root / "train", 9)
    val = _image_files(root / "val", 3, start=100)
    with open(root / "train" / "metadata.jsonl", "w") as f:
        f.writelines(json.dumps({"file_name": n, "label": c, "caption": "x"}) + "\n" for n, c in train)
    _write_csv(root / "val" / "metadata.csv", [(n, c, "x") for n, c in val], ("file_name", "label", "caption"))
    (root / "test").mkdir()
    _write_csv(root / "test" / "metadata.csv", [("x.png", "")])  # unlabelled test split: never the validation split
    with pytest.raises(NFNetZooError, match=r"2 label columns \(label, caption\)"):
        load_image_data(root, workers=1)
    run = finetune(data_dir=str(root), output=str(tmp_path / "run"), target_key="label", **TINY)
    data = json.loads((run / "data.json").read_text())
    assert data["kind"] == "folder" and data["classes"] == sorted(COLOURS)
    rows = {f"train/{r['file_name']}": r["label"] for r in map(json.loads, (root / "train" / "metadata.jsonl").open())}
    rows.update({f"val/{r['file_name']}": r["label"] for r in csv.DictReader((root / "val" / "metadata.csv").open())})
    assert {k for k, _ in data["train"]} == {k for k in rows if k.startswith("train/")}
    assert {k for k, _ in data["val"]} == {k for k in rows if k.startswith("val/")}
    for key, label in data["train"] + data["val"]:
        assert data["classes"][label] == rows[key] == _colour(Image.open(root / key))
    assert json.loads((run / "args.json").read_text())["target_key"] == "label"


def test_csv_file_counts_each_file_once_resumes_exactly_and_evaluates_its_held_out_rows(tmp_path, capsys):
    root = tmp_path / "shop"
    rows = [(f"photos/{n}", c) for n, c in _image_files(root / "photos", 12)]
    (root / "photos" / "again.png").symlink_to("img0.png")  # the same file under another name: counted once
    table = _write_csv(root / "labels.csv", rows + [("photos/again.png", rows[0][1]), ("./photos/img1.png", rows[1][1])],
                       ("path", "label"))
    run = _resumes_exactly(table, tmp_path)
    data = json.loads((run / "data.json").read_text())
    assert data["root"] == str(root) and data["source"] == str(table) and data["kind"] == "folder"
    reference = {p: c for p, c in csv.reader(table.open()) if p != "path"}
    keys = [k for k, _ in data["train"] + data["val"]]
    assert sorted(keys) == sorted(p for p, _ in rows) and len(data["val"]) == 3  # 14 rows, 12 files
    for key, label in data["train"] + data["val"]:
        assert data["classes"][label] == reference[key] == _colour(Image.open(root / key))
    assert json.loads((run / "args.json").read_text())["dataset"] == "labels"
    result = evaluate(str(run), table, workers=0)
    assert result["num_images"] == 3 and "held-out" in result["split"]
    # the same table with two label columns, through the command line's flags
    capsys.readouterr()
    two = _write_csv(root / "two.csv", [(p, c, "x") for p, c in rows], ("path", "label", "note"))
    assert cli_main(["evaluate", str(run), "--data-dir", str(two), "-j", "0"]) == 2
    assert "choose one with --target-key" in capsys.readouterr().err
    assert cli_main(["evaluate", str(run), "--data-dir", str(two), "-j", "0", "--target-key", "label",
                     "--input-key", "path", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_images"] == 12


def test_flat_metadata_folder_splits_by_val_split(tmp_path):
    root = tmp_path / "flat"
    rows = _image_files(root, 9)
    _write_csv(root / "metadata.csv", rows)
    data = load_image_data(root, val_split=0.34, workers=1)
    assert len(data.train) == 6 and len(data.val) == 3 and sorted({lab for _, lab in data.val}) == [0, 1, 2]
    assert all(data.classes[lab] == _colour(Image.open(root / k)) for k, lab in data.train + data.val)


def test_a_tables_files_keep_the_guarantees_of_folders(tmp_path):
    """Corrupt files skipped or refused by the start-up check; one file under two labels, or in train and val,
    refused with both rows named; a path outside the table's folder refused."""
    root = tmp_path / "t"
    rows = _image_files(root, 9)
    (root / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    table = _write_csv(root / "metadata.csv", rows + [("bad.png", "red")])
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        data = load_image_data(table, val_split=0.0, workers=1)
    assert sorted(k for k, _ in data.train) == sorted(n for n, _ in rows) and data.skipped == ["bad.png"]
    with pytest.raises(NFNetZooError, match="1 unreadable .* bad.png; remove them"):
        load_image_data(root, workers=1, bad_images="error")
    (root / "link.png").symlink_to("img0.png")
    _write_csv(table, rows + [("link.png", "green")])
    with pytest.raises(NFNetZooError, match="img0.png and link.png are the same file"):
        load_image_data(root, workers=1)
    _write_csv(table, rows + [("../elsewhere.png", "red")])
    with pytest.raises(NFNetZooError, match="row 10 names ../elsewhere.png, outside .*; paths are relative"):
        load_image_data(root, workers=1)


# --- bad inputs: one line naming the problem and the fix -------------------------------------------------------
def _no_label(root):
    _write_csv(root / "metadata.csv", [(n,) for n, _ in _image_files(root, 6)], ("file_name",))


def _missing_file(root):
    _write_csv(root / "metadata.csv", _image_files(root, 6) + [("gone.png", "red")])


def _not_parquet(root):
    _parquet(root / "data" / "train-00000-of-00001.parquet", 6)
    (root / "data" / "validation-00000-of-00001.parquet").write_bytes(b"PAR1 not really")


def _empty_split(root):
    _parquet(root / "data" / "train-00000-of-00001.parquet", 6)
    _dataset(6).select([]).to_parquet(str(root / "data" / "validation-00000-of-00001.parquet"))


def _empty_table(root):
    _image_files(root / "train", 6)
    _write_csv(root / "train" / "metadata.csv", [])


def _unknown_target(root):
    _write_csv(root / "metadata.csv", _image_files(root, 6))


@pytest.mark.parametrize("make, extra, message", [
    (_no_label, [], r"metadata.csv has no label column among file_name; name it with --target-key"),
    (_unknown_target, ["--target-key", "species"], r"has no column 'species' \(--target-key\); its columns are"),
    (_missing_file, [], r"metadata.csv row 7 names gone.png, which does not exist; fix the path"),
    (_not_parquet, [], r"validation-00000-of-00001.parquet is not a readable parquet file .*replace it"),
    (_empty_split, [], r"the validation split of .* is empty \(no rows in .*validation-00000-of-00001.parquet\); remove its files"),
    (_empty_table, [], r"metadata.csv has no rows \(an empty split\); add a row per image"),
], ids=["no-label-column", "unknown-target-key", "missing-file", "not-parquet", "empty-split", "empty-table"])
def test_bad_sources_are_one_line_errors(make, extra, message, tmp_path, capsys):
    root = tmp_path / "data"
    root.mkdir()
    make(root)
    code = cli_main(["finetune", "--model", "nfnet_zoo_tiny", "--data-dir", str(root), "--output",
                     str(tmp_path / "run"), "-j", "0", "--no-pretrained", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "Traceback" not in "\n".join(err)
    assert err[-1].startswith("nfnet-zoo finetune: error: ") and __import__("re").search(message, err[-1]), err


def test_a_data_json_written_before_these_sources_still_loads(tmp_path):
    from nfnet_zoo.data import ImageData
    old = {"root": str(tmp_path), "kind": "hf", "classes": ["a", "b"], "train": [["train/0", 0]],
           "val": [["validation/0", 1]], "skipped": [], "image_column": "img"}
    (tmp_path / "data.json").write_text(json.dumps(old))
    data = ImageData.load(tmp_path / "data.json")
    assert (data.builder, data.data_files, data.source, data.name) == (None, None, None, tmp_path.name)
    assert data.train == [("train/0", 0)] and data.opener().builder is None  # a save_to_disk folder, as before
