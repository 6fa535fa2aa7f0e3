"""`nfnet-zoo evaluate` (top-1, top-5, per-class accuracy) and `nfnet-zoo predict` (top-k labels).

MODEL is a run folder (or any folder with model.safetensors + config.json), a `local-dir:` or
`hf-hub:` name, or a registered name such as `nfnet_f0` (its pretrained weights). Preprocessing is
the model's own evaluation config (for NFNets: DeepMind's, at the variant's test size).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch
from PIL import Image
from torch import nn

from .data import ImageDataset, load_eval_samples, run_held_out, to_rgb
from .errors import NFNetZooError
from .models.load import load_model


def model_label_names(model: nn.Module) -> Optional[list[str]]:
    """Class names in classifier order: the config's label_names, or ImageNet's for ImageNet heads."""
    names = model.pretrained_cfg.get("label_names")
    if names:
        return [names[str(i)] if isinstance(names, dict) else names[i] for i in range(len(names))]
    from timm.data import ImageNetInfo, infer_imagenet_subset
    subset = infer_imagenet_subset(model)
    return ImageNetInfo(subset).label_names() if subset else None


def _label_descriptions(model: nn.Module) -> Optional[list[str]]:
    from timm.data import ImageNetInfo, infer_imagenet_subset
    if model.pretrained_cfg.get("label_names"):
        return None
    subset = infer_imagenet_subset(model)
    return ImageNetInfo(subset).label_descriptions() if subset else None


def _eval_transform(model: nn.Module):
    from timm.data import create_transform, resolve_data_config
    return create_transform(**resolve_data_config(model=model, use_test_size=True))


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: Sequence[int]) -> list[torch.Tensor]:
    """Per-sample booleans: is the target among the top-k logits, for each k."""
    top = logits.topk(max(ks), dim=1).indices
    hit = top == target[:, None]
    return [hit[:, :k].any(1) for k in ks]


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --- evaluate ----------------------------------------------------------------------------------
def evaluate(model: str, data_dir: str | os.PathLike, batch_size: int = 64, workers: int = 4,
             bad_images: str = "skip", check_images: str = "full", input_key: Optional[str] = None,
             target_key: Optional[str] = None) -> dict:
    """Top-1, top-5 (%) and per-class accuracy of MODEL on the images of `data_dir`.

    Folder classes are matched to the model's classes by name; all of the model's classes compete
    (so a folder may hold a subset of them). When MODEL is a run folder and `data_dir` the data it
    was trained on, only the run's held-out split (RUN/data.json) is scored, and `split` says so.
    `input_key`, `target_key`: the image and label columns of a table or dataset source."""
    net = load_model(model)
    names = model_label_names(net)
    run = Path(model).expanduser()
    held = run_held_out(run / "data.json", data_dir, bad_images, workers, check_images) if run.is_dir() else None
    data = held or load_eval_samples(data_dir, bad_images, workers, check_images, input_key, target_key)
    split = (f"the run's held-out split: {len(data.val)} images listed in {run / 'data.json'} (the others in "
             f"{data_dir} were trained on)" if held else f"all images of {data.root}")
    if names is None:
        if net.num_classes != len(data.classes):
            raise NFNetZooError(f"the model has {net.num_classes} classes and no class names; {data_dir} has "
                                f"{len(data.classes)} classes")
        warnings.warn("the model has no class names; assuming its classes are the folder names in timm's order")
        names = data.classes
    missing = [c for c in data.classes if c not in names]
    if missing:
        raise NFNetZooError(f"classes of {data_dir} that the model does not know: {', '.join(missing[:5])}"
                            f"{' ...' if len(missing) > 5 else ''} (model classes: {', '.join(names[:5])} ...); "
                            f"evaluate on a folder whose class folders are named like the model's classes")
    to_model = {i: names.index(c) for i, c in enumerate(data.classes)}
    samples = [(k, to_model[lab]) for k, lab in data.val]
    loader = torch.utils.data.DataLoader(ImageDataset(samples, data.opener(), _eval_transform(net)),
                                         batch_size=batch_size, num_workers=workers)
    device = _device()
    net.to(device)
    k5 = min(5, net.num_classes)
    correct1, correct5, targets = [], [], []
    with torch.inference_mode():
        for x, y in loader:
            c1, c5 = topk_correct(net(x.to(device)).float().cpu(), y, (1, k5))
            correct1.append(c1)
            correct5.append(c5)
            targets.append(y)
    c1, c5, t = torch.cat(correct1), torch.cat(correct5), torch.cat(targets)
    per_class = {}
    for i, c in enumerate(data.classes):
        mask = t == to_model[i]
        if mask.any():  # a run's held-out split may lack a class
            per_class[c] = {"accuracy": 100 * c1[mask].float().mean().item(), "count": int(mask.sum())}
    return {"model": model, "data_dir": str(data_dir), "split": split, "num_images": len(t),
            "skipped": len(data.skipped),
            "top1": 100 * c1.float().mean().item(), "top5": 100 * c5.float().mean().item(), "per_class": per_class}


def format_evaluation(result: dict) -> str:
    width = max(len("class"), *(len(c) for c in result["per_class"]))
    rows = [f"{result['model']} on {result['data_dir']}: {result['num_images']} images",
            f"evaluated on {result['split']}",
            f"top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%", "",
            f"{'class'.ljust(width)}  {'images':>6}  {'top-1':>7}"]
    rows += [f"{c.ljust(width)}  {r['count']:>6}  {r['accuracy']:>6.2f}%" for c, r in result["per_class"].items()]
    return "\n".join(rows)


# --- predict -----------------------------------------------------------------------------------
def predict(model: str, images: Sequence[str | os.PathLike], topk: int = 5) -> list[dict]:
    """Top-k labels with probabilities for each image: [{"image", "predictions": [{"label", "probability"}]}]."""
    pils = []
    for path in images:
        try:
            with Image.open(path) as img:
                img.load()
                pils.append(to_rgb(img))
        except FileNotFoundError:
            raise NFNetZooError(f"image {path} does not exist") from None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise NFNetZooError(f"cannot read image {path} ({str(e).splitlines()[0][:100]}); pass an image file") from None
    net = load_model(model)
    names = _label_descriptions(net) or model_label_names(net) or [str(i) for i in range(net.num_classes)]
    tf = _eval_transform(net)
    device = _device()
    net.to(device)
    k = min(topk, net.num_classes)
    results = []
    with torch.inference_mode():
        for i in range(0, len(pils), 32):
            x = torch.stack([tf(p) for p in pils[i:i + 32]]).to(device)
            prob, idx = net(x).float().softmax(1).topk(k, dim=1)
            for path, ps, ids in zip(images[i:i + 32], prob.tolist(), idx.tolist()):
                results.append({"image": str(path), "predictions": [
                    {"label": names[j], "index": j, "probability": p} for p, j in zip(ps, ids)]})
    return results


def format_predictions(results: list[dict]) -> str:
    rows = []
    for r in results:
        rows.append(r["image"])
        rows += [f"  {p['probability']:7.2%}  {p['label']}" for p in r["predictions"]]
    return "\n".join(rows)


__all__ = ["evaluate", "predict", "model_label_names", "topk_correct", "format_evaluation", "format_predictions"]
