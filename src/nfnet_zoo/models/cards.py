"""Model cards and Hub configs: the README.md and config.json a model repo on the Hub carries.

Cards are built with huggingface_hub's `ModelCard`/`ModelCardData` (the Hub's own YAML writer)
from real files only: a fine-tuning run folder (`build_model_card`), a converted DeepMind
checkpoint, or the variant table for the released zoo (`write_zoo_cards`). Parameter counts and
GMACs are measured, on the meta device so that even F6 costs no memory and about a second.
"""
from __future__ import annotations

import functools
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..files import CURVES, write_text_atomic
from ..errors import NFNetZooError
from .shared_config import exact_architecture, rewrite_shared, shared_form, timm_native
from .variants import DM_ACCURACY, ORIGIN, PAPER_NAME, RANDAUG_LEVEL, VARIANTS, list_pretrained_names

ZOO_NAMESPACE = "nfnet-zoo"  # where the project publishes its zoo; `nfnet-zoo cards --namespace` changes it
PAPER_URL = "https://arxiv.org/abs/2102.06171"
TAGS = ["image-classification", "timm", "nfnet", "nfnet-zoo"]
CITATION = """\
@article{brock2021high,
  title={High-Performance Large-Scale Image Recognition Without Normalization},
  author={Brock, Andrew and De, Soham and Smith, Samuel L and Simonyan, Karen},
  journal={arXiv preprint arXiv:2102.06171},
  year={2021}
}"""
_ARCH_SUMMARY = ("depths", "widths", "group_width", "se_ratio", "activation", "alpha")


# --- measurements --------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _measure(architecture: str, sizes: tuple[int, ...], model_args: str) -> tuple[int, tuple[float, ...]]:
    import timm
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = timm.create_model(architecture, pretrained=False, **json.loads(model_args)).eval()
    params = sum(p.numel() for p in model.parameters())
    gmacs = []
    for s in sizes:
        counter = FlopCounterMode(display=False)
        # Grad stays enabled: WSConv2d's no-grad eval cache keys on storage and autocast, which meta lacks.
        with counter:
            model(torch.empty(1, 3, s, s, device="meta"))
        gmacs.append(counter.get_total_flops() / 2e9)  # FlopCounterMode counts a multiply-add as 2 FLOPs
    return params, tuple(gmacs)


def measure_model(architecture: str, sizes: tuple[int, ...], **model_args: Any) -> tuple[int, tuple[float, ...]]:
    """Parameter count and GMACs (one per image size) of a registered model, measured on the meta device."""
    return _measure(architecture, tuple(sizes), json.dumps(model_args, sort_keys=True))


def _measure_config(path: Path, arch: str, sizes: tuple[int, ...], config: dict,
                    model_args: dict) -> tuple[int, tuple[float, ...]]:
    try:
        return measure_model(arch, sizes, num_classes=config["num_classes"], **model_args)
    except (RuntimeError, TypeError, ValueError, KeyError) as e:
        raise NFNetZooError(f"{path}: cannot build {arch!r} from its config ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); write it with timm.models.save_for_hf "
                            "after `import nfnet_zoo`") from None


# --- shared card parts ---------------------------------------------------------------------
def _card(data: ModelCardData, sections: list[str]) -> ModelCard:
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(s.strip("\n") for s in sections) + "\n")


def _table(rows: list[tuple[str, str]]) -> str:
    return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def _arch_line(name: str, model_args: dict) -> str:
    cfg = VARIANTS.get(name)
    if cfg is None:
        return f"`{name}`"
    fields = {k: model_args.get(k, getattr(cfg, k)) for k in _ARCH_SUMMARY}
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    return f"`{name}`: " + ", ".join(f"{k} {v}" for k, v in fields.items())


def _size(s: int) -> str:
    return f"{s} x {s}"


