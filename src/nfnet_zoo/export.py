"""`nfnet-zoo export`: a trained model as an ONNX file (or TorchScript) that runs without nfnet-zoo.

Each weight-standardised convolution is folded into a plain convolution first: ours by
`standardize_once` (the speed path's copy: the same standardised weights, computed once), timm's
`ScaledStdConv2d(Same)` by its own formula. The file then holds plain Conv nodes whose weights are
initializers, and no weight-standardisation ops (mean, variance, rsqrt of weights) run per call. Our
NFNet's scalar multipliers (gamma, beta, alpha * skip gain) are folded into the convolutions after them.

The ONNX graph comes from `torch.onnx.export(dynamo=True)`: on nfnet_f0 (batch 8, 256 px) onnxruntime ran it
at 2.4x timm's eager speed, the TorchScript exporter's graph at 1.85x (each against timm in the same process, on
2 busy cores): that exporter writes the tanh-GELU as 8 nodes and SAME padding as shape arithmetic, Pad and Cast
nodes computed at run time, where dynamo gives one Gelu node (opset 20) and constant padding. The batch
size is dynamic; the image size is fixed (the model's evaluation size unless asked), so SAME padding is
constants. The preprocessing a caller must apply (size, crop, interpolation, mean, std) and the class
names are in the file's metadata_props.
"""
from __future__ import annotations

import copy
import io
import json
import os
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .errors import NFNetZooError
from .evaluation import model_label_names
from .files import write_bytes_atomic
from .models.inference import standardize_once
from .models.load import load_model

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
MARK = "nfnet_zoo.exported_from"  # metadata key (ONNX) / extra file (TorchScript), the architecture: marks our files


class _FoldedConv2d(nn.Conv2d):
    """A timm `ScaledStdConv2d(Same)` with its standardised weight computed once, padding as it pads."""

    def __init__(self, conv: nn.Conv2d, weight: torch.Tensor):
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         conv.dilation, conv.groups, conv.bias is not None, device=weight.device, dtype=weight.dtype)
        self.same_pad = bool(getattr(conv, "same_pad", False))
        with torch.no_grad():
            self.weight.copy_(weight)
            if conv.bias is not None:
                self.bias.copy_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same_pad:
            from timm.layers.padding import pad_same
            x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


@torch.no_grad()
def _timm_standardized_weight(conv: nn.Conv2d) -> torch.Tensor:
    # timm's ScaledStdConv2d.forward, the weight half (timm/layers/std_conv.py)
    return F.batch_norm(conv.weight.reshape(1, conv.out_channels, -1), None, None,
                        weight=(conv.gain * conv.scale).view(-1), training=True, momentum=0.0,
                        eps=conv.eps).reshape_as(conv.weight)


@torch.no_grad()
def _scaled_conv(conv: nn.Module, by: float) -> nn.Module:
    """A copy of `conv` (a convolution, or the shortcut's pool + convolution) that computes `conv(by * x)`: its
    weight times `by` (zero padding and average pooling before it are linear, so they commute)."""
    new = copy.deepcopy(conv)  # the served copy shares biases and SE weights with the model: never scale those
    (new.conv if hasattr(new, "conv") else new).weight.mul_(by)
    return new


