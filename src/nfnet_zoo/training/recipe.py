"""The fine-tuning recipe: how each piece of a run is built from its FinetuneConfig.

The settings and their defaults are declared once, in nfnet_zoo_cli/settings.py (FinetuneConfig). The defaults
are the paper's ImageNet recipe (Brock et al. 2021, section 4 and appendix) adapted to
fine-tuning a pretrained model on a small dataset:
- SGD with Nesterov momentum 0.9; lr = lr_base * global_batch / 256 with the paper's lr_base 0.1;
- 10 epochs: 1 of linear warmup (the paper: 5 of 360), then cosine decay to zero, per optimizer step;
- weight decay 2e-5 (the paper's), not applied to gains, skip gains and biases;
- label smoothing 0.1; AGC with clipping 0.01 on every parameter but the classifier weight;
- the variant's dropout and stochastic depth; mixup/cutmix off (small datasets);
- train at the variant's train size with random-resized crops and flips; evaluate as DeepMind
  does at the variant's test size (squash-resize to S + 32, centre crop S, bicubic).
Here: how each piece is built from them (model, data pipeline, loss, optimizer, schedule), so that
`finetune.py` holds only the loop, `run_folder.py` the run folder.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from nfnet_zoo_cli.settings import SCHEDULES, FinetuneConfig

from ..errors import NFNetZooError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..data import EpochSampler, ImageData, WorkerSignals

# torch, timm and the data code are imported inside the builders. FinetuneConfig, the declaration of every
# setting, lives in the light nfnet_zoo_cli.settings that the command line reads for --help.


def eval_size_for(train_size: int, variant_train: int, variant_test: int) -> int:
    """DeepMind evaluates at a larger size than it trains; keep the variant's ratio for other sizes."""
    if train_size == variant_train:
        return variant_test
    return int(round(train_size * variant_test / variant_train))


# --- the pieces ---------------------------------------------------------------------------------
def build_model(cfg: FinetuneConfig, classes: list[str], log: Callable[[str], None] = print
                ) -> tuple[nn.Module, dict, Optional[str]]:
    """The model with a head for `classes`; returns (model, model_args for config.json, base_model)."""
    import timm
    from timm.models._builder import resolve_pretrained_cfg
    from ..models.load import check_model_name, create_pretrained, has_pretrained_weights, read_checkpoint
    if cfg.model_args is not None:  # a resumed run: its own record; the weights come from its state
        return _rebuild(cfg, classes), {**cfg.model_args, "num_classes": len(classes)}, cfg.base_model
    kwargs = dict(cfg.model_kwargs)
    ckpt = read_checkpoint(cfg.checkpoint) if cfg.checkpoint else None
    if ckpt is not None and ckpt.architecture:
        if cfg.model is None:
            cfg.model = ckpt.architecture
        if cfg.model.split(".")[0] == ckpt.architecture:
            saved = {k: v for k, v in (ckpt.model_args or {}).items() if k not in ("num_classes", "global_pool")}
            kwargs = {**saved, **kwargs}
    if cfg.model is None:
        raise NFNetZooError(f"--checkpoint {cfg.checkpoint} does not name its architecture; pass --model NAME")
    name = check_model_name(cfg.model)
    arch_args = dict(kwargs)  # what rebuilds the architecture (dropout rates are training-time only)
    if cfg.drop is not None:
        kwargs["drop_rate"] = cfg.drop
    if cfg.drop_path is not None:
        kwargs["drop_path_rate"] = cfg.drop_path
    pretrained = cfg.pretrained
    if ckpt is not None:
        pretrained = False
    elif pretrained is None:
        pretrained = has_pretrained_weights(name)
    base_model = resolve_pretrained_cfg(name).hf_hub_id if pretrained else None
    try:
        if pretrained:
            log(f"loading pretrained weights of {name}" + (f" ({base_model})" if base_model else ""))
            model = create_pretrained(name, ways_out="train from scratch with --no-pretrained, or start from "
                                      "local weights with --checkpoint PATH", num_classes=len(classes), **kwargs)
        else:
            model = timm.create_model(name, num_classes=len(classes), **kwargs)
    except (TypeError, ValueError, RuntimeError, ArithmeticError) as e:
        if not cfg.model_kwargs and not isinstance(e, TypeError):
            raise
        raise NFNetZooError(f"bad model argument for {name}: {str(e).splitlines()[0][:120]}; check "
                            f"--model-kwargs") from None
    if ckpt is not None:
        load_checkpoint(model, ckpt, classes, cfg.checkpoint, log)
    return model, {**arch_args, "num_classes": len(classes)}, base_model