def _usage(source: str, labels: str, native: Optional[str]) -> str:
    """How to load the model: with plain timm and transformers where config.json names timm's own architecture
    (`native`), else (and for nfnet-zoo's exact network) with nfnet-zoo. The preprocessing is the evaluation's
    (config.json's input size is the evaluation size)."""
    hub = source.startswith("hf-hub:")
    if native:
        intro = (f"timm alone loads it (`pip install timm`), as transformers and the Hub's widget do: config.json "
                 f"names timm's own `{native}`, whose logits agree with nfnet-zoo's within about 3e-5 (timm computes "
                 "GELU exactly, DeepMind its tanh approximation).")
        first = "model = timm.create_model(\"{0}\", pretrained=True).eval()"
        exact = ("\n\nThe exact network it was trained as, with nfnet-zoo (`pip install nfnet-zoo`): "
                 f"`import nfnet_zoo` and `model = nfnet_zoo.load_model(\"{source}\")`, then as above.")
    else:
        intro = ("This architecture is nfnet-zoo's, not timm's: install nfnet-zoo (`pip install nfnet-zoo`) and "
                 "import it before loading; plain timm refuses the architecture's name.")
        first = "import nfnet_zoo  # registers the architecture with timm\nmodel = timm.create_model(\"{0}\", pretrained=True).eval()"
        exact = ""
    transformers = ""
    if hub:
        repo = source[len("hf-hub:"):]
        transformers = ("\n\nWith transformers" + ("" if native else ", after `import nfnet_zoo`") +
                        f": `pipeline(\"image-classification\", model=\"{repo}\")`, or "
                        f"`AutoModelForImageClassification.from_pretrained(\"{repo}\")` with "
                        f"`AutoImageProcessor.from_pretrained(\"{repo}\")`.")
    code = first.format(source if hub else f"local-dir:{source}")
    return f"""## Usage

{intro}

```python
import timm
import torch
from PIL import Image

{code}
transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))  # the evaluation's
image = Image.open("image.jpg").convert("RGB")
with torch.no_grad():
    probs = model(transform(image).unsqueeze(0)).softmax(dim=-1)[0]
{labels}
for p, i in zip(*probs.topk(min(5, probs.numel()))):
    print(f"{{labels[i]}}: {{p:.3f}}")
```{exact}{transformers}"""


def _citation() -> str:
    return f"## Citation\n\n```bibtex\n{CITATION}\n```"


def _read_json(path: Path, required: bool = False) -> Any:
    if not path.is_file():
        if required:
            raise NFNetZooError(f"{path} is missing; pass a folder written by `nfnet-zoo finetune` or "
                                "timm.models.save_for_hf")
        return None
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NFNetZooError(f"{path} is not valid JSON ({e}); restore it or re-run the step that wrote it") from None


def _run_info(run: Path) -> dict[str, Any]:
    config = _read_json(run / "config.json", required=True)
    if not isinstance(config, dict) or "architecture" not in config:
        raise NFNetZooError(f"{run}/config.json has no 'architecture'; it is not a timm config (write it with "
                            "timm.models.save_for_hf)")
    return {"config": shared_form(config), "args": _read_json(run / "args.json") or {},
            "summary": _read_json(run / "summary.json") or {}, "metrics": _read_json(run / "metrics.jsonl") or []}


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _per_class_table(per_class: Any, most: int = 50) -> str:
    """The validation top-1 of each class at the best epoch (summary.json's per_class); beyond `most` classes, the
    `most` lowest (the rest are in summary.json)."""
    if not isinstance(per_class, dict) or not per_class:
        return ""
    rows = [(str(c), r) for c, r in per_class.items() if isinstance(r, dict)
            and all(isinstance(r.get(k), (int, float)) for k in ("accuracy", "count"))]
    if not rows:
        return ""
    title = "Per class, at that epoch:"
    if len(rows) > most:
        rows = sorted(rows, key=lambda cr: cr[1]["accuracy"])[:most]
        title = f"The {most} classes with the lowest top-1 at that epoch (all {len(per_class)} in summary.json):"
    return (f"\n\n{title}\n\n| class | images | top-1 |\n|---|---|---|\n" + "\n".join(
        f"| {c.replace('|', '/')} | {r['count']:.0f} | {r['accuracy']:.2f} |" for c, r in rows))


