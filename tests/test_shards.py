"""WebDataset shards (data/shards.py), written by webdataset's TarWriter (tests/_shards.py): each image carries its
class as a colour and its sample number in a pixel, so what a stream yields is checked against what was written."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _shards import read_back, write_info, write_shards
import nfnet_zoo  # noqa: F401  (registers the variants)
from nfnet_zoo import NFNetZooError
from nfnet_zoo.data import load_eval_samples, load_image_data
from nfnet_zoo.data.shards import ShardStream
from nfnet_zoo.evaluation import evaluate
from nfnet_zoo.training.finetune import finetune

TINY = dict(model="nfnet_zoo_tiny", img_size=32, batch_size=4, workers=0, pretrained=False, lr=0.05, epochs=2)


def _numbers(data, split: str, **kw) -> list[tuple[int, int]]:
    """(label, sample number) of what a stream yields, its label checked against the class its image shows."""
    got = list(ShardStream(data, split, read_back, **kw))
    assert all(shown == label for (shown, _), label in got), "a label that is not its image's class"
    return [(label, n) for (_, n), label in got]


@pytest.fixture(scope="module")
def timm_wds(tmp_path_factory) -> tuple[Path, list[dict], list[dict]]:
    """timm's wds layout: shards named dataset-split-NNNNNN.tar and _info.json with brace patterns."""
    root = tmp_path_factory.mktemp("timm") / "shapes"
    train = write_shards(root, "shapes-train", [7, 5, 6])
    val = write_shards(root, "shapes-validation", [4, 3], first=100)
    write_info(root, {"train": ("shapes-train-{000000..000002}.tar", [7, 5, 6]),
                      "validation": ("shapes-validation-{000000..000001}.tar", [4, 3])})
    return root, train, val


@pytest.fixture(scope="module")
def uninterrupted(timm_wds, tmp_path_factory) -> Path:
    root, _, _ = timm_wds
    return finetune(data_dir=f"wds/{root}", output=str(tmp_path_factory.mktemp("runs") / "run"), **TINY)


def test_info_json_is_read_without_a_pass_over_the_shards(timm_wds, monkeypatch):
    root, train, val = timm_wds
    monkeypatch.setattr(tarfile, "open", lambda *a, **k: pytest.fail("a shard was opened at the start"))
    data = load_image_data(f"wds/{root}")
    assert (data.kind, data.classes, data.num_train, data.num_val) == ("wds", ["0", "1", "2"], 18, 7)
    assert data.shards["splits"]["train"]["files"] == [f"shapes-train-00000{i}.tar" for i in range(3)]


def test_a_stream_yields_each_image_with_its_own_label(timm_wds):
    root, train, val = timm_wds
    data = load_image_data(f"wds/{root}")
    written = {int(s["key"].rsplit("-", 1)[1]): s["label"] for s in train + val}
    epoch = _numbers(data, "train", batch_size=3, batches=6)  # 18 samples: all of them once
    assert sorted(n for _, n in epoch) == sorted(int(s["key"].rsplit("-", 1)[1]) for s in train)
    assert all(written[n] == label for label, n in epoch)
    assert [n for _, n in epoch] != sorted(n for _, n in epoch)  # shuffled
    assert sorted(n for _, n in _numbers(data, "val")) == list(range(100, 107))


def test_the_shuffle_is_a_function_of_seed_and_epoch(timm_wds):
    data = load_image_data(f"wds/{timm_wds[0]}")

    def order(seed, epoch):
        s = ShardStream(data, "train", read_back, seed=seed, batch_size=2, batches=9)
        s.epoch = epoch
        return [x[1] for x, _ in s]
    assert order(0, 0) == order(0, 0)
    assert order(0, 1) != order(0, 0) and order(1, 0) != order(0, 0)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_epoch_yields_the_batches_the_run_had_left(timm_wds, workers):
    data = load_image_data(f"wds/{timm_wds[0]}")
    stream = ShardStream(data, "train", lambda img: read_back(img)[1], seed=3, batch_size=2, batches=7)
    stream.epoch = 1
    loader = torch.utils.data.DataLoader(stream, batch_size=2, num_workers=workers)
    batches = lambda: [b.tolist() for b, _ in loader]
    whole = batches()
    assert len(whole) == 7
    for skip in (1, 2, 5):
        stream.skip = skip
        assert batches() == whole[skip:], skip