def _rebuild(cfg: FinetuneConfig, classes: list[str]) -> nn.Module:
    """The architecture a run recorded in args.json (`model_args`), randomly initialised."""
    import timm
    from ..models.load import check_model_name
    kwargs = {k: v for k, v in cfg.model_args.items() if k not in ("num_classes", "global_pool")}
    kwargs.update({k: v for k, v in (("drop_rate", cfg.drop), ("drop_path_rate", cfg.drop_path)) if v is not None})
    name = check_model_name(cfg.model)
    try:  # pretrained=False given: a model_args "pretrained" (or checkpoint_path ...: loads files) is refused
        files = sorted(set(kwargs) & {"checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"})
        if files:
            raise TypeError(f"{', '.join(files)} name weights to load, not the architecture")
        _check_state_fits(cfg, name, kwargs, len(classes))
        return timm.create_model(name, pretrained=False, num_classes=len(classes), **kwargs)
    except (TypeError, ValueError, RuntimeError, ArithmeticError) as e:
        raise NFNetZooError(f"the run's model_args do not build {name} ({str(e).splitlines()[0][:120]}); restore its "
                            f"args.json, or start a new run") from None


def _check_state_fits(cfg: FinetuneConfig, name: str, kwargs: dict, num_classes: int) -> None:
    """The recorded architecture, built on the meta device, against the size of the saved state's weights: a run
    folder's args.json (received, or edited) that asks for a far larger network is refused before it is allocated.
    Everything finer (which file is damaged, which tensor does not fit) is runstate.py's check, after the build."""
    import math

    import timm
    from ..models.load import weights_shapes
    from .runstate import state_dir
    from ..models.shared_config import state_shapes
    folder = state_dir(Path(cfg.output)) if cfg.output else None
    if folder is None or not (folder / "model.safetensors").is_file():
        return  # no state yet (killed before the first save): nothing to compare, the restart is small
    try:
        saved = sum(math.prod(s) for s in weights_shapes(folder / "model.safetensors", "").values())
    except NFNetZooError:
        return  # damaged: runstate's manifest check names the file
    built = sum(math.prod(shape) for _, shape in state_shapes(timm.create_model, model_name=name, pretrained=False,
                                                                 num_classes=num_classes, **kwargs).values())
    if built > 2 * saved + 10 ** 6:
        raise NFNetZooError(f"{cfg.output}/args.json's model_args build a {name} of {built:,} weights, its saved state "
                            f"holds {saved:,}; restore its args.json, or start a new run")


def load_checkpoint(model: nn.Module, ckpt, classes: list[str], path: str, log: Callable[[str], None] = print) -> None:
    """Load `ckpt` (evaluate.Checkpoint) into `model`; a classifier for other classes is replaced (warning)."""
    head = model.get_classifier()
    head_keys = {n for n, p in model.named_parameters() if any(p is q for q in head.parameters())}
    state = dict(ckpt.state_dict)
    shapes_match = all(k in state and state[k].shape == p.shape for k, p in model.state_dict().items()
                       if k in head_keys)
    same_classes = ckpt.label_names is None and shapes_match or list(ckpt.label_names or []) == list(classes)
    if not same_classes:
        theirs = ckpt.label_names or []
        warnings.warn(f"--checkpoint {path} was trained on other classes ({len(theirs)}: "
                      f"{', '.join(map(str, theirs[:4]))}{' ...' if len(theirs) > 4 else ''}); "
                      f"its classifier is replaced by a new one for the {len(classes)} classes of the data")
        state = {k: v for k, v in state.items() if k not in head_keys}
    elif ckpt.label_names is None:
        log(f"--checkpoint {path} has no class names; keeping its classifier (same shape as the data's)")
    own = model.state_dict()
    cast = next((k for k, v in state.items() if k in own and own[k].is_floating_point() and not v.is_floating_point()),
                None)
    if cast:  # load_state_dict would cast integers into the weights silently
        raise NFNetZooError(f"--checkpoint {path} holds {cast} as {state[cast].dtype}, not floating point; restore it, "
                            f"or pass another --checkpoint")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise NFNetZooError(f"--checkpoint {path} does not fit --model {model.pretrained_cfg.get('architecture')} "
                            f"({str(e).splitlines()[-1].strip()[:150]}); pass the --model it was trained as") from None
    missing = [k for k in missing if k not in head_keys or same_classes]
    if missing or unexpected:
        raise NFNetZooError(f"--checkpoint {path} does not fit --model {model.pretrained_cfg.get('architecture')} "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); pass the --model it was "
                            f"trained as, or omit --model for a run folder")