def build_model_card(run_dir: Union[str, os.PathLike], repo_id: Optional[str] = None, *,
                     curves: Optional[bool] = None, dataset_id: Optional[str] = None) -> ModelCard:
    """The model card of a fine-tuning run folder, from its config.json, args.json, summary.json, metrics.jsonl.

    `repo_id` names the Hub repo in the usage snippet; without it the snippet loads the local folder.
    `curves`: show RUN/curves.png (a relative link, which the Hub renders from the repo); default: when the
    file is there. `dataset_id`: the Hub dataset the run trained on, for the card's `datasets:` metadata
    (a local folder's name is no dataset id, so without it the metadata names none).
    """
    run = Path(run_dir)
    info = _run_info(run)
    config, args, summary, metrics = info["config"], info["args"], info["summary"], info["metrics"]
    arch, model_args = exact_architecture(config)
    native = None if config["architecture"] in VARIANTS else config["architecture"]
    pcfg = config.get("pretrained_cfg", {})
    img = summary.get("img_size") or args.get("img_size") or pcfg.get("input_size", [3, 224])[-1]
    eval_img = (pcfg.get("test_input_size") or pcfg.get("input_size") or [3, img])[-1]
    params, (gmacs,) = _measure_config(run / "config.json", arch, (img,), config, model_args)
    labels = config.get("label_names") or summary.get("label_names") or []
    base = summary.get("base_model", args.get("base_model"))
    dataset = args.get("dataset") or summary.get("dataset") or (Path(args["data_dir"]).name if args.get("data_dir")
                                                               else None)
    name = repo_id.split("/")[-1] if repo_id else run.name
    top1, top5 = summary.get("top1"), summary.get("top5")

    results = []
    if (dataset or dataset_id) and top1 is not None:
        # model-index wants a dataset type: a Hub id where there is one, else the generic `imagefolder`
        common = dict(task_type="image-classification", task_name="Image Classification",
                      dataset_type=dataset_id or "imagefolder", dataset_name=dataset_id or dataset,
                      dataset_split="validation")
        results.append(EvalResult(metric_type="accuracy", metric_name="Top-1 accuracy", metric_value=top1, **common))
        if top5 is not None:
            results.append(EvalResult(metric_type="top_5_accuracy", metric_name="Top-5 accuracy",
                                      metric_value=top5, **common))
    data = ModelCardData(library_name="timm" if native else None, license=pcfg.get("license", "apache-2.0"),
                         tags=TAGS, pipeline_tag="image-classification", base_model=base,
                         datasets=[dataset_id] if dataset_id else None,
                         model_name=name if results else None, eval_results=results or None)

    origin = (f"fine-tuned from [{base}](https://huggingface.co/{base})" if base
              else "trained from scratch" if args else "exported with timm")
    shown = ", ".join(f"`{n}`" for n in labels[:20]) + (f" and {len(labels) - 20} more" if len(labels) > 20 else "")
    intro = (f"# {name}\n\nAn NFNet image classifier ({arch}, {config['num_classes']} classes) "
             f"{origin}{f' on `{dataset}`' if dataset else ''} with "
             "nfnet-zoo, a DeepMind-faithful NFNet implementation for timm.")
    details = "## Model details\n\n" + _table([
        ("Architecture", _arch_line(arch, model_args)),
        ("timm architecture", f"`{native}` (timm's own; see Usage)" if native else "none: needs nfnet-zoo"),
        ("Parameters", f"{params / 1e6:.2f} M ({params:,})"),
        ("GMACs", f"{gmacs:.3f} at {_size(img)}"),
        ("Image size", f"trained at {_size(img)}, evaluated at {_size(eval_img)} (bicubic squash-resize to "
                       f"{eval_img + 32}, centre crop)"),
        ("Classes", f"{len(labels) or config['num_classes']}{': ' + shown if shown else ''}"),
        ("Starting weights", f"[{base}](https://huggingface.co/{base})" if base else "none (random init)"),
        ("Paper", f"[{PAPER_NAME}]({PAPER_URL})"),
    ])
    sections = [intro, details]
    if args:
        clip = args.get("clipping")
        agc = (f"Adaptive Gradient Clipping (AGC, clipping {clip}) on every parameter except the classifier "
               "weight, as in the paper" if clip else "AGC off (clipping 0)")
        lr = args.get("lr")
        lr_text = _fmt(lr, "g") if lr is not None else f"{args.get('lr_base', 0.1)} x global batch / 256"
        stopped = summary.get("stopped") or ""
        epochs = _fmt(args.get("epochs"), "d") + (f" (stopped {stopped})" if stopped.startswith("early") else "")
        recipe = [("Epochs", epochs), ("Batch size (per process)", _fmt(args.get("batch_size"), "d")),
                  ("Optimizer", f"SGD, Nesterov momentum {args.get('momentum', 0.9)}"),
                  ("Learning rate", f"{lr_text}, warmup then cosine decay"),
                  ("Weight decay", f"{args.get('weight_decay')} (not on gains and biases)"),
                  ("Gradient clipping", agc),
                  *([("Frozen backbone", f"the first {args['freeze_epochs']} epoch(s): only the classifier trained")]
                    if args.get("freeze_epochs") else []),
                  *([("Layer-wise lr decay", f"{args['layer_decay']} per block below the classifier (timm's)")]
                    if args.get("layer_decay") else []),
                  ("Label smoothing", _fmt(args.get("smoothing"), "g")),
                  ("Class balance", str(args.get("class_balance", "none"))),
                  ("Mixed precision", str(args.get("mixed_precision", "no"))),
                  ("Training images", _fmt(summary.get("num_train"), "d")),
                  ("Training time", f"{summary['train_time_s']} s" if summary.get("train_time_s") is not None else "-")]
        sections.append("## Training\n\n" + _table(recipe))
    if top1 is not None:
        best = summary.get("best_epoch")
        res = (f"## Evaluation\n\nOn the run's validation split ({_fmt(summary.get('num_val'), 'd')} images, best "
               f"epoch {best}): **top-1 {top1:.2f}%**, top-5 {_fmt(top5, '.2f')}%, loss "
               f"{_fmt(summary.get('val_loss'), '.4f')}.")
        res += _per_class_table(summary.get("per_class"))
        if metrics:
            res += ("\n\n| epoch | train loss | val loss | top-1 | top-5 | lr | AGC clipped units |\n"
                    "|---|---|---|---|---|---|---|\n" + "\n".join(
                        f"| {m.get('epoch')} | {_fmt(m.get('train_loss'), '.4f')} | {_fmt(m.get('val_loss'), '.4f')} "
                        f"| {_fmt(m.get('top1'), '.2f')} | {_fmt(m.get('top5'), '.2f')} | {_fmt(m.get('lr'), '.3g')} "
                        f"| {_fmt(m.get('clipped_fraction'), '.3f')} |" for m in metrics))
        sections.append(res)
    if curves if curves is not None else (run / CURVES).is_file():
        sections.append(f"## Training curves\n\n![Training curves]({CURVES})\n\nPer epoch: training and validation "
                        "loss, validation top-1 and top-5, the learning rate and the fraction of units AGC clipped.")
    sections.append(_usage(f"hf-hub:{repo_id}" if repo_id else str(run), 'labels = model.pretrained_cfg["label_names"]'
                           if labels else "labels = [str(i) for i in range(probs.numel())]", native))
    n_val = f" ({summary['num_val']} images)" if summary.get("num_val") else ""
    measured = (f"- Accuracy was measured once, on this run's own validation split{n_val}; expect lower accuracy "
                "on images unlike the training data (other cameras, lighting, domains).\n" if top1 is not None else
                "- No accuracy was measured for this model; evaluate it on your data before use.\n")
    sections.append(
        "## Limitations\n\n" + measured +
        f"- The model knows only its {config['num_classes']} classes and assigns every image to one of them.\n"
        + ("- It inherits the biases of its starting weights' training data; do not use it for decisions about "
           "people." if base else "- It was trained from scratch on this dataset only; do not use it for decisions "
           "about people." if args else "- Do not use it for decisions about people."))
    sections.append(_citation())
    return _card(data, sections)


