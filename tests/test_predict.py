"""`nfnet-zoo predict` on files, folders and paths on stdin, streamed as text, a JSON array, JSON lines or CSV.

Reference for the probabilities: the model folder loaded by timm's own `local-dir:` loader, run on timm's eval
transform (`resolve_data_config` + `create_transform`) of the same files; for the inputs, the files listed by hand.
"""
from __future__ import annotations

import csv
import io
import itertools
import json
import os
import select
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

from _images import make_folder
from _tiny_nfnet import model_folder
from nfnet_zoo.evaluation import iter_predictions, predict
from nfnet_zoo_cli import main as cli_main

SRC = str(Path(__file__).resolve().parents[1] / "src")
CLASSES = ["bright", "dark", "mid"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    """A randomly initialised nfnet_zoo_tiny (residual branches on) saved as a model folder, in the shared form."""
    return model_folder(tmp_path_factory.mktemp("model") / "tiny", CLASSES)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """ROOT/<split>/<class>/*.png (18 files), a link to one of them, a link loop, and a text file."""
    root = make_folder(tmp_path_factory.mktemp("img") / "shapes", n_train=4, n_val=2)
    (root / "val" / "mid" / "again.png").symlink_to(root / "train" / "dark" / "000.png")
    (root / "train" / "loop").symlink_to(root / "train")
    (root / "notes.txt").write_text("not an image")
    return root


def _files(root: Path) -> list[str]:
    """The real image files under ROOT in name order, by hand."""
    return [str(root / split / c / f"{i:03d}.png") for split, n in (("train", 4), ("val", 2)) for c in CLASSES
            for i in range(n)]


def _reference(model: str, files: list[str]) -> torch.Tensor:
    from timm.data import create_transform, resolve_data_config
    net = timm.create_model(f"local-dir:{model}", pretrained=True).eval()
    tf = create_transform(**resolve_data_config(model=net, use_test_size=True))
    with torch.no_grad():
        return net(torch.stack([tf(Image.open(f).convert("RGB")) for f in files])).softmax(1)


def _same(got: list[dict], want: list[dict]) -> bool:
    """The same images, labels and errors, and the same probabilities up to float32 rounding (a batch's composition
    changes the last bits of a convolution's result)."""
    def exact(rs):
        return [{**r, "predictions": [{**q, "probability": None} for q in r.get("predictions", [])]} for r in rs]
    probabilities = [q["probability"] for r in got for q in r.get("predictions", [])]
    return exact(got) == exact(want) and probabilities == pytest.approx(
        [q["probability"] for r in want for q in r.get("predictions", [])], abs=1e-6)


def _lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def _cli(args: list, capsys, monkeypatch, stdin: str = "") -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = cli_main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_the_api_matches_timm_on_its_eval_transform(model, images):
    files = _files(images)
    probs = _reference(model, files)
    out = predict(model, files, topk=3)
    assert [r["image"] for r in out] == files
    for r, p in zip(out, probs):
        assert [q["index"] for q in r["predictions"]] == p.argsort(descending=True).tolist()
        for q in r["predictions"]:
            assert q["label"] == CLASSES[q["index"]]
            assert q["probability"] == pytest.approx(p[q["index"]].item(), abs=1e-5)
    assert _same(list(iter_predictions(model, files, topk=3, batch_size=4, workers=1)), out)  # batches, workers


def test_a_folder_is_its_images_in_name_order_each_file_once(model, images, capsys, monkeypatch):
    files = _files(images)
    code, listed, _ = _cli(["predict", model, *files, "--jsonl", "-j", "0"], capsys, monkeypatch)
    assert code == 0
    code, walked, _ = _cli(["predict", model, images, "--jsonl", "-j", "0", "-b", "5"], capsys, monkeypatch)
    assert code == 0
    # the link to train/dark/000.png and the loop back into train/ add nothing; notes.txt is not an image
    assert _same(_lines(walked), _lines(listed))


def test_stdin_is_the_same_list(model, images, capsys, monkeypatch):
    files = _files(images)
    code, listed, _ = _cli(["predict", model, *files, "--jsonl", "-j", "0"], capsys, monkeypatch)
    stdin = "\n".join(files[1:]) + "\n\n"  # a blank line is skipped
    code2, piped, _ = _cli(["predict", model, files[0], "-", "--jsonl", "-j", "0", "-b", "3"], capsys, monkeypatch,
                           stdin)
    assert code == code2 == 0 and _same(_lines(piped), _lines(listed))


def test_json_lines_json_csv_and_text_agree_with_the_api(model, images, capsys, monkeypatch):
    files = _files(images)[::3]
    api = predict(model, files, topk=2)
    code, lines, _ = _cli(["predict", model, *files, "-k", "2", "--jsonl", "-j", "0", "-b", "2"], capsys, monkeypatch)
    assert code == 0 and _same(_lines(lines), api)
    code, array, _ = _cli(["predict", model, *files, "-k", "2", "--json", "-j", "0"], capsys, monkeypatch)
    assert code == 0 and json.loads(array) == api
    code, table, _ = _cli(["predict", model, *files, "-k", "2", "--csv", "-j", "0"], capsys, monkeypatch)
    rows = list(csv.reader(io.StringIO(table)))
    assert code == 0 and rows[0] == ["image", "label_1", "prob_1", "label_2", "prob_2", "error"]
    for row, r in zip(rows[1:], api, strict=True):
        assert row[0] == r["image"] and row[-1] == ""
        assert row[1:-1:2] == [q["label"] for q in r["predictions"]]
        assert [float(p) for p in row[2:-1:2]] == [q["probability"] for q in r["predictions"]]  # same batch: exact
    code, text, _ = _cli(["predict", model, *files, "-k", "2", "-j", "0"], capsys, monkeypatch)
    assert code == 0 and text.splitlines()[:3] == [
        files[0], *(f"  {q['probability']:7.2%}  {q['label']}" for q in api[0]["predictions"])]


def test_unreadable_images_are_their_entries_and_exit_1(model, images, tmp_path, capsys, monkeypatch):
    files = _files(images)[:4]
    (tmp_path / "text.png").write_bytes(b"not an image")
    png = Path(files[0]).read_bytes()
    (tmp_path / "truncated.png").write_bytes(png[: len(png) // 2])
    bad = [str(tmp_path / "text.png"), str(tmp_path / "truncated.png")]
    given = [files[0], bad[0], files[1], bad[1], files[2]]
    stdin = f"{files[3]}\n{tmp_path / 'gone.png'}\n{tmp_path}\n"  # from stdin: missing, a folder
    code, out, err = _cli(["predict", model, *given, "-", "--jsonl", "-j", "1", "-b", "2"], capsys, monkeypatch, stdin)
    assert code == 1 and "4 of 8 images could not be read" in err
    results = _lines(out)
    assert [r["image"] for r in results] == [*given, files[3], str(tmp_path / "gone.png"), str(tmp_path)]
    errors = {r["image"]: r["error"] for r in results if "error" in r}
    assert set(errors) == {*bad, str(tmp_path / "gone.png"), str(tmp_path)}
    assert "cannot identify image file" in errors[bad[0]] and "truncated" in errors[bad[1]]
    assert errors[str(tmp_path / "gone.png")] == "does not exist" and "is a folder" in errors[str(tmp_path)]
    good = predict(model, [*files[:4]], topk=5)
    assert _same([r for r in results if "error" not in r], good)
    code, table, _ = _cli(["predict", model, bad[0], files[0], "--csv", "-j", "0"], capsys, monkeypatch)
    rows = list(csv.DictReader(io.StringIO(table)))
    assert code == 1 and "cannot identify image file" in rows[0]["error"] and rows[0]["label_1"] == ""
    assert rows[1]["error"] == "" and rows[1]["label_1"] == good[0]["predictions"][0]["label"]


def test_missing_inputs_and_empty_folders_are_refused_before_the_model_is_loaded(images, tmp_path, capsys,
                                                                                    monkeypatch):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("no images here")
    image = _files(images)[0]
    for inputs, says in (([image, tmp_path / "gone.png"], f"image {tmp_path / 'gone.png'} does not exist"),
                         ([tmp_path / "empty"], f"{tmp_path / 'empty'} holds no images"),
                         (["-", "-"], '"-" (paths on stdin) is given more than once')):
        code, out, err = _cli(["predict", "nfnet_fx", *inputs], capsys, monkeypatch)  # no such model: not reached
        assert code == 2 and out == "" and err.startswith("nfnet-zoo predict: error: ") and says in err, err
        assert len(err.splitlines()) == 1
    code, _, err = _cli(["predict", "nfnet_fx", "-"], capsys, monkeypatch)
    assert code == 2 and "unknown model 'nfnet_fx'" in err  # stdin's paths are read after the model is loaded


def test_an_endless_stream_is_scored_as_it_comes(model, images):
    files = _files(images)
    taken = []

    def endless():
        for f in itertools.cycle(files):
            taken.append(f)
            yield f
    for workers, batch in ((0, 3), (1, 2)):
        taken.clear()
        first = list(itertools.islice(iter_predictions(model, endless(), topk=1, batch_size=batch, workers=workers), 4))
        assert [r["image"] for r in first] == files[:4]
        assert len(taken) <= batch * (2 + 2 * workers), len(taken)  # a few batches ahead, never the whole stream


def test_the_first_result_is_printed_before_stdin_ends(model, images):
    files = _files(images)
    env = dict(os.environ, PYTHONPATH=SRC)
    proc = subprocess.Popen([sys.executable, "-m", "nfnet_zoo_cli", "predict", model, "-", "--jsonl", "-b", "2",
                             "-j", "1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        proc.stdin.write("\n".join(files[:6]) + "\n")  # batch 0, and the 2 batches one worker may fetch ahead
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        assert ready, "no result while stdin is still open"
        assert json.loads(proc.stdout.readline())["image"] == files[0]
        proc.stdin.write("\n".join(files[6:]) + "\n")
        proc.stdin.close()
        rest = proc.stdout.read().splitlines()
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    finally:
        proc.kill()
    assert [json.loads(line)["image"] for line in rest] == files[1:]


def test_a_reader_that_stops_early_ends_it_quietly(model, images):
    """`nfnet-zoo predict ... | head -1`: the closed pipe is the reader's choice, not an error."""
    proc = subprocess.Popen([sys.executable, "-m", "nfnet_zoo_cli", "predict", model, images, "-b", "1", "-j", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=SRC))
    assert proc.stdout.readline().strip() == _files(images)[0]
    proc.stdout.close()
    assert proc.wait(timeout=120) == 0
    assert proc.stderr.read() == ""


# --- datasets: a save_to_disk folder, parquet files in the Hub's layout ---------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory, images) -> tuple[Path, Path]:
    """The same rows twice: a save_to_disk DatasetDict (train: the 12 train files; validation: the 6 val files and a
    row without an image) and its parquet files in the Hub's layout (DIR/data/<split>-00000-of-00001.parquet)."""
    from datasets import Dataset, DatasetDict, Features, Image as HFImage, Value
    files = _files(images)
    features = Features({"image": HFImage(), "file": Value("string")})
    rows = lambda fs: {"image": [{"bytes": Path(f).read_bytes(), "path": None} if f else None for f in fs],
                       "file": [f or "" for f in fs]}
    ds = DatasetDict(train=Dataset.from_dict(rows(files[:12]), features=features),
                     validation=Dataset.from_dict(rows(files[12:] + [None]), features=features))
    root = tmp_path_factory.mktemp("datasets")
    ds.save_to_disk(str(root / "saved"))
    for split in ds:
        ds[split].to_parquet(str(root / "hub" / "data" / f"{split}-00000-of-00001.parquet"))
    return root / "saved", root / "hub"


def _dataset_reference(model: str, folder: Path, splits=("train", "validation")) -> list[dict]:
    """Each row of `folder` read by datasets and scored by timm on its eval transform: {"image": FOLDER/split/row,
    "probs"}, or {"image", "error"} for a row without an image."""
    from datasets import load_from_disk
    from timm.data import create_transform, resolve_data_config
    net = timm.create_model(f"local-dir:{model}", pretrained=True).eval()
    tf = create_transform(**resolve_data_config(model=net, use_test_size=True))
    loaded, out = load_from_disk(str(folder)), []
    for split in splits:
        for i, row in enumerate(loaded[split]):
            name = f"{folder}/{split}/{i}"
            if row["image"] is None:
                out.append({"image": name, "error": True})
                continue
            with torch.no_grad():
                out.append({"image": name, "probs": net(tf(row["image"].convert("RGB"))[None]).softmax(1)[0]})
    return out


def _matches(got: list[dict], want: list[dict], renamed: tuple = ("", "")) -> None:
    """The same rows (their names with renamed[0] replaced by renamed[1]), errors, labels and probabilities."""
    assert [r["image"] for r in got] == [w["image"].replace(*map(str, renamed)) for w in want]
    for r, w in zip(got, want):
        assert ("error" in r) == ("error" in w), r
        if "error" in w:
            continue
        assert [q["index"] for q in r["predictions"]] == w["probs"].argsort(descending=True).tolist()
        assert [q["probability"] for q in r["predictions"]] == pytest.approx(
            [w["probs"][q["index"]].item() for q in r["predictions"]], abs=1e-5)


def test_a_dataset_is_the_image_of_each_row_split_by_split(model, saved, capsys, monkeypatch):
    folder, hub = saved
    want = _dataset_reference(model, folder)
    code, out, err = _cli(["predict", model, folder, "--jsonl", "-j", "0", "-b", "4"], capsys, monkeypatch)
    assert code == 1 and "1 of 19 images could not be read" in err  # the row without an image
    _matches(_lines(out), want)
    assert "no image" in _lines(out)[-1]["error"]
    # the same rows as parquet files in the Hub's layout (read by datasets.load_dataset), with workers
    code, out, _ = _cli(["predict", model, hub, "--jsonl", "-j", "1", "-b", "5"], capsys, monkeypatch)
    _matches(_lines(out), want, renamed=(folder, hub))
    # --split chooses; a parquet file is a dataset of one (train) split
    code, out, _ = _cli(["predict", model, folder, "--split", "validation", "--csv", "-j", "0"], capsys, monkeypatch)
    names = [row[0] for row in csv.reader(io.StringIO(out))][1:]
    assert names == [f"{folder}/validation/{i}" for i in range(7)]
    parquet = hub / "data" / "train-00000-of-00001.parquet"
    code, out, _ = _cli(["predict", model, parquet, "--jsonl", "-j", "0"], capsys, monkeypatch)
    _matches(_lines(out), [w for w in want if "/train/" in w["image"]], renamed=(folder, parquet))


@pytest.mark.parametrize("args, words", [
    (["--split", "test"], "has no split 'test'; its splits are train, validation"),
    (["--input-key", "file"], "--input-key file is not an Image column"),
])
def test_a_bad_split_or_column_is_one_line_before_the_model_loads(saved, capsys, monkeypatch, args, words):
    code, out, err = _cli(["predict", "no-such-model", saved[0], *args], capsys, monkeypatch)
    assert code == 2 and out == "" and words in err and err.count("\n") == 1, err


class _Mean(torch.nn.Module):
    """A classifier of the mean colour, for a test of the data stream where a network's cost would only add time."""

    num_classes = 3
    pretrained_cfg = {"label_names": CLASSES, "input_size": (3, 8, 8), "crop_pct": 1.0}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3))


def test_a_large_dataset_is_streamed_with_a_bounded_number_of_decoded_images(tmp_path, monkeypatch):
    """1,000 rows, batches of 4: the images alive at once (counted by a finalizer on each decoded image) stay within a
    batch, and the first results come before the 5th image is decoded."""
    import weakref
    from datasets import Dataset, Features, Image as HFImage
    from nfnet_zoo.data import image_paths, samples
    b = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(b, "PNG")
    Dataset.from_dict({"image": [{"bytes": b.getvalue(), "path": None}] * 1000},
                      features=Features({"image": HFImage()})).save_to_disk(str(tmp_path / "big"))
    count = {"alive": 0, "most": 0, "decoded": 0}

    def gone():
        count["alive"] -= 1

    raw = samples._Opener.raw

    def counted(self, key):
        img = raw(self, key)
        count["alive"] += 1
        count["decoded"] += 1
        count["most"] = max(count["most"], count["alive"])
        weakref.finalize(img, gone)
        return img
    monkeypatch.setattr(samples._Opener, "raw", counted)
    results = iter_predictions(_Mean(), image_paths([tmp_path / "big"]), topk=1, batch_size=4, workers=0)
    first = next(results)
    assert first["image"] == f"{tmp_path / 'big'}/0" and count["decoded"] <= 4
    rest = list(results)
    assert len(rest) == 999 and count["decoded"] == 1000 and rest[-1]["image"] == f"{tmp_path / 'big'}/999"
    assert rest[-1]["predictions"][0]["label"] == "bright"  # the red channel: index 0
    assert count["most"] <= 4 and count["alive"] == 0