def enable_grad_checkpointing(model: nn.Module, name: Optional[str]) -> None:
    """timm's `set_grad_checkpointing` (ours: checkpoint_seq over the stages); some timm families refuse it."""
    try:
        model.set_grad_checkpointing(True)
    except (AssertionError, NotImplementedError, AttributeError) as e:
        why = str(e).splitlines()[0][:80] if str(e) else type(e).__name__
        raise NFNetZooError(f"--grad-checkpointing: {name} does not support it ({why}); leave the flag out") from None


def build_loaders(cfg: FinetuneConfig, data: ImageData, model: nn.Module, accelerator,
                  signals: Optional[WorkerSignals] = None
                  ) -> tuple[torch.utils.data.DataLoader, Optional[torch.utils.data.DataLoader], EpochSampler]:
    """Train loader (random-resized crop + flip, resumable shuffle), val loader (DeepMind's eval
    preprocessing; None without val images) and the train sampler, whose `epoch` the loop sets. `signals`: the
    workers' signal handling (data.WorkerSignals), which the loop holds while it trains."""
    import torch
    from timm.data import create_transform, resolve_data_config
    from ..data import BalancedSampler, EpochSampler, ImageDataset, WorkerSignals
    from ..models.variants import deepmind_crop_pct
    train_size, test_size = image_sizes(cfg, model)
    dc = resolve_data_config(model=model)
    aa = deepmind_randaugment(cfg.model) if cfg.aa == "deepmind" else cfg.aa
    train_tf = create_transform(train_size, is_training=True, scale=cfg.scale, hflip=cfg.hflip, color_jitter=0.0,
                                auto_augment=aa, interpolation=dc["interpolation"], mean=dc["mean"], std=dc["std"])
    eval_tf = create_transform(test_size, is_training=False, interpolation=dc["interpolation"], mean=dc["mean"],
                               std=dc["std"], crop_pct=deepmind_crop_pct(test_size), crop_mode="squash")
    per_step = cfg.batch_size * accelerator.num_processes
    # what every loader here shares: workers, their signal handling, pinned memory for a GPU
    common = dict(num_workers=cfg.workers, pin_memory=accelerator.device.type == "cuda",
                  worker_init_fn=signals or WorkerSignals(), prefetch_factor=4 if cfg.workers > 0 else None)
    if data.shards:
        if cfg.class_balance != "none":  # both forms need every training label before the first step
            raise NFNetZooError(f"--class-balance {cfg.class_balance} needs every training label before training, and "
                                f"WebDataset shards are streamed; leave it off (--class-balance none) or give the "
                                f"images in another layout (class folders, parquet, a CSV)")
        return _stream_loaders(cfg, data, accelerator, train_tf, eval_tf, per_step, common)
    if len(data.train) < per_step:
        raise NFNetZooError(f"{len(data.train)} training images is fewer than one batch ({cfg.batch_size} x "
                            f"{accelerator.num_processes} process(es)); lower --batch-size to at most "
                            f"{max(1, len(data.train) // accelerator.num_processes)}")
    opener = data.opener()
    common["persistent_workers"] = cfg.workers > 0
    sampler = (BalancedSampler([label for _, label in data.train], cfg.seed) if cfg.class_balance == "sampler"
               else EpochSampler(len(data.train), cfg.seed))
    train = torch.utils.data.DataLoader(
        ImageDataset(data.train, opener, train_tf, cfg.seed), batch_size=cfg.batch_size, sampler=sampler,
        drop_last=True, generator=torch.Generator().manual_seed(cfg.seed), **common)
    val = (torch.utils.data.DataLoader(ImageDataset(data.val, opener, eval_tf), batch_size=cfg.batch_size,
                                       shuffle=False, **common) if data.val else None)
    return train, val, sampler