def write_model_card(run_dir: Union[str, os.PathLike], repo_id: Optional[str] = None,
                     dataset_id: Optional[str] = None) -> Path:
    """Write RUN/README.md (atomically) from the run's files; returns its path."""
    path = Path(run_dir) / "README.md"
    write_text_atomic(path, str(build_model_card(run_dir, repo_id, dataset_id=dataset_id)))
    return path


# --- converted DeepMind checkpoints that are not a released variant -------------------------
def build_checkpoint_card(config: dict, repo_id: str, source: str) -> ModelCard:
    """Card for a converted DeepMind checkpoint whose architecture is not one of the released variants."""
    config = shared_form(config)
    arch, model_args = exact_architecture(config)
    native = None if config["architecture"] in VARIANTS else config["architecture"]
    pcfg = config.get("pretrained_cfg", {})
    test = (pcfg.get("test_input_size") or pcfg.get("input_size") or [3, 224])[-1]
    params, gmacs = _measure_config(Path(source), arch, (test,), config, model_args)
    data = ModelCardData(library_name="timm" if native else None, license=pcfg.get("license", "apache-2.0"),
                         tags=TAGS, pipeline_tag="image-classification")
    name = repo_id.split("/")[-1]
    sections = [
        f"# {name}\n\nAn NFNet converted from DeepMind's checkpoint `{source}` (JAX/Haiku) with "
        "`nfnet-zoo publish`; the architecture was read off the tensor shapes.",
        "## Model details\n\n" + _table([
            ("Architecture", _arch_line(arch, model_args)),
            ("timm architecture", f"`{native}` (timm's own; see Usage)" if native else "none: needs nfnet-zoo"),
            ("Parameters", f"{params / 1e6:.2f} M ({params:,})"),
            ("GMACs", f"{gmacs[0]:.3f} at {_size(test)}"),
            ("Classes", str(config["num_classes"])),
            ("Weights", f"`{source}`, converted to timm's layout (HWIO to OIHW)"),
            ("Paper", f"[{PAPER_NAME}]({PAPER_URL})"),
        ]),
        _usage(f"hf-hub:{repo_id}", "labels = [str(i) for i in range(probs.numel())]", native),
        "## Limitations\n\nNo accuracy was measured for this checkpoint by nfnet-zoo; evaluate it on your data "
        "before use.",
        _citation(),
    ]
    return _card(data, sections)


