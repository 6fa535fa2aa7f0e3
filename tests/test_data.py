"""data.py: layouts, the start-up check of every image, RGB conversion, and resumable sampling.

References: PIL's own decoders and conversions (computed here independently), numpy arithmetic for
16-bit and alpha, and the files themselves.
"""
from __future__ import annotations

import random
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from _images import add_awkward_files, make_folder
from nfnet_zoo import NFNetZooError
from nfnet_zoo.data import EpochSampler, ImageData, ImageDataset, load_eval_samples, load_image_data, to_rgb


# --- conversion ---------------------------------------------------------------------------------
def test_to_rgb_rescales_16_bit_instead_of_saturating():
    a = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    out = np.asarray(to_rgb(Image.fromarray(a)))
    assert out.shape == (1, 4, 3)
    assert out[0, :, 0].tolist() == [0, 1, 128, 255]
    assert np.asarray(Image.fromarray(a).convert("RGB"))[0, 1, 0] == 255  # what PIL alone would give


def test_to_rgb_composites_transparency_on_white():
    a = np.zeros((2, 2, 4), dtype=np.uint8)
    a[0, 0] = (200, 0, 0, 255)      # opaque red
    a[0, 1] = (0, 0, 0, 0)          # fully transparent black
    a[1, 0] = (0, 0, 0, 128)        # half-transparent black
    out = np.asarray(to_rgb(Image.fromarray(a, "RGBA"))).astype(int)
    assert out[0, 0].tolist() == [200, 0, 0]
    assert out[0, 1].tolist() == [255, 255, 255]
    assert abs(out[1, 0] - 127).max() <= 1  # 255 * (1 - 128/255)


def test_to_rgb_converts_awkward_files(tmp_path):
    folder = tmp_path / "mid"
    folder.mkdir()
    files = add_awkward_files(folder)
    for kind in ("cmyk", "gray16", "palette", "rgba", "gray"):
        with Image.open(files[kind]) as img:
            img.load()
            rgb = to_rgb(img)
        assert rgb.mode == "RGB" and rgb.size == (24, 24), kind
    with Image.open(files["cmyk"]) as img:  # PIL's CMYK->RGB is the reference
        assert np.array_equal(np.asarray(to_rgb(img)), np.asarray(img.convert("RGB")))
    with Image.open(files["gray16"]) as img16, Image.open(files["gray"]) as img8:
        # the 16-bit file holds the 8-bit one times 257: both convert to the same pixels
        assert np.array_equal(np.asarray(to_rgb(img16)), np.asarray(img8.convert("RGB")))


# --- layouts and faults ----------------------------------------------------------------------
def test_train_val_folders(tmp_path):
    make_folder(tmp_path / "d", n_train=5, n_val=2)
    data = load_image_data(tmp_path / "d", workers=1)
    assert data.classes == ["bright", "dark", "mid"]
    assert len(data.train) == 15 and len(data.val) == 6
    assert all(k.startswith("train/") for k, _ in data.train) and all(k.startswith("val/") for k, _ in data.val)
    assert {(k.split("/")[1], lab) for k, lab in data.train} == {("bright", 0), ("dark", 1), ("mid", 2)}


def test_validation_folder_name_is_accepted(tmp_path):
    make_folder(tmp_path / "d", n_train=3, n_val=2)
    (tmp_path / "d" / "val").rename(tmp_path / "d" / "validation")
    assert len(load_image_data(tmp_path / "d", workers=1).val) == 6


def test_single_folder_is_split_per_class_with_a_fixed_seed(tmp_path):
    make_folder(tmp_path / "d", n_train=8, n_val=2, split=False)
    a = load_image_data(tmp_path / "d", val_split=0.2, workers=1)
    b = load_image_data(tmp_path / "d", val_split=0.2, workers=1)
    assert a.train == b.train and a.val == b.val
    assert len(a.val) == 6 and len(a.train) == 24
    assert sorted(lab for _, lab in a.val) == [0, 0, 1, 1, 2, 2]
    assert not set(a.train) & set(a.val)


