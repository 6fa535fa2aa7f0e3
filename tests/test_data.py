"""data.py: layouts, the start-up check of every image, RGB conversion, and resumable sampling.

References: PIL's own decoders and conversions (computed here independently), numpy arithmetic for
16-bit and alpha, and the files themselves.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

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


# --- hostile folders: links, loops, names (issue 15) -------------------------------------------
def _all_keys(data):
    return [k for k, _ in data.train + data.val]


def _one_line_error(call, message):
    with pytest.raises(NFNetZooError, match=message) as e:
        call()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_a_link_loop_inside_a_class_folder_is_followed_once(tmp_path):
    root = make_folder(tmp_path / "d", n_train=10, n_val=0, split=False)
    os.symlink(".", root / "dark" / "again")            # dark/again/again/... forever
    os.symlink("000.png", root / "dark" / "alias.png")   # the same file twice in its own class
    data = load_image_data(root, workers=1)
    keys = _all_keys(data)
    assert len(keys) == len(set(keys)) == 30             # 30 files on disk, each once
    assert sorted(keys) == sorted(str(p.relative_to(root)) for p in root.glob("*/*.png") if not p.is_symlink())


def test_a_loop_to_the_data_folder_is_refused_naming_both_places(tmp_path):
    # the case: 30 files became 1,230 mislabelled samples with val images in training
    root = make_folder(tmp_path / "d", n_train=10, n_val=0, split=False)
    os.symlink("..", root / "dark" / "loop")
    msg = _one_line_error(lambda: load_image_data(root, workers=1), "same file.*class folders bright and dark")
    assert "bright/000.png" in msg and "dark/loop/bright/000.png" in msg


@pytest.mark.parametrize("link", ["file_symlink", "hard_link", "class_folder_symlink"])
def test_a_file_reachable_from_two_class_folders_is_refused(tmp_path, link):
    root = make_folder(tmp_path / "d", n_train=4, n_val=0, split=False)
    if link == "file_symlink":
        os.symlink("../dark/001.png", root / "mid" / "x.png")
    elif link == "hard_link":
        os.link(root / "dark" / "001.png", root / "mid" / "x.png")
    else:
        os.symlink("dark", root / "dusk")
    msg = _one_line_error(lambda: load_image_data(root, workers=1), "same file.*two labels")
    assert ("dark/000.png and dusk/000.png" if link == "class_folder_symlink" else "dark/001.png and mid/x.png") in msg


@pytest.mark.parametrize("link", ["folder_symlink", "file_symlink", "hard_link"])
def test_a_validation_image_reachable_from_train_is_refused(tmp_path, link):
    root = make_folder(tmp_path / "d", n_train=4, n_val=2)
    if link == "folder_symlink":
        os.symlink("../../val/dark", root / "train" / "dark" / "more")
    elif link == "file_symlink":
        os.symlink("../../val/mid/001.png", root / "train" / "mid" / "v.png")
    else:
        os.link(root / "val" / "mid" / "001.png", root / "train" / "mid" / "v.png")
    msg = _one_line_error(lambda: load_image_data(root, workers=1), "same file.*from train/ and val/")
    assert "val/" in msg and "train/" in msg
    # evaluating val/ alone is fine: the leak is between the two splits
    assert len(load_eval_samples(root, workers=1).val) == 6


def test_links_to_images_outside_the_folder_are_read_once(tmp_path):
    elsewhere = make_folder(tmp_path / "elsewhere", n_train=5, n_val=0, split=False)
    root = tmp_path / "d"
    root.mkdir()
    for c in ("dark", "mid"):
        os.symlink(elsewhere / c, root / c)
    os.symlink("nothing-here.png", elsewhere / "dark" / "gone.png")  # dangling: unreadable, skipped
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        data = load_image_data(root, workers=1)
    assert data.classes == ["dark", "mid"] and len(_all_keys(data)) == 10
    opener = data.opener()
    key, label = data.train[0]
    assert np.array_equal(np.asarray(opener(key)), np.asarray(Image.open(elsewhere / key).convert("RGB")))


@pytest.mark.parametrize("name", [b"d\xffrk", b"da\nrk"])
def test_a_class_folder_name_that_is_not_text_is_refused_with_its_bytes(tmp_path, name):
    root = make_folder(tmp_path / "d", n_train=3, n_val=0, split=False)
    os.rename(root / "dark", os.fsencode(root) + b"/" + name)
    msg = _one_line_error(lambda: load_image_data(root, workers=1), "not valid UTF-8 or holds control characters")
    assert repr(os.fsencode(root) + b"/" + name) in msg


def test_a_file_name_with_a_newline_keeps_messages_on_one_line(tmp_path):
    root = make_folder(tmp_path / "d", n_train=3, n_val=0, split=False)
    (root / "dark" / "bad\nname.png").write_bytes(b"not an image")
    msg = _one_line_error(lambda: load_image_data(root, bad_images="error", workers=1), "1 unreadable")
    assert repr(os.fsencode("dark/bad\nname.png")) in msg


def test_file_names_that_are_not_utf8_are_read_and_survive_data_json(tmp_path):
    root = make_folder(tmp_path / "d", n_train=3, n_val=1)
    name = os.fsencode(root / "train" / "dark") + b"/\xff\xfe.png"
    os.rename(root / "train" / "dark" / "000.png", name)
    data = load_image_data(root, workers=1)
    assert len(data.train) == 9 and not data.skipped
    data.save(tmp_path / "data.json")
    json.loads((tmp_path / "data.json").read_text(encoding="utf-8"))  # valid UTF-8 JSON
    again = ImageData.load(tmp_path / "data.json")
    key = next(k for k, _ in again.train if os.fsencode(k).endswith(b"\xff\xfe.png"))
    assert again.opener()(key).size == (24, 24)


def test_a_pipe_named_like_an_image_is_not_opened(tmp_path):
    root = make_folder(tmp_path / "d", n_train=3, n_val=0, split=False)
    os.mkfifo(root / "dark" / "fifo.jpg")  # opening it would wait for a writer forever
    with pytest.warns(UserWarning, match="ignored 1 non-image"):
        data = load_image_data(root, workers=1)
    assert len(_all_keys(data)) == 9 and not data.skipped


def test_a_relative_data_dir_is_stored_absolute(tmp_path, monkeypatch):
    make_folder(tmp_path / "work" / "d", n_train=3, n_val=1)
    monkeypatch.chdir(tmp_path / "work")
    load_image_data("d", workers=1).save(tmp_path / "data.json")
    monkeypatch.chdir(tmp_path)  # a resumed run starts from elsewhere
    data = ImageData.load(tmp_path / "data.json")
    assert data.root == str(tmp_path / "work" / "d")
    assert data.opener()(data.train[0][0]).size == (24, 24)


@pytest.mark.parametrize("stray", ["state.json", "dataset_dict.json"])
def test_a_stray_json_file_does_not_make_a_folder_a_saved_dataset(tmp_path, stray):
    root = make_folder(tmp_path / "d", n_train=3, n_val=1)
    (root / stray).write_text(json.dumps({"splits": ["train"]} if stray == "dataset_dict.json" else {"epoch": 3}))
    data = load_image_data(root, workers=1)
    assert data.kind == "folder" and len(data.train) == 9


def test_class_order_is_timms_for_numbered_names(tmp_path):
    from timm.data.readers.reader_image_folder import ReaderImageFolder
    root = make_folder(tmp_path / "d", n_train=2, n_val=0, split=False)
    for i, name in enumerate(["class10", "class2", "Class1", "a9b", "a10b"]):
        shutil.copytree(root / "mid", root / name)
    shutil.rmtree(root / "mid")
    timm_order = sorted(ReaderImageFolder(str(root)).class_to_idx.items(), key=lambda kv: kv[1])
    assert load_image_data(root, val_split=0, workers=1).classes == [c for c, _ in timm_order]
    assert load_eval_samples(root, workers=1).classes == [c for c, _ in timm_order]


def test_evaluation_folder_of_unreadable_files_is_one_line(tmp_path):
    for c in ("a", "b"):
        (tmp_path / "d" / c).mkdir(parents=True)
        (tmp_path / "d" / c / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.warns(UserWarning, match="skipped 2"):
        _one_line_error(lambda: load_eval_samples(tmp_path / "d", workers=1), "no readable images to evaluate")


# --- the start-up check: levels, cache, processes (issue 13) ------------------------------------
@pytest.fixture
def checked(monkeypatch):
    """The keys the check decodes or reads (cache hits are not in it)."""
    import nfnet_zoo.data.image_check as image_check

    class Keys(list):
        levels: set = set()
    keys, readable = Keys(), image_check.is_readable

    def recording(raw, key, level):
        keys.append(key)
        keys.levels = keys.levels | {level}
        return readable(raw, key, level)
    monkeypatch.setattr(image_check, "is_readable", recording)
    return keys


def _damaged_inside_png(path: Path) -> None:
    """A PNG whose compressed data is broken but whose chunks and IEND are in place."""
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT") + 4
    data[start + 10:start + 40] = bytes(30)
    path.write_bytes(bytes(data))


def test_check_levels_find_what_they_promise(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "d", n_train=4, n_val=1)
    add_awkward_files(root / "train" / "mid")  # a truncated JPEG, a PNG of garbage, and good odd files
    shutil.copy(root / "train" / "dark" / "000.png", root / "train" / "dark" / "inside.png")
    _damaged_inside_png(root / "train" / "dark" / "inside.png")
    png = (root / "train" / "dark" / "001.png").read_bytes()
    (root / "train" / "dark" / "cut.png").write_bytes(png[: len(png) // 2])
    with Image.open(root / "train" / "dark" / "inside.png") as img:  # PIL is the reference: header reads,
        img.size                                                     # decoding fails
        with pytest.raises((OSError, SyntaxError)):
            img.load()
    levels = {}
    for level in ("full", "header", "none"):
        monkeypatch.setenv("NFNET_ZOO_CACHE", str(tmp_path / level))  # a full result would serve a header check
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            levels[level] = load_image_data(root, check=level, workers=1)
    assert sorted(levels["full"].skipped) == ["train/dark/cut.png", "train/dark/inside.png",
                                              "train/mid/corrupt.png", "train/mid/truncated.jpg"]
    assert sorted(levels["header"].skipped) == ["train/dark/cut.png", "train/mid/corrupt.png",
                                                "train/mid/truncated.jpg"]  # damage inside is not seen
    assert levels["none"].skipped == []
    assert len(levels["none"].train) == len(levels["full"].train) + 4
    # unchecked, a bad file stops training when it is reached, with a line saying why it got there
    _one_line_error(lambda: levels["none"].opener()("train/mid/corrupt.png"),
                    "cannot read image train/mid/corrupt.png .*check did not decode it")


def test_results_are_remembered_for_unchanged_files_only(tmp_path, checked, monkeypatch):
    monkeypatch.setenv("NFNET_ZOO_CACHE", str(tmp_path / "cache"))
    root = make_folder(tmp_path / "d", n_train=4, n_val=1)
    (root / "train" / "mid" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.warns(UserWarning, match="skipped 1"):
        first = load_image_data(root, workers=1)
    assert len(checked) == 16
    cache_files = list((tmp_path / "cache").glob("*.json"))
    assert len(cache_files) == 1 and json.loads(cache_files[0].read_text())["root"] == str(root)  # plain JSON

    checked.clear()
    with pytest.warns(UserWarning, match="skipped 1"):  # the bad file is remembered too
        assert load_image_data(root, workers=1) == first
    assert checked == []

    changed = root / "train" / "dark" / "002.png"
    changed.write_bytes((root / "train" / "dark" / "003.png").read_bytes())
    with pytest.warns(UserWarning, match="skipped 1"):
        load_image_data(root, workers=1)
    assert checked == ["train/dark/002.png"]

    checked.clear()  # a header check is not enough for a full one; a full one is for a header one
    root2 = make_folder(tmp_path / "d2", n_train=2, n_val=1)
    load_image_data(root2, check="header", workers=1)
    load_image_data(root2, check="full", workers=1)
    load_image_data(root2, check="header", workers=1)
    assert len(checked) == 2 * 9


def test_finetune_checks_at_the_level_asked_and_remembers_across_runs(tmp_path, checked, monkeypatch):
    from nfnet_zoo.training.finetune import finetune
    monkeypatch.setenv("NFNET_ZOO_CACHE", str(tmp_path / "cache"))
    root = make_folder(tmp_path / "d", n_train=6, n_val=2)
    common = dict(model="nfnet_zoo_tiny", data_dir=str(root), epochs=1, img_size=32, batch_size=6, workers=0,
                  pretrained=False, check_images="header")
    finetune(output=str(tmp_path / "one"), **common)
    assert len(checked) == 24 and checked.levels == {"header"}
    checked.clear()
    finetune(output=str(tmp_path / "two"), **common)  # another run on the unchanged folder
    assert checked == []
    assert ImageData.load(tmp_path / "two" / "data.json") == ImageData.load(tmp_path / "one" / "data.json")


@pytest.mark.parametrize("tamper", ["other_root", "not_json", "code"])
def test_a_cache_file_that_does_not_match_is_not_trusted(tmp_path, checked, monkeypatch, tamper):
    monkeypatch.setenv("NFNET_ZOO_CACHE", str(tmp_path / "cache"))
    root = make_folder(tmp_path / "d", n_train=2, n_val=1)
    load_image_data(root, workers=1)
    cache = next((tmp_path / "cache").glob("*.json"))
    d = json.loads(cache.read_text())
    if tamper == "other_root":
        d["root"] = str(tmp_path / "elsewhere")
        cache.write_text(json.dumps(d))
    elif tamper == "not_json":
        cache.write_text(cache.read_text()[:-20])
    else:
        import pickle
        cache.write_bytes(pickle.dumps(d))
    checked.clear()
    load_image_data(root, workers=1)
    assert len(checked) == 9


def test_processes_each_check_their_share_and_agree(tmp_path):
    root = make_folder(tmp_path / "d", n_train=6, n_val=0, split=False)
    (root / "mid" / "bad.png").write_bytes(b"not an image")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), NFNET_ZOO_CACHE=str(tmp_path / "cache"))
    worker = Path(__file__).parent / "_data_dist_worker.py"
    for tag in ("first", "again"):
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            str(worker), str(root), str(tmp_path), tag], env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    first = [json.loads((tmp_path / f"first-{i}.json").read_text()) for i in range(2)]
    again = [json.loads((tmp_path / f"again-{i}.json").read_text()) for i in range(2)]
    a, b = (set(p["checked"]) for p in first)
    assert not a & b and len(a | b) == 19 and abs(len(a) - len(b)) <= 1  # each its half, none twice
    assert first[0]["skipped"] == first[1]["skipped"] == ["mid/bad.png"]
    assert first[0]["train"] == first[1]["train"] and first[0]["val"] == first[1]["val"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = load_image_data(root, val_split=0.2, workers=1)  # one process is the reference
    assert [tuple(s) for s in first[0]["train"]] == one.train and [tuple(s) for s in first[0]["val"]] == one.val
    assert again[0]["checked"] == again[1]["checked"] == []  # the second run finds every result remembered


def test_machines_without_a_shared_run_folder_are_refused_at_start(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    worker = Path(__file__).parent / "_data_dist_worker.py"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(worker), str(tmp_path), str(tmp_path), "probe", "--not-shared"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    errors = [json.loads((tmp_path / f"probe-{i}.json").read_text())["error"] for i in range(2)]
    for i, e in enumerate(errors):  # every process stops, each naming the folder it sees
        assert e.startswith(f"the run folder {tmp_path}/run-of-process-{i} is not shared by all processes")
        assert "\n" not in e
    assert not list(tmp_path.glob("run-of-process-*/.shared-*"))  # the probe file is removed


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
    import datasets  # the test extra
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
    # a row or split the run's data.json names that the dataset no longer has: one line, not an IndexError
    for gone in ("train/13", "test/0"):
        with pytest.raises(NFNetZooError, match=f"cannot read image {gone} .*it changed") as e:
            data.opener()(gone)
        assert "\n" not in str(e.value)


def test_saved_dataset_without_the_datasets_package_is_one_line(tmp_path, monkeypatch):
    import datasets  # the test extra
    from _images import class_image
    rng = np.random.default_rng(0)
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    rows = {"img": [class_image("dark", rng) for _ in range(4)], "label": [0, 1, 0, 1]}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "ds"))
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now fails, as when not installed
    for load in (load_image_data, load_eval_samples):
        _one_line_error(lambda: load(tmp_path / "ds", workers=1), "needs the `datasets` package: pip install")


# --- issue 21: folders and datasets that looked like something else ---------------------------------------------
@pytest.mark.parametrize("where", ["run", "runs/run-2"])
def test_an_earlier_run_folder_inside_the_data_is_refused_not_a_class(tmp_path, where):
    """It became a class (its curves.png the only image) with only a count of non-image files warned."""
    root = make_folder(tmp_path / "d", n_train=3, n_val=0, split=False)
    run = root / where
    run.mkdir(parents=True)
    for name in ("args.json", "data.json", "metrics.jsonl"):
        (run / name).write_text("{}")
    Image.new("RGB", (8, 8)).save(run / "curves.png")
    for load in (load_image_data, load_eval_samples):
        line = _one_line_error(lambda: load(root, workers=1), "is a run folder of nfnet-zoo finetune")
        assert str(run) in line and "move it out of the data folder" in line


def test_a_class_named_train_is_a_class(tmp_path):
    root = make_folder(tmp_path / "d", n_train=3, n_val=0, split=False, classes=("dark", "mid"))
    shutil.copytree(root / "dark", root / "train")  # vehicles: bus, car, train
    data = load_image_data(root, workers=1, val_split=0.0)
    assert data.classes == ["dark", "mid", "train"] and len(data.train) == 9
    assert {k.split("/")[0] for k, lab in data.train if lab == 2} == {"train"}
    shutil.rmtree(root / "dark")
    (root / "mid").rename(root / "test")  # only train/ and test/, both of images: classes too
    assert load_image_data(root, workers=1, val_split=0.0).classes == ["test", "train"]


def test_a_train_folder_of_classes_beside_other_folders_is_ambiguous(tmp_path):
    root = make_folder(tmp_path / "d", n_train=3, n_val=1)
    shutil.copytree(root / "train" / "dark", root / "extra")  # a class beside the splits, or a stray folder?
    line = _one_line_error(lambda: load_image_data(root, workers=1), "train/ .* beside other folders")
    assert "extra" in line and "rename" in line


def test_a_saved_datasets_unlabelled_test_split_and_missing_images(tmp_path):
    """A `test` split with labels -1 (the unlabelled convention) was used as validation: IndexError after a whole
    epoch; a row whose image is None was a traceback."""
    import datasets  # the test extra
    from _images import class_image
    rng = np.random.default_rng(0)
    names = ["bright", "dark", "mid"]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    train = {"img": [class_image(n, rng) for n in names for _ in range(4)], "label": [c for c in range(3) for _ in range(4)]}
    train["img"] += [None, class_image("dark", rng)]
    train["label"] += [1, -1]  # no image; no label
    test = {"img": [class_image("mid", rng) for _ in range(3)], "label": [-1] * 3}
    dd = datasets.DatasetDict(train=datasets.Dataset.from_dict(train, features=features),
                              test=datasets.Dataset.from_dict(test, features=features))
    dd.save_to_disk(str(tmp_path / "ds"))
    with pytest.warns(UserWarning) as record:
        data = load_image_data(tmp_path / "ds", workers=1, val_split=0.25)
    messages = " | ".join(str(w.message) for w in record)
    assert "the test split of" in messages and "has no labels (-1)" in messages and "not used for validation" in messages
    assert "left out 1 row(s) without a label" in messages and "skipped 1 unreadable" in messages
    assert data.skipped == ["train/12"] and all(k.startswith("train/") for k, _ in data.train + data.val)
    assert "train/13" not in dict(data.train + data.val) and len(data.train) + len(data.val) == 12
    assert all(0 <= lab < 3 for _, lab in data.train + data.val)


@pytest.mark.parametrize("load", [load_eval_samples, load_image_data], ids=["evaluate", "finetune"])
def test_an_unknown_check_level_is_refused_as_finetunes_flag_is(tmp_path, load):
    from nfnet_zoo_cli.settings import SettingError, validate
    with pytest.raises(SettingError) as declared:  # the declaration of --check-images (settings.py)
        validate({"check_images": "bogus"})
    with pytest.raises(NFNetZooError) as got:
        load(make_folder(tmp_path / "d", n_train=2, n_val=1), check="bogus")
    assert str(got.value) == str(declared.value) == "--check-images must be one of full, header, none, got 'bogus'"