# --- the released zoo ----------------------------------------------------------------------
def zoo_tags() -> list[str]:
    """`name.tag` of every registered variant with DeepMind's released weights (nfnet_f0.dm_in1k ...)."""
    return [t for t in list_pretrained_names() if t.startswith("nfnet_f") and t.endswith(".dm_in1k")]


def _zoo_index(tag: str) -> int:
    return int(tag.split(".")[0][len("nfnet_f"):])


def build_zoo_card(tag: str, repo_id: Optional[str] = None) -> ModelCard:
    """The card of one released variant (`nfnet_f1.dm_in1k`), from the variant table and measurements."""
    name = tag.split(".")[0]
    i, cfg = _zoo_index(tag), VARIANTS[name]
    repo_id = repo_id or f"{ZOO_NAMESPACE}/{tag}"
    top1, top5 = DM_ACCURACY[i]
    params, (gmacs_train, gmacs_test) = measure_model(name, (cfg.train_size, cfg.test_size))
    common = dict(task_type="image-classification", task_name="Image Classification", dataset_type="imagenet-1k",
                  dataset_name="ImageNet-1k", dataset_split="validation", source_name="Brock et al. 2021 (DeepMind)",
                  source_url=PAPER_URL)
    data = ModelCardData(
        library_name="timm", license="apache-2.0", tags=TAGS, pipeline_tag="image-classification",
        datasets=["imagenet-1k"], model_name=tag,
        eval_results=[EvalResult(metric_type="accuracy", metric_name="Top-1 accuracy", metric_value=top1, **common),
                      EvalResult(metric_type="top_5_accuracy", metric_name="Top-5 accuracy", metric_value=top5,
                                 **common)])
    sections = [
        f"# NFNet-F{i} (`{tag}`)\n\nDeepMind's NFNet-F{i} ImageNet-1k classifier: a Normalizer-Free ResNet (no "
        "batch normalization: scaled weight standardization and scaled residual branches) trained with Adaptive "
        "Gradient Clipping. Packaged for timm by nfnet-zoo, whose implementation follows DeepMind's reference "
        "computation.",
        "## Model details\n\n" + _table([
            ("Architecture", _arch_line(name, {})),
            ("Parameters", f"{params / 1e6:.1f} M ({params:,})"),
            ("GMACs", f"{gmacs_train:.2f} at {_size(cfg.train_size)} (train), {gmacs_test:.2f} at "
                      f"{_size(cfg.test_size)} (test)"),
            ("Image size", f"train {_size(cfg.train_size)}, test {_size(cfg.test_size)}"),
            ("Evaluation preprocessing", f"bicubic squash-resize to {cfg.test_size + 32}, centre crop "
                                         f"{cfg.test_size}, ImageNet mean/std"),
            ("Dataset", "ImageNet-1k (1000 classes)"),
            ("Weights", f"DeepMind's released checkpoint `F{i}_haiku.npz` ([deepmind-research/nfnets]({ORIGIN})), "
                        f"converted to timm's layout: the tensors of "
                        f"[timm/dm_nfnet_f{i}.dm_in1k](https://huggingface.co/timm/dm_nfnet_f{i}.dm_in1k)"),
            ("Paper", f"[{PAPER_NAME}]({PAPER_URL})"),
            ("License", "apache-2.0 (DeepMind's release)"),
        ]),
        f"## Results\n\nImageNet-1k validation accuracy reported by DeepMind for these weights: **top-1 "
        f"{top1}%**, top-5 {top5}% (at {_size(cfg.test_size)}). nfnet-zoo reproduces DeepMind's forward pass; it "
        "did not re-run the ImageNet evaluation.",
        "## Training (by DeepMind)\n\n" + _table([
            ("Resolution", f"{cfg.train_size} px"),
            ("Augmentation", f"RandAugment level `{RANDAUG_LEVEL[name]}` (DeepMind's `nfnet_params`)"),
            ("Regularization", f"dropout {cfg.drop_rate}, stochastic depth {cfg.stochdepth_rate}"),
            ("Gradient clipping", "AGC with clipping 0.01, not applied to the final linear layer"),
        ]),
        _usage(f"hf-hub:{repo_id}", "labels = [timm.data.ImageNetInfo().index_to_description(i) for i in range(1000)]",
               (timm_native(name, {}) or (None,))[0])
        + f"\n\nThe registered name `timm.create_model(\"{tag}\", pretrained=True)` loads the same weights from "
          f"`timm/dm_nfnet_f{i}.dm_in1k`.",
        "## Limitations\n\n- Trained on ImageNet-1k only: 1000 everyday object classes, with ImageNet's known "
        "label noise and cultural and demographic biases; do not use it for decisions about people.\n"
        f"- Accuracy drops at image sizes other than {cfg.test_size} and on images unlike ImageNet photos.\n"
        "- Large variants need much memory for training: fine-tune with `nfnet-zoo finetune`, which applies AGC.",
        _citation(),
    ]
    return _card(data, sections)