class _FoldedBlock(nn.Module):
    """An `NFBlock` for serving, its scalar multipliers folded into the convolutions after them: gamma * beta
    into conv1 and the shortcut's conv, each gamma into its conv, and c = alpha * skip_gain * 2 (the SE gate's
    2) into conv3's weight and bias, divided back out of the SE's first layer (linear in its input), so that
    h + alpha * skip_gain * 2 sigmoid(SE(o)) * o = h + sigmoid(SE'(c o)) * (c o). Each multiply is a pass over
    an activation; onnxruntime does not fuse them into its convolutions (1.1-1.2x on nfnet_f0, BENCHMARKS.md)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        c = block.alpha * float(block.skipinit_gain.detach()) * 2.0
        self.branch = c != 0.0  # a switched-off branch (SkipInit at 0) adds exactly nothing
        self.act1, self.act2, self.act3 = block.act1.act, block.act2.act, block.act3.act
        g1 = block.act1.gamma * block.beta
        self.downsample = None if block.downsample is None else _scaled_conv(block.downsample, g1)
        self.conv1 = _scaled_conv(block.conv1, g1)
        self.conv2 = _scaled_conv(block.conv2, block.act2.gamma)
        self.act2b = block.act2b.act if block.conv2b is not None else None
        self.conv2b = _scaled_conv(block.conv2b, block.act2b.gamma) if block.conv2b is not None else None
        if self.branch:
            self.conv3 = _scaled_conv(block.conv3, block.act3.gamma * c)
            with torch.no_grad():
                self.conv3.bias.mul_(c)
            self.fc1 = _scaled_conv(block.attn_last.fc1, 1.0 / c)
            self.fc2 = block.attn_last.fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(x)
        shortcut = x if self.downsample is None else self.downsample(out)
        if not self.branch:
            return shortcut
        out = self.conv2(self.act2(self.conv1(out)))
        if self.conv2b is not None and self.act2b is not None:
            out = self.conv2b(self.act2b(out))
        out = self.conv3(self.act3(out))
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(out.mean((2, 3), keepdim=True)))))
        return shortcut + gate * out


def _fold_scales(served: nn.Module) -> None:
    """Our NFNet's scalar multipliers folded into convolutions (`_FoldedBlock`; the stem's gammas into the
    conv after each), in place on the served copy. Exact in real numbers; in float32 within rounding."""
    from .models.layers import GammaAct
    from .models.nfnet import NFBlock
    for parent in list(served.modules()):
        for name, child in parent.named_children():
            if isinstance(child, NFBlock) and isinstance(child.act1, GammaAct):
                setattr(parent, name, _FoldedBlock(child))
        if isinstance(parent, nn.Sequential):
            names = list(parent._modules)
            for a, b in zip(names, names[1:]):
                act, conv = parent._modules[a], parent._modules[b]
                if isinstance(act, GammaAct) and isinstance(conv, nn.Conv2d):
                    parent._modules[b] = _scaled_conv(conv, act.gamma)
                    parent._modules[a] = act.act


def fold_standardization(model: nn.Module) -> nn.Module:
    """A copy of `model` (eval, float32) in which every weight-standardised convolution is a plain one holding
    its standardised weight: ours by `standardize_once`, timm's `ScaledStdConv2d(Same)` here."""
    from timm.layers import ScaledStdConv2d, ScaledStdConv2dSame
    served = standardize_once(model.float().eval())
    for parent in list(served.modules()):
        for name, child in parent.named_children():
            if isinstance(child, (ScaledStdConv2d, ScaledStdConv2dSame)):
                setattr(parent, name, _FoldedConv2d(child, _timm_standardized_weight(child)))
    _fold_scales(served)
    return served.requires_grad_(False)


def preprocessing(model: nn.Module, size: Optional[int] = None) -> dict:
    """What a caller feeds the exported model: timm's evaluation config (what `predict` uses), at `size`."""
    from timm.data import resolve_data_config
    cfg = resolve_data_config(model=model, use_test_size=True)
    channels, height, width = cfg["input_size"]
    if size is not None:
        height = width = size
    return dict(input_size=[channels, height, width], interpolation=cfg["interpolation"],
                crop_pct=cfg["crop_pct"], crop_mode=cfg["crop_mode"], mean=list(cfg["mean"]), std=list(cfg["std"]))


def _ours(path: Path) -> bool:
    """True when `path` is a file this command wrote (its metadata carries MARK)."""
    try:
        if path.suffix == ".onnx":
            import onnx
            return any(p.key == MARK for p in onnx.load(str(path), load_external_data=False).metadata_props)
        import zipfile  # a TorchScript file is a zip archive; its extra files are members
        with zipfile.ZipFile(path) as z:
            return any(n.endswith(f"/extra/{MARK}") for n in z.namelist())
    except Exception:  # noqa: BLE001 - any file that does not parse as ours is not ours
        return False


