"""`nfnet-zoo export`: ONNX (and TorchScript) files with the weight standardisation folded away.

References: onnxruntime running the file (against the eager model and against `nfnet-zoo predict`), the `onnx`
package reading its graph, timm's `create_transform` built from the file's own metadata, torch.jit.load, and
timm's own `ScaledStdConv2d` network for the fold of timm's layers.

Tolerance: onnxruntime's convolutions (MLAS) sum in another order than PyTorch's (oneDNN), so the logits agree to
float32 rounding (about 1e-7 of their size here), not bit for bit: atol 1e-5.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import timm
import torch
from PIL import Image

from _images import make_folder
from _tiny_nfnet import model_folder
from nfnet_zoo.evaluation import predict
from nfnet_zoo.export import fold_standardization
from nfnet_zoo.models.load import load_model
from nfnet_zoo_cli import main as cli_main

CLASSES = ["bright", "dark", "mid"]
ATOL = 1e-5


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A randomly initialised nfnet_zoo_tiny (residual branches on) as a run's model folder, 32 px evaluation."""
    return Path(model_folder(tmp_path_factory.mktemp("run") / "tiny", CLASSES))


@pytest.fixture(scope="module")
def exported(run) -> Path:
    assert cli_main(["export", str(run)]) == 0
    return run / "model.onnx"


def _session(path: Path) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _eager(run: Path, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return load_model(str(run))(x).numpy()


def test_onnxruntime_gives_the_eager_logits_at_batch_1_and_5_from_one_file(run, exported):
    session = _session(exported)
    batch = session.get_inputs()[0].shape[0]
    assert isinstance(batch, str)  # a named, dynamic dimension
    for n in (1, 5):
        x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(n))
        (logits,) = session.run(None, {"image": x.numpy()})
        assert logits.shape == (n, 3)
        np.testing.assert_allclose(logits, _eager(run, x), rtol=0, atol=ATOL)


def test_the_graph_holds_plain_convolutions_and_no_weight_standardisation(exported):
    graph = onnx.load(str(exported)).graph
    weights = {t.name for t in graph.initializer}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert convs and all(n.input[1] in weights for n in convs)  # each conv reads a stored, folded weight
    # every node computes on the image: none computes on weights alone (the standardisation's mean, var, rsqrt)
    from_image = {graph.input[0].name}
    for node in graph.node:  # ONNX nodes are in topological order
        assert any(i in from_image for i in node.input), f"{node.op_type} {node.name} runs on weights only"
        from_image.update(node.output)
    assert not {"Sqrt", "Reciprocal", "Div", "BatchNormalization"} & {n.op_type for n in graph.node}


def test_predict_and_the_file_fed_as_its_metadata_says_give_the_same_probabilities(run, exported, tmp_path):
    from timm.data import create_transform
    meta = {p.key: p.value for p in onnx.load(str(exported)).metadata_props}
    prep = json.loads(meta["preprocessing"])
    assert json.loads(meta["label_names"]) == CLASSES and meta["num_classes"] == "3"
    root = make_folder(tmp_path / "shapes", n_train=2, n_val=0, split=False)
    files = sorted(str(p) for p in root.rglob("*.png"))
    tf = create_transform(input_size=tuple(prep["input_size"]), interpolation=prep["interpolation"],
                          crop_pct=prep["crop_pct"], crop_mode=prep["crop_mode"], mean=prep["mean"], std=prep["std"])
    x = np.stack([tf(Image.open(f).convert("RGB")).numpy() for f in files])
    (logits,) = _session(exported).run(None, {"image": x})
    probs = torch.from_numpy(logits).softmax(1)
    for r, p in zip(predict(str(run), files, topk=3), probs):
        assert [q["label"] for q in r["predictions"]] == [CLASSES[i] for i in p.argsort(descending=True)]
        assert [q["probability"] for q in r["predictions"]] == pytest.approx(p.sort(descending=True).values.tolist(),
                                                                             abs=1e-6)


def test_an_odd_image_size_and_torchscript(run, tmp_path):
    odd = tmp_path / "odd.onnx"
    assert cli_main(["export", str(run), "--image-size", "33", "-o", str(odd)]) == 0
    x = torch.randn(3, 3, 33, 33, generator=torch.Generator().manual_seed(3))
    (logits,) = _session(odd).run(None, {"image": x.numpy()})
    np.testing.assert_allclose(logits, _eager(run, x), rtol=0, atol=ATOL)

    assert cli_main(["export", str(run), "--format", "torchscript"]) == 0
    scripted = torch.jit.load(str(run / "model.pt"))
    for n in (1, 5):
        x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            np.testing.assert_allclose(scripted(x).numpy(), _eager(run, x), rtol=0, atol=ATOL)
    (run / "model.pt").unlink()