def test_a_plain_folder_of_tars_trains_and_evaluates_end_to_end(uninterrupted, timm_wds, tmp_path):
    root, train, val = timm_wds
    # the same shards without _info.json, in train/ and val/ subfolders: counted from the tar headers
    plain = tmp_path / "plain"
    write_shards(plain / "train", "a", [7, 5, 6])
    write_shards(plain / "val", "b", [4, 3], first=100)
    run = finetune(data_dir=str(plain), output=str(tmp_path / "run"), **{**TINY, "epochs": 1})
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["num_train"], summary["num_val"], summary["num_classes"]) == (18, 7, 3)
    recorded = json.loads((run / "data.json").read_text())["shards"]["splits"]
    assert recorded["train"]["files"] == [f"train/a-00000{i}.tar" for i in range(3)]
    assert recorded["train"]["lengths"] == [7, 5, 6] and recorded["val"]["lengths"] == [4, 3]
    # timm's form trained to the end; evaluating the run on its data scores its validation shards only
    rows = [json.loads(r) for r in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(r["val_loss"]) for r in rows)
    result = evaluate(str(uninterrupted), f"wds/{root}", batch_size=4, workers=0)
    assert result["num_images"] == 7 and "held-out" in result["split"]
    assert result["top1"] == pytest.approx(rows[-1]["top1"])


def test_val_split_holds_out_the_same_keys_by_their_hash(tmp_path):
    root = tmp_path / "d"
    written = write_shards(root, "train", [20, 20, 20])
    # an independent reference of the rule README states: crc32 of "0:KEY" below the fraction of 2**32
    held = {s["key"] for s in written if zlib.crc32(f"0:{s['key']}".encode()) < 0.25 * 2 ** 32}
    assert 0 < len(held) < 60
    first, again = load_image_data(root, val_split=0.25), load_image_data(root, val_split=0.25)
    assert first.shards == again.shards
    assert (first.num_train, first.num_val) == (60 - len(held), len(held))
    val = {n for _, n in _numbers(first, "val")}
    assert val == {int(k.rsplit("-", 1)[1]) for k in held}
    trained = {n for _, n in _numbers(first, "train", batch_size=1, batches=first.num_train)}
    assert not trained & val and len(trained | val) == 60


def test_input_key_and_target_key_name_the_members(tmp_path):
    root = tmp_path / "d"
    write_shards(root, "train", [4, 4], image="jpg", label="label")  # PNG bytes under .jpg: PIL reads the content
    _one_line("has no .cls label member.*--target-key", lambda: load_image_data(root))
    data = load_image_data(root, val_split=0.0, input_key="jpg", target_key=".label")
    assert data.shards["input_key"] == "jpg" and data.shards["target_key"] == "label"
    assert sorted(n for _, n in _numbers(data, "train", batch_size=1, batches=8)) == list(range(8))
    wrong = load_image_data(root, val_split=0.0, input_key="webp", target_key="label")
    with pytest.warns(UserWarning, match="no image member"):
        assert _numbers(wrong, "train") == []  # read once, as a validation split is


def test_split_names_of_shard_files(tmp_path):
    root = tmp_path / "d"
    write_shards(root, "train", [3, 3])
    write_shards(root, "val", [2])
    write_shards(root, "test", [2], first=50)
    data = load_image_data(root, val_split=0.5)  # a named split wins over --val-split
    assert data.shards["splits"]["val"]["files"] == ["val-000000.tar"] and data.shards["held_out"] == 0
    evaluated = load_eval_samples(root)
    assert evaluated.shards["splits"]["val"]["files"] == ["val-000000.tar"] and evaluated.num_val == 2


def test_two_processes_read_disjoint_shares_and_validate_each_sample_once(tmp_path):
    root = tmp_path / "d"
    written = write_shards(root, "train", [9, 2, 5, 1, 7])  # uneven on purpose
    val = write_shards(root, "val", [5, 1, 3], first=100)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    worker = Path(__file__).parent / "_shards_dist_worker.py"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(worker), str(root), str(tmp_path), "2"], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank-{i}.json").read_text()) for i in range(2)]
    assert ranks[0]["batches"] == ranks[1]["batches"] == 24 // 4
    for epoch in range(2):
        a, b = (r["epochs"][epoch] for r in ranks)
        assert len(a) == len(b) == 12
        numbers = {int(s["key"].rsplit("-", 1)[1]) for s in written}
        assert set(a) <= numbers and set(b) <= numbers
    a, b = ranks[0]["val"], ranks[1]["val"]
    assert not set(a) & set(b) and sorted(a + b) == list(range(100, 109))  # each validation sample once
    # the mean loss over every validation sample once, by hand: logits (n mod 5, 0, 0), target its class
    labels = {100 + i: s["label"] for i, s in enumerate(val)}
    loss = lambda n: math.log(math.exp(n % 5) + 2) - (n % 5 if labels[n] == 0 else 0)
    expected = sum(loss(n) for n in labels) / len(labels)
    for r in ranks:
        assert r["metrics"]["val_loss"] == pytest.approx(expected, rel=1e-6)  # float32 logits