def test_bad_files_skipped_with_count_or_refused(tmp_path):
    make_folder(tmp_path / "d", n_train=4, n_val=2)
    add_awkward_files(tmp_path / "d" / "train" / "mid")
    with pytest.warns(UserWarning) as record:
        data = load_image_data(tmp_path / "d", workers=2)
    messages = " | ".join(str(w.message) for w in record)
    assert "skipped 2 unreadable" in messages and "ignored 1 non-image" in messages
    assert sorted(data.skipped) == ["train/mid/corrupt.png", "train/mid/truncated.jpg"]
    assert len(data.train) == 12 + 5  # the five convertible awkward files are kept
    with pytest.raises(NFNetZooError, match="2 unreadable .*--bad-images skip"), pytest.warns(UserWarning):
        load_image_data(tmp_path / "d", bad_images="error", workers=1)


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("empty", "is empty"),
    ("loose", "no class folders .*images lie directly"),
    ("one_class", "at least 2 classes"),
    ("val_only_class", "class folder.* that .* lacks: extra"),
])
def test_layout_faults_are_one_line_errors(tmp_path, case, message):
    root = tmp_path / "d"
    if case == "empty":
        root.mkdir()
    elif case == "loose":
        root.mkdir()
        Image.new("RGB", (8, 8)).save(root / "a.png")
    elif case == "one_class":
        make_folder(root, classes=("dark",))
    elif case == "val_only_class":
        make_folder(root, n_train=2, n_val=1)
        shutil.copytree(root / "val" / "dark", root / "val" / "extra")
    with pytest.raises(NFNetZooError, match=message) as e:
        load_image_data(root, workers=1)
    assert "\n" not in str(e.value)


def test_empty_class_folder_is_ignored_with_a_warning(tmp_path):
    make_folder(tmp_path / "d", n_train=2, n_val=1)
    (tmp_path / "d" / "train" / "nothing").mkdir()
    with pytest.warns(UserWarning, match="1 class folder.* no images .*nothing"):
        data = load_image_data(tmp_path / "d", workers=1)
    assert "nothing" not in data.classes


def test_eval_samples_use_val_split_or_whole_folder(tmp_path):
    make_folder(tmp_path / "d", n_train=3, n_val=2)
    assert len(load_eval_samples(tmp_path / "d", workers=1).val) == 6
    make_folder(tmp_path / "flat", n_train=3, n_val=0, split=False)
    assert len(load_eval_samples(tmp_path / "flat", workers=1).val) == 9


def test_image_data_round_trips_through_json(tmp_path):
    make_folder(tmp_path / "d", n_train=2, n_val=1)
    data = load_image_data(tmp_path / "d", workers=1)
    data.save(tmp_path / "data.json")
    assert ImageData.load(tmp_path / "data.json") == data


# --- resumable randomness ----------------------------------------------------------------------
def test_augmentation_depends_only_on_seed_epoch_index(tmp_path):
    from timm.data import create_transform
    make_folder(tmp_path / "d", n_train=2, n_val=1)
    data = load_image_data(tmp_path / "d", workers=1)
    ds = ImageDataset(data.train, data.opener(), create_transform(16, is_training=True), seed=3)
    torch.manual_seed(0)
    a = ds[(1, 2)][0]
    state = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    torch.manual_seed(123)  # a different global stream must not change the sample
    random.seed(5)
    b = ds[(1, 2)][0]
    torch.set_rng_state(state[0])
    assert torch.equal(a, b)
    assert not torch.equal(a, ds[(1, 3)][0])  # another epoch: another crop
    # and loading leaves the caller's RNG streams where they were
    before = torch.get_rng_state()
    ds[(0, 0)]
    assert torch.equal(before, torch.get_rng_state())


def test_epoch_sampler_is_a_function_of_seed_and_epoch():
    s = EpochSampler(10, seed=1)
    s.epoch = 4
    first = list(s)
    torch.manual_seed(99)
    assert list(s) == first
    assert sorted(i for i, _ in first) == list(range(10)) and {e for _, e in first} == {4}
    s.epoch = 5
    assert [i for i, _ in s] != [i for i, _ in first]


# --- Hugging Face datasets saved on disk -------------------------------------------------------
def test_saved_hf_dataset_with_a_corrupt_row(tmp_path):
    datasets = pytest.importorskip("datasets")
    from _images import class_image
    rng = np.random.default_rng(0)
    names = ["bright", "dark", "mid"]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=names)})

    def split(n):
        rows = {"img": [], "label": []}
        for c, name in enumerate(names):
            for _ in range(n):
                rows["img"].append(class_image(name, rng))
                rows["label"].append(c)
        return rows
    train = split(4)
    train["img"].append({"bytes": b"\x89PNG\r\n\x1a\n garbage", "path": None})
    train["label"].append(1)
    dd = datasets.DatasetDict(train=datasets.Dataset.from_dict(train, features=features),
                              validation=datasets.Dataset.from_dict(split(2), features=features))
    dd.save_to_disk(str(tmp_path / "ds"))
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        data = load_image_data(tmp_path / "ds", workers=1)
    assert data.kind == "hf" and data.classes == names and data.image_column == "img"
    assert len(data.train) == 12 and len(data.val) == 6 and data.skipped == ["train/12"]
    original = np.asarray(dd["train"][5]["img"].convert("RGB"))  # datasets' own decoder as reference
    assert np.array_equal(np.asarray(data.opener()("train/5")), original)
