"""`nfnet-zoo evaluate` (top-1, top-5, per-class accuracy) and `nfnet-zoo predict` (top-k labels).

MODEL is a run folder (or any folder with model.safetensors + config.json), a `local-dir:` or
`hf-hub:` name, or a registered name such as `nfnet_f0` (its pretrained weights). Preprocessing is
the model's own evaluation config (for NFNets: DeepMind's, at the variant's test size).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import torch
from torch import nn

from .data import ImageDataset, ImageFiles, Row, collate_image_files, load_eval_samples, run_held_out
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


def per_class_accuracy(hit: torch.Tensor, target: torch.Tensor, labels: dict[str, int]) -> dict[str, dict]:
    """{class name: {"accuracy" (%), "count"}} from per-sample top-1 hits and targets; `labels` maps each class name
    to its target index. A class without images is left out (a held-out split may lack one)."""
    out = {}
    for name, index in labels.items():
        mask = target == index
        if mask.any():
            out[name] = {"accuracy": 100 * hit[mask].float().mean().item(), "count": int(mask.sum())}
    return out


def class_probabilities(net: nn.Module, x: torch.Tensor, tta: bool = False) -> torch.Tensor:
    """Softmax over the classes (float32); with `tta`, the mean of the image's and its horizontal mirror's.
    Probabilities, not logits, are averaged: each view's vote counts as the probability it reports (averaging
    logits would be a geometric mean, where one over-confident view outweighs the other), and it is the
    probability `predict` prints."""
    p = net(x).float().softmax(1)
    if tta:
        p = (p + net(x.flip(3)).float().softmax(1)) / 2
    return p


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --- evaluate ----------------------------------------------------------------------------------
def evaluate(model: str, data_dir: str | os.PathLike, batch_size: int = 64, workers: int = 4,
             bad_images: str = "skip", check_images: str = "full", input_key: Optional[str] = None,
             target_key: Optional[str] = None, tta: bool = False) -> dict:
    """Top-1, top-5 (%) and per-class accuracy of MODEL on the images of `data_dir`.

    Folder classes are matched to the model's classes by name; all of the model's classes compete
    (so a folder may hold a subset of them). When MODEL is a run folder and `data_dir` the data it
    was trained on, only the run's held-out split (RUN/data.json) is scored, and `split` says so.
    `input_key`, `target_key`: the image and label columns of a table or dataset source. `tta`: score each image by
    the mean of its and its horizontal mirror's class probabilities (`class_probabilities`)."""
    net = load_model(model)
    names = model_label_names(net)
    run = Path(model).expanduser()
    held = run_held_out(run / "data.json", data_dir, bad_images, workers, check_images) if run.is_dir() else None
    data = held or load_eval_samples(data_dir, bad_images, workers, check_images, input_key, target_key)
    split = (f"the run's held-out split: {data.num_val} images listed in {run / 'data.json'} (the others in "
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
    if data.shards:  # streamed: each sample once, a bad image skipped (with a warning) or refused
        from .data.shards import ShardStream
        dataset = ShardStream(data, "val", _eval_transform(net), bad_images=bad_images, label_map=to_model)
    else:
        dataset = ImageDataset([(k, to_model[lab]) for k, lab in data.val], data.opener(), _eval_transform(net))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    device = _device()
    net.to(device)
    k5 = min(5, net.num_classes)
    correct1, correct5, targets = [], [], []
    with torch.inference_mode():
        for x, y in loader:
            c1, c5 = topk_correct(class_probabilities(net, x.to(device), tta).cpu(), y, (1, k5))
            correct1.append(c1)
            correct5.append(c5)
            targets.append(y)
    c1, c5, t = torch.cat(correct1), torch.cat(correct5), torch.cat(targets)
    per_class = per_class_accuracy(c1, t, {c: to_model[i] for i, c in enumerate(data.classes)})
    return {"model": model, "data_dir": str(data_dir), "split": split, "tta": tta, "num_images": len(t),
            "skipped": len(data.skipped),
            "top1": 100 * c1.float().mean().item(), "top5": 100 * c5.float().mean().item(), "per_class": per_class}


def format_evaluation(result: dict) -> str:
    width = max(len("class"), *(len(c) for c in result["per_class"]))
    rows = [f"{result['model']} on {result['data_dir']}: {result['num_images']} images",
            f"evaluated on {result['split']}" + (", each image with its mirror (--tta)" if result.get("tta") else ""),
            f"top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%", "",
            f"{'class'.ljust(width)}  {'images':>6}  {'top-1':>7}"]
    rows += [f"{c.ljust(width)}  {r['count']:>6}  {r['accuracy']:>6.2f}%" for c, r in result["per_class"].items()]
    return "\n".join(rows)


# --- predict -----------------------------------------------------------------------------------
def prediction_labels(model: nn.Module) -> list[str]:
    """The label `predict` shows for each class: ImageNet's descriptions, the config's names, or the index."""
    return _label_descriptions(model) or model_label_names(model) or [str(i) for i in range(model.num_classes)]


def iter_predictions(model: str | nn.Module, images: Iterable[str | os.PathLike], topk: int = 5,
                     batch_size: int = 32, workers: int = 0, tta: bool = False) -> Iterator[dict]:
    """Top-k labels with probabilities for each image, in order, yielded batch by batch as they are scored:
    {"image", "predictions": [{"label", "index", "probability"}]}, or {"image", "error"} for a file that cannot be
    read as an image (the others are scored). `images` is read lazily, as the batches need it (a stream of paths
    works, and `data.image_paths` gives dataset rows too, each named INPUT/split/row); at most `batch_size` x
    (1 + 2 x `workers`) images are decoded at a time. MODEL is loaded at the first `next()`; pass a loaded model to
    load it once for several calls. `tta`: each probability is the mean of the image's and its horizontal mirror's
    (`class_probabilities`)."""
    net = load_model(model) if isinstance(model, (str, os.PathLike)) else model
    names = prediction_labels(net)
    items = (i if isinstance(i, Row) else os.fspath(i) for i in images)
    files = ImageFiles(_eval_transform(net), getattr(images, "openers", ()))  # the datasets' openers, if any
    loader = torch.utils.data.DataLoader(files, sampler=items, batch_size=batch_size, num_workers=workers,
                                         collate_fn=collate_image_files)
    device = _device()
    net.to(device).eval()
    k = min(topk, net.num_classes)
    with torch.inference_mode():
        for paths, x, errors in loader:
            if x is not None:
                prob, idx = class_probabilities(net, x.to(device), tta).topk(k, dim=1)
                scored = iter(zip(prob.tolist(), idx.tolist()))
            for path, error in zip(paths, errors):
                if error is not None:
                    yield {"image": path, "error": error}
                    continue
                ps, ids = next(scored)
                yield {"image": path, "predictions": [
                    {"label": names[j], "index": j, "probability": p} for p, j in zip(ps, ids)]}


def predict(model: str, images: Sequence[str | os.PathLike], topk: int = 5, tta: bool = False) -> list[dict]:
    """Top-k labels with probabilities for each image: [{"image", "predictions": [{"label", "probability"}]}].

    A missing file is refused before the model is loaded, and a file that is not a readable image stops it with an
    NFNetZooError; `iter_predictions` streams instead, and reports such files in their entry."""
    for path in images:
        if not os.path.lexists(path):
            raise NFNetZooError(f"image {path} does not exist")
    results = []
    for r in iter_predictions(model, images, topk, tta=tta):
        if "error" in r:
            raise NFNetZooError(f"{r['image']}: {r['error']}; pass an image file")
        results.append(r)
    return results


def format_prediction(result: dict) -> str:
    """One image's entry as text: its path, then a line per label (or its error)."""
    if "error" in result:
        return f"{result['image']}\n  error: {result['error']}"
    return "\n".join([result["image"], *(f"  {p['probability']:7.2%}  {p['label']}" for p in result["predictions"])])


def format_predictions(results: list[dict]) -> str:
    return "\n".join(format_prediction(r) for r in results)


def csv_row(result: dict, k: int) -> list:
    """One image's CSV row: image, label_1, prob_1, ... label_k, prob_k, error (empty where it does not apply)."""
    cells = [result["image"]]
    for p in result.get("predictions", []):
        cells += [p["label"], p["probability"]]
    return cells + [""] * (1 + 2 * k - len(cells)) + [result.get("error", "")]


def csv_header(k: int) -> list[str]:
    return ["image", *(f"{c}_{i}" for i in range(1, k + 1) for c in ("label", "prob")), "error"]


__all__ = ["evaluate", "predict", "iter_predictions", "prediction_labels", "format_prediction", "csv_row", "csv_header", "model_label_names", "topk_correct", "class_probabilities", "per_class_accuracy", "format_evaluation", "format_predictions"]