def test_timm_scaled_std_convs_are_folded_too():
    """timm's own NFNet layers (`ScaledStdConv2d`, and `ScaledStdConv2dSame` as in its dm_nfnet_*) fold to the
    network's own outputs."""
    from dataclasses import replace

    from timm.layers import ScaledStdConv2d, ScaledStdConv2dSame
    from timm.models.nfnet import NfCfg, NormFreeNet
    cfg = NfCfg(depths=(1, 1, 1, 1), channels=(16, 32, 32, 32), stem_chs=16, stem_type="deep_quad", group_size=8,
                act_layer="gelu", attn_layer="se", attn_kwargs=dict(rd_ratio=0.5), skipinit=True,
                gamma_in_act=True)
    for same in (False, True):
        torch.manual_seed(0)
        net = NormFreeNet(replace(cfg, same_padding=same), num_classes=4).eval()
        with torch.no_grad():
            for n, p in net.named_parameters():
                if n.endswith("skipinit_gain"):
                    p.fill_(0.5)
                elif n.endswith(".gain"):
                    p.mul_(1 + 0.2 * torch.randn_like(p))
        kind = ScaledStdConv2dSame if same else ScaledStdConv2d
        assert any(type(m) is kind for m in net.modules())
        folded = fold_standardization(net)
        assert not any(isinstance(m, (ScaledStdConv2d, ScaledStdConv2dSame)) for m in folded.modules())
        x = torch.randn(2, 3, 35, 35)
        with torch.no_grad():
            torch.testing.assert_close(folded(x), net(x), rtol=0, atol=1e-6)


def test_refusals_are_one_line_and_a_users_file_is_kept(run, exported, tmp_path, capsys):
    def refused(args: list) -> str:
        try:
            code = cli_main([str(a) for a in args])
        except SystemExit as e:  # argparse's refusals
            code = e.code
        assert code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        return err

    assert "does not exist" in refused(["export", tmp_path / "nope"])
    assert "--output" in refused(["export", "nfnet_f0"])  # a name: no folder to write into by default
    assert "invalid choice" in refused(["export", run, "--format", "tflite"])
    assert "[1, 4096]" in refused(["export", run, "--image-size", "0"])
    users = tmp_path / "mine.onnx"
    users.write_bytes(b"the user's own file")
    assert "--overwrite" in refused(["export", run, "-o", users])
    assert users.read_bytes() == b"the user's own file"
    assert "not a writable folder" in refused(["export", run, "-o", users / "x.onnx"])
    assert "is a folder" in refused(["export", run, "-o", tmp_path])
    ours = tmp_path / "ours.onnx"
    ours.write_bytes(exported.read_bytes())
    assert cli_main(["export", str(run), "-o", str(ours), "--image-size", "40"]) == 0  # its own file: replaced
    assert _session(ours).get_inputs()[0].shape[1:] == [3, 40, 40]
    assert cli_main(["export", str(run), "-o", str(users), "--overwrite"]) == 0
    assert _session(users).get_inputs()[0].name == "image"


def test_the_fold_leaves_the_model_as_it_was_and_gives_its_logits_with_branches_on_and_off():
    """The served copy shares biases and SE weights with the model: folding scales copies, never the model's own.
    A block whose SkipInit gain is still 0 adds nothing, folded or not."""
    torch.manual_seed(0)
    net = timm.create_model("nfnet_zoo_tiny", num_classes=3).eval()
    with torch.no_grad():
        net.stages[1][0].skipinit_gain.fill_(-0.7)  # one branch on (a negative gain too), the others at 0
    before = {k: v.clone() for k, v in net.state_dict().items()}
    folded = fold_standardization(net)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    x = torch.randn(3, 3, 29, 29)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), rtol=0, atol=1e-6)


def test_a_model_the_exporter_cannot_express_is_one_line(run, tmp_path, capsys, monkeypatch):
    import nfnet_zoo.export as export

    def fails(*args):
        raise RuntimeError("Unsupported: data-dependent control flow\nmore detail")

    monkeypatch.setattr(export, "onnx_bytes", fails)
    assert cli_main(["export", str(run), "-o", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data-dependent control flow" in err and "--format torchscript" in err
    assert not (tmp_path / "m.onnx").exists()