def build_hub_config(tag: str) -> str:
    """The timm config.json of a released variant: what `convert` writes for DeepMind's F{i}_haiku.npz."""
    import timm
    import torch
    from timm.models._hub import save_config_for_hf  # the writer save_for_hf (and so convert) uses

    with torch.device("meta"):
        model = timm.create_model(tag, pretrained=False, num_classes=1000)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.json"  # a Path: timm < 1.0.31 calls config_path.open()
        # the pool named: timm < 1.0.31 does not read it from the head
        save_config_for_hf(model, path, model_config={"source_checkpoint": f"F{_zoo_index(tag)}_haiku.npz",
                                                      "global_pool": "avg"},
                           model_args={"global_pool": "avg"})
        rewrite_shared(path)
        return path.read_text()


def write_zoo_cards(out_dir: Union[str, os.PathLike] = ".", namespace: Optional[str] = None) -> list[Path]:
    """Write model_cards/<tag>/README.md and hub_configs/<tag>/config.json for every released variant.

    Output is deterministic; files whose content is already right are left untouched. Returns the
    paths that changed.
    """
    out, changed, namespace = Path(out_dir), [], namespace or ZOO_NAMESPACE
    for tag in zoo_tags():
        for path, text in ((out / "model_cards" / tag / "README.md", str(build_zoo_card(tag, f"{namespace}/{tag}"))),
                           (out / "hub_configs" / tag / "config.json", build_hub_config(tag))):
            if write_text_atomic(path, text):
                changed.append(path)
    return changed


__all__ = ["build_model_card", "write_model_card", "build_checkpoint_card", "build_zoo_card", "build_hub_config",
           "write_zoo_cards", "zoo_tags", "measure_model", "ZOO_NAMESPACE"]