def test_resume_after_a_crash_mid_epoch_ends_with_the_same_weights(uninterrupted, timm_wds, tmp_path, monkeypatch):
    import importlib
    ft = importlib.import_module("nfnet_zoo.training.finetune")
    real, calls = ft._train_step, {"n": 0}

    def crashing(t, x, y):  # a kill after step 3: the state saved at step 2 is the last
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("killed")
        return real(t, x, y)
    monkeypatch.setattr(ft, "_train_step", crashing)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="killed"):
        finetune(data_dir=f"wds/{timm_wds[0]}", output=str(out), save_every=2, **TINY)
    assert json.loads((out / "state" / "progress.json").read_text())["step"] == 2
    monkeypatch.setattr(ft, "_train_step", real)
    finetune(resume=str(out))
    for name in ("last", ""):
        a, b = load_file(out / name / "model.safetensors"), load_file(uninterrupted / name / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


# --- bad input: one line each ---------------------------------------------------------------------
def _one_line(match: str, call):
    with pytest.raises(NFNetZooError, match=match) as e:
        call()
    assert "\n" not in str(e.value)


def test_bad_shards_are_one_line_errors(tmp_path):
    empty = tmp_path / "empty"
    write_shards(empty, "train", [3, 0])
    _one_line("train-000001.tar holds no samples", lambda: load_image_data(empty))
    notatar = tmp_path / "notatar"
    write_shards(notatar, "train", [3])
    (notatar / "train-000001.tar").write_bytes(b"this is not a tar file" * 40)
    _one_line("train-000001.tar is not a readable tar file", lambda: load_image_data(notatar))
    unlabelled = tmp_path / "unlabelled"
    write_shards(unlabelled, "train", [3], label=None)
    _one_line("has no .cls label member.*--target-key", lambda: load_image_data(unlabelled))
    missing = tmp_path / "missing"
    write_shards(missing, "train", [3, 3])
    write_info(missing, {"train": ("train-{000000..000002}.tar", [3, 3, 3])})
    _one_line("train-000002.tar is missing", lambda: load_image_data(f"wds/{missing}"))
    _one_line("is not a folder", lambda: load_image_data(f"wds/{tmp_path}/nowhere"))
    _one_line("is not a folder", lambda: load_image_data("wds/"))
    write_info(missing, {"train": ("train-{000000..000001}.tar", [3, 3])}, num_classes="three")
    _one_line("num_classes 'three' is not a count", lambda: load_image_data(f"wds/{missing}"))


def test_a_label_out_of_range_is_refused_when_it_is_met(tmp_path):
    root = tmp_path / "d"
    write_shards(root, "train", [4], classes=4)  # labels 0..3
    write_info(root, {"train": ("train-000000.tar", [4])}, num_classes=3)  # _info.json says 3 classes
    data = load_image_data(f"wds/{root}")
    _one_line("label 3 is out of range", lambda: _numbers(data, "train", batch_size=1, batches=4))


def test_a_corrupt_image_mid_stream_is_skipped_and_counted_or_refused(tmp_path):
    import webdataset as wds
    root = tmp_path / "d"
    write_shards(root, "train", [4])
    with wds.TarWriter(str(root / "train-000001.tar")) as sink:
        sink.write({"__key__": "broken", "png": b"\x89PNG\r\n\x1a\n truncated", "cls": b"1"})
    data = load_image_data(root)
    assert data.num_train == 5  # counted from headers: the image is not decoded at the start
    with pytest.warns(UserWarning, match="skipped unreadable image of sample broken.*1 in this reader"):
        got = _numbers(data, "train", batch_size=1, batches=4)
    assert sorted(n for _, n in got) == [0, 1, 2, 3]
    _one_line("cannot read image of sample broken.*--bad-images skip",
              lambda: _numbers(data, "train", batch_size=1, batches=5, bad_images="error"))


def test_a_resume_with_other_workers_says_it_is_not_exact(timm_wds):
    from accelerate import Accelerator
    from nfnet_zoo_cli.settings import FinetuneConfig
    from nfnet_zoo.training.recipe import _stream_loaders
    data = load_image_data(f"wds/{timm_wds[0]}", workers=2)  # what data.json records: the run's readers
    assert data.shards["readers"] == {"processes": 1, "workers": 2}
    with pytest.warns(UserWarning, match=r"read by 2 worker\(s\) on 1 process\(es\), now 0 on 1.*--workers 2 on 1"):
        train, _, _ = _stream_loaders(FinetuneConfig(batch_size=2, workers=0), data, Accelerator(cpu=True), None, None,
                                      2, dict(num_workers=0))
    assert len(train) == 9


def test_class_balance_is_refused_for_a_stream(timm_wds, tmp_path):
    # both forms need every training label before the first step; a stream has them only as it is read
    for how in ("loss", "sampler"):
        _one_line(f"--class-balance {how} needs every training label.*--class-balance none",
                  lambda: finetune(data_dir=f"wds/{timm_wds[0]}", output=str(tmp_path / how), class_balance=how,
                                   **TINY))