def _stream_loaders(cfg: FinetuneConfig, data: ImageData, accelerator, train_tf, eval_tf, per_step: int,
                    common: dict):
    """build_loaders for WebDataset shards (data/shards.py): each process reads its own shards; an epoch is the same
    number of batches on every process (a multiple of --grad-accum-steps), and the stream itself is the "sampler" whose
    `epoch` (and `skip`, the batches a resumed epoch had consumed) the loop sets."""
    import torch
    from ..data.shards import OnDevice, ShardStream, check_shards
    check_shards(data)
    readers = {"processes": accelerator.num_processes, "workers": cfg.workers}
    if data.shards.get("readers", readers) != readers:  # a resume with another --workers or process count
        was = data.shards["readers"]
        warnings.warn(f"the run's shards were read by {was['workers']} worker(s) on {was['processes']} process(es), now "
                      f"{cfg.workers} on {accelerator.num_processes}: the epoch in progress goes on with another order "
                      f"of its samples (an exact resume needs --workers {was['workers']} on {was['processes']})")
    batches = data.num_train // per_step
    batches -= batches % cfg.grad_accum_steps
    if batches < 1:
        raise NFNetZooError(f"{data.num_train} training images is fewer than one update ({cfg.batch_size} x "
                            f"{accelerator.num_processes} process(es) x {cfg.grad_accum_steps} accumulation step(s)); "
                            f"lower --batch-size")
    # workers start afresh each epoch: they copy the stream's epoch and skip when an epoch's iteration begins
    # a generator of their own: iter() would otherwise draw the workers' base seed from the training RNG, once more
    # in a resumed epoch than in the run it continues
    loader = lambda stream: OnDevice(torch.utils.data.DataLoader(stream, batch_size=cfg.batch_size,
                                                                 generator=torch.Generator(), **common),
                                     accelerator.device)
    share = dict(rank=accelerator.process_index, world=accelerator.num_processes, bad_images=cfg.bad_images)
    stream = ShardStream(data, "train", train_tf, seed=cfg.seed, batch_size=cfg.batch_size, batches=batches, **share)
    val = loader(ShardStream(data, "val", eval_tf, **share)) if data.num_val else None
    return loader(stream), val, stream


def image_sizes(cfg: FinetuneConfig, model: nn.Module) -> tuple[int, int]:
    """(train, eval) image sizes: --img-size/--test-img-size, else the variant's from its pretrained_cfg."""
    pc = model.pretrained_cfg
    v_train = pc["input_size"][-1]
    v_test = (pc.get("test_input_size") or pc["input_size"])[-1]
    train = cfg.img_size or v_train
    return train, cfg.test_img_size or eval_size_for(train, v_train, v_test)


def build_losses(cfg: FinetuneConfig, num_classes: int, labels: Sequence[int] = ()) -> tuple[Optional[Any], nn.Module]:
    """(timm Mixup or None, training loss): soft-target CE with mixup/cutmix, else label smoothing; with
    --class-balance loss, the class-weighted form of either (balance.py), weights from the training `labels`."""
    import torch
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    mixup = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        if cfg.batch_size % 2:
            raise NFNetZooError(f"--mixup/--cutmix need an even --batch-size, got {cfg.batch_size}")
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.smoothing,
                      num_classes=num_classes)
        train_loss = SoftTargetCrossEntropy()
    elif cfg.smoothing > 0:
        train_loss = LabelSmoothingCrossEntropy(cfg.smoothing)
    else:
        train_loss = torch.nn.CrossEntropyLoss()
    if cfg.class_balance == "loss":  # the same targets (mixup's soft ones hold their smoothing), classes weighted
        from .balance import WeightedCrossEntropy, class_weights
        train_loss = WeightedCrossEntropy(class_weights(labels, num_classes), cfg.smoothing)
    return mixup, train_loss