def _output(spec: str, output: Optional[str], fmt: str, overwrite: bool) -> Path:
    if fmt not in FORMATS:
        raise NFNetZooError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if output is None:
        folder = Path(spec[len("local-dir:"):] if spec.startswith("local-dir:") else spec).expanduser()
        if not folder.is_dir():
            looks_like_path = spec.startswith(("local-dir:", ".")) or os.sep in spec
            problem = "does not exist" if looks_like_path and not folder.exists() else "is not a folder"
            raise NFNetZooError(f"{spec} {problem}, so there is no default output file; pass a run folder, or "
                                f"--output FILE{FORMATS[fmt]}")
        out = folder / f"model{FORMATS[fmt]}"
    else:
        out = Path(output).expanduser()
    if out.is_dir():
        raise NFNetZooError(f"--output {out} is a folder; pass a file name such as {out / ('model' + FORMATS[fmt])}")
    if out.exists() and not overwrite and not _ours(out):
        raise NFNetZooError(f"{out} exists and was not written by nfnet-zoo export; pass --overwrite to replace it, "
                            f"or another --output")
    parent = next((p for p in out.absolute().parents if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise NFNetZooError(f"cannot write {out}: {parent} is not a writable folder; pass another --output")
    return out


def onnx_bytes(served: nn.Module, x: torch.Tensor, metadata: dict) -> bytes:
    """`served` (folded) as an ONNX model with input `image` shaped as `x` (any batch size), `metadata` in its
    metadata_props."""
    import warnings
    from importlib.util import find_spec
    missing = [name for name in ("onnx", "onnxscript") if find_spec(name) is None]  # onnxscript: the dynamo exporter's
    if missing:
        raise NFNetZooError(f"export to ONNX needs the onnx extra ({missing[0]} is missing); pip install "
                            f"'nfnet-zoo[onnx]'")
    import onnx
    with warnings.catch_warnings():  # the exporter's notes on its own internals: nothing for the user to act on
        warnings.simplefilter("ignore")
        program = torch.onnx.export(served, (x,), dynamo=True, input_names=["image"], output_names=["logits"],
                                    dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    proto = program.model_proto
    onnx.helper.set_model_props(proto, metadata)
    return proto.SerializeToString()


def _torchscript_bytes(served: nn.Module, x: torch.Tensor, metadata: dict) -> bytes:
    import warnings
    with warnings.catch_warnings():  # TorchScript is deprecated in torch 2.14: it still traces and loads
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(served, (x,), check_trace=False)
        buf = io.BytesIO()
        torch.jit.save(traced, buf, _extra_files={k: v.encode() for k, v in metadata.items()})
    return buf.getvalue()


def export_model(spec: str, output: Optional[str] = None, fmt: str = "onnx", size: Optional[int] = None,
           overwrite: bool = False) -> Path:
    """Write MODEL (a run folder, `local-dir:`, `hf-hub:` or a registered name, as `load_model` reads it) as
    an ONNX (or TorchScript) file with folded weight standardisation and a dynamic batch size; returns its path.

    `output` defaults to MODEL/model.onnx (model.pt) for a folder. A file there that this command did not write
    is replaced only with `overwrite`. The input is `image`, float32 N x 3 x H x W, preprocessed as the
    metadata says (`preprocessing`); the output `logits`, N x classes.
    """
    out = _output(spec, output, fmt, overwrite)
    model = load_model(spec)
    prep = preprocessing(model, size)
    served = fold_standardization(model)
    x = torch.randn(2, *prep["input_size"])  # batch 2: a batch of 1 would be specialised as a constant
    names = model_label_names(model)
    arch = model.pretrained_cfg.get("architecture") or type(model).__name__
    metadata = {MARK: arch, "preprocessing": json.dumps(prep), "num_classes": str(model.num_classes)}
    if names:
        metadata["label_names"] = json.dumps(names)
    try:
        data = (onnx_bytes if fmt == "onnx" else _torchscript_bytes)(served, x, metadata)
    except NFNetZooError:
        raise
    except Exception as e:  # noqa: BLE001 - the exporters raise many types on a layer they cannot express
        first = str(e).splitlines()[0][:120] if str(e) else ""
        raise NFNetZooError(f"{fmt} export of {arch} failed ({type(e).__name__}: {first}); "
                            f"use the model from Python (nfnet_zoo.load_model), or try --format "
                            f"{'torchscript' if fmt == 'onnx' else 'onnx'}") from None
    write_bytes_atomic(out, data)
    return out


__all__ = ["export_model", "fold_standardization", "onnx_bytes", "preprocessing", "FORMATS"]