def build_optimizer(cfg: FinetuneConfig, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """timm's optimizer `cfg.opt` over DeepMind's decay partition (agc.weight_decay_groups), split by layer with
    --layer-decay."""
    from timm.optim import create_optimizer_v2
    from ..agc import weight_decay_groups
    # Our groups state DeepMind's no-decay set (gains, skip gains, biases), whatever the optimizer.
    return create_optimizer_v2(weight_decay_groups(model, cfg.weight_decay, cfg.layer_decay), opt=cfg.opt, lr=lr,
                               momentum=cfg.momentum, weight_decay=cfg.weight_decay, **cfg.opt_kwargs)


def build_scheduler(cfg: FinetuneConfig, optimizer: torch.optim.Optimizer, updates_per_epoch: int) -> Any:
    """timm's schedule `cfg.sched` with linear warmup, stepped per optimizer update (`step_update`); with
    --freeze-epochs, one such schedule over the frozen epochs and another over the rest (freeze.PhasedSchedule)."""
    if not cfg.freeze_epochs:
        return _timm_schedule(cfg, optimizer, cfg.epochs, updates_per_epoch)
    from .freeze import PhasedSchedule
    # a linear probe (--freeze-epochs = --epochs) keeps a second phase of one epoch, never reached, so that its
    # saved state has the same form as the one a resume with more --epochs builds
    return PhasedSchedule(_timm_schedule(cfg, optimizer, cfg.freeze_epochs, updates_per_epoch),
                          _timm_schedule(cfg, optimizer, max(cfg.epochs - cfg.freeze_epochs, 1), updates_per_epoch),
                          cfg.freeze_epochs * updates_per_epoch)


def _timm_schedule(cfg: FinetuneConfig, optimizer: torch.optim.Optimizer, epochs: int, updates_per_epoch: int):
    from timm.scheduler import create_scheduler_v2
    sched, _ = create_scheduler_v2(optimizer, sched=cfg.sched, num_epochs=epochs, decay_epochs=cfg.decay_epochs,
                                   decay_milestones=list(cfg.decay_milestones), decay_rate=cfg.decay_rate,
                                   warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr,
                                   step_on_epochs=False, updates_per_epoch=updates_per_epoch)
    if sched is None:  # an older timm without that schedule
        raise NFNetZooError(f"--sched {cfg.sched} is not in the installed timm; pass one of {', '.join(SCHEDULES[:5])}")
    return sched


def deepmind_randaugment(model: Optional[str]) -> str:
    """The variant's RandAugment as DeepMind trained it from scratch, as timm's policy string.

    DeepMind's level "415" is 4 layers at magnitude 15 on TF's 0-10 scale; timm needs `mmax` for M > 10.
    """
    from ..models.variants import RANDAUG_LEVEL
    level = RANDAUG_LEVEL.get((model or "").split(".")[0])
    if level is None:
        raise NFNetZooError(f"--aa deepmind needs an NFNet-F variant (nfnet_f0 ... nfnet_f7_plus), not {model}; "
                            "pass a timm policy such as --aa rand-m9-mstd0.5-inc1")
    layers, magnitude = divmod(int(level), 100)
    return f"rand-n{layers}-m{magnitude}" + (f"-mmax{magnitude}" if magnitude > 10 else "")


def check_timm_names(cfg: FinetuneConfig) -> None:
    """--aa, --opt and --sched name things timm builds: refuse unknown ones before any work."""
    import difflib

    import torch
    from timm.data import create_transform
    from timm.optim import create_optimizer_v2, list_optimizers
    try:
        create_optimizer_v2([torch.zeros(1, requires_grad=True)], opt=cfg.opt, lr=0.1, **cfg.opt_kwargs)
    except (ValueError, AssertionError, TypeError, ImportError) as e:
        names = list_optimizers()
        close = [] if cfg.opt.lower() in names else difflib.get_close_matches(cfg.opt.lower(), names, n=4)
        raise NFNetZooError(f"--opt {cfg.opt}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                            f"{'; closest: ' + ', '.join(close) if close else ''}"
                            f"{'; check --opt-kwargs' if cfg.opt_kwargs else ''} "
                            "(timm.optim.list_optimizers() lists the names)") from None
    if cfg.aa == "deepmind" and cfg.model:
        deepmind_randaugment(cfg.model)
    elif cfg.aa and cfg.aa != "deepmind":
        try:
            create_transform(32, is_training=True, auto_augment=cfg.aa)
        except (ValueError, AssertionError, KeyError, IndexError, TypeError) as e:
            raise NFNetZooError(f"--aa {cfg.aa} is not a timm augmentation policy ({e}); pass e.g. "
                                "rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, v0 or deepmind") from None


__all__ = ["FinetuneConfig", "eval_size_for", "build_model", "load_checkpoint", "enable_grad_checkpointing",
           "build_loaders", "image_sizes", "build_losses", "build_optimizer", "build_scheduler", "deepmind_randaugment",
           "check_timm_names"]
