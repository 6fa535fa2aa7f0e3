"""Fine-tune an NFNet on the user's images with Accelerate and AGC (`nfnet-zoo finetune`): the loop.

`finetune` reads as Accelerate's examples do, on one screen: `_setup` (accelerator, data, model, optimizer
and schedule, `prepare`), then per epoch `_train_one_epoch` (forward, backward, AGC on the accumulated
gradient, step), `_validate` (`gather_for_metrics`), `_end_of_epoch` (metrics, best/last exports) and `_save`
(the resumable state, runstate.py, for `--resume`). The run folder it writes: run_folder.py. The settings:
nfnet_zoo_cli/settings.py; how each piece is built from them: recipe.py.

Resuming is exact: the shuffle and each sample's augmentation are functions of (seed, epoch,
index) (see data/), the RNG state of the training process is saved, so on the CPU a run killed
at any moment and resumed ends with the same weights as one never interrupted. WebDataset shards are streamed
(data/shards.py): their order is a function of (seed, epoch, process, worker), and a resumed epoch reads past the
batches it had consumed without decoding them; exact with the same processes and --workers (README).
"""
from __future__ import annotations

import math
import os
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..agc import clipped_parameters
from ..agc_distributed import assert_agc_supported, prepare_for_fsdp2, unscale_and_clip_
from ..data import ImageData, WorkerSignals
from ..errors import NFNetZooError
from ..evaluation import per_class_accuracy, topk_correct
from ..files import CURVES, write_bytes_atomic, write_json_atomic
from .curves import INSTALL, curves_png, plotting_problem, run_title
from .freeze import backbone_parameters, drop_frozen_grads
from .progress import Progress, StopRequest
from .recipe import (FinetuneConfig, build_loaders, build_losses, build_model, build_optimizer, build_scheduler,
                     enable_grad_checkpointing, image_sizes)
from .run_folder import finish, image_data, origin, own_run_folder, resolve, save_model_folder, saved_epoch
from .runlock import RunLock
from .runstate import check_room, load_run_state, save_run_state, state_dir
from .sam import build_sam


METRIC_KEYS = ("epoch", "train_loss", "val_loss", "top1", "top5", "lr", "images_per_sec", "clipped_fraction")


def finetune(config: Optional[FinetuneConfig] = None, *, resume: Optional[str] = None, **overrides: Any) -> Path:
    """Fine-tune `config.model` on `config.data_dir`; returns the run folder (see the module docstring).

    Pass a FinetuneConfig and/or its fields as keyword arguments; `resume=RUN` continues a run from
    its saved state (only the settings in nfnet_zoo_cli.settings.RESUMABLE may then change). Raises NFNetZooError
    on bad input.
    """
    cfg, run, resuming = resolve(config, resume, overrides)
    lock = RunLock(run)  # taken in _setup by the main process, before anything is written in RUN
    try:
        t = _setup(cfg, run, resuming, lock)  # accelerator, data, model, optimizer, schedule; prepare; EMA
        if resuming:
            _resume(t)  # weights, optimizer, schedule, EMA, generators and progress from RUN/state
        elif t.accelerator.is_main_process:
            write_json_atomic(run / "args.json", cfg.to_json())
        _announce(t)
        early = t.progress.early_stop(cfg.patience)  # a resumed run that had stopped early trains no further
        if early and t.progress.epoch < cfg.epochs:
            t.accelerator.print(f"{run} stopped early at epoch {t.progress.epoch} ({early}); nothing to train: "
                                f"--resume {run} --patience N with a larger N (or 0) continues it")
        with StopRequest() as stop, t.worker_signals.held():  # the workers leave SIGTERM to this process
            while t.progress.epoch < cfg.epochs and not early:
                _train_one_epoch(t, stop)  # saves every --save-every updates; on Ctrl-C saves and stops
                metrics = _validate(t.eval_model, t.val_loader, t.accelerator, t.data.classes)
                _end_of_epoch(t, metrics)  # metrics.jsonl, last (and best) exports, the epoch line
                _save(t)
                early = t.progress.early_stop(cfg.patience)
        if t.accelerator.is_main_process:
            finish(cfg, run, t.data, t.progress, t.train_size, early)
        t.accelerator.wait_for_everyone()
        t.accelerator.end_training()  # trackers, then the process group (gloo's threads may abort an exit without it)
    finally:
        lock.release()
    return run


@dataclass
class _Training:
    """What `_setup` builds, after `accelerator.prepare`: everything the loop reads."""

    cfg: FinetuneConfig
    run: Path
    accelerator: Any
    data: ImageData
    sampler: Any                  # nfnet_zoo.data's EpochSampler: its epoch seeds the shuffle
    train_loader: Any
    val_loader: Any               # None without a val split
    model: nn.Module              # as prepared (DDP, FSDP2, compiled)
    unwrapped: nn.Module          # the module itself, which the EMA follows
    optimizer: Any                # Accelerate's wrapper; `.optimizer` is timm's
    scheduler: Any                # timm's, stepped once per optimizer update
    mixup: Any                    # timm Mixup, or None
    train_loss_fn: nn.Module
    ema: Any                      # timm ModelEmaV3 (--model-ema), or None
    clip_params: Optional[list]   # AGC's parameters (clipped_parameters), None with --clipping 0
    backbone: list                # what --freeze-epochs freezes (freeze.py); empty without it
    lr: float
    model_args: dict
    notes: list[str]              # what config.json says of where the weights come from
    train_size: int
    test_size: int
    progress: Progress
    worker_signals: WorkerSignals  # the DataLoader workers' worker_init_fn
    draw_curves: bool = True      # RUN/curves.png each epoch (main process); off without matplotlib
    sam: Any = None               # sam.SAM (--sam), or None

    @property
    def frozen(self) -> bool:
        """The backbone does not train in this epoch (--freeze-epochs)."""
        return self.progress.epoch < self.cfg.freeze_epochs

    @property
    def eval_model(self) -> nn.Module:
        """The weights validated and exported: the EMA's when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def state(self) -> dict:
        """What a resume restores (with `progress`): runstate.py saves it in files that cannot carry code."""
        return dict(model=self.model, optimizer=self.optimizer.optimizer, scheduler=self.scheduler, ema=self.ema)


def _setup(cfg: FinetuneConfig, run: Path, resuming: bool, lock: RunLock) -> _Training:
    """Accelerator, data, model, losses, optimizer and schedule; `prepare`; then EMA and AGC's parameters."""
    accelerator = _accelerator(cfg, run)
    from accelerate.utils import set_seed
    if cfg.clipping > 0:
        assert_agc_supported(accelerator)
    set_seed(cfg.seed)
    own_run_folder(accelerator, run, resuming, lock)
    data = image_data(cfg, run, resuming, accelerator)

    model, model_args, base_model = build_model(cfg, data.classes, accelerator.print)
    if not resuming:
        cfg.base_model = base_model
    cfg.model_args = {k: v for k, v in model_args.items() if k != "num_classes"}  # args.json: what --resume builds
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.grad_checkpointing:
        enable_grad_checkpointing(model, cfg.model)
    worker_signals = WorkerSignals()
    train_loader, val_loader, sampler = build_loaders(cfg, data, model, accelerator, worker_signals)
    train_size, test_size = image_sizes(cfg, model)
    notes = [origin(cfg)]
    mixup, train_loss_fn = build_losses(cfg, len(data.classes), [label for _, label in data.train])
    lr = cfg.resolved_lr(accelerator.num_processes)
    optimizer = build_optimizer(cfg, model, lr)

    if _is_fsdp2(accelerator):
        prepare_for_fsdp2(model)
    if data.shards:  # each process streams its own shards: Accelerate would dispatch them from process 0
        model, optimizer = accelerator.prepare(model, optimizer)
    else:
        model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    unwrapped = _unwrap(accelerator, model)
    ema = None
    if cfg.model_ema:  # copied from the prepared model: on its device, in its dtype and memory format
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(unwrapped, decay=cfg.model_ema_decay)
    clip_params = clipped_parameters(model) if cfg.clipping > 0 else None  # after prepare: FSDP2 replaces them
    backbone = backbone_parameters(model) if cfg.freeze_epochs else []
    if val_loader is not None and not data.shards:
        val_loader = accelerator.prepare(val_loader)
    updates_per_epoch = math.ceil(len(train_loader) / cfg.grad_accum_steps)
    scheduler = build_scheduler(cfg, optimizer.optimizer, updates_per_epoch)
    if accelerator.is_main_process:  # a read-only or full disk: now, not at the first save after training up to it
        check_room(run, accelerator.unwrap_model(model), ema)
    return _Training(cfg, run, accelerator, data, sampler, train_loader, val_loader, model, unwrapped, optimizer,
                     scheduler, mixup, train_loss_fn, ema, clip_params, backbone, lr, model_args, notes, train_size,
                     test_size, Progress(accelerator.device), worker_signals,
                     sam=build_sam(cfg, accelerator))


def _accelerator(cfg: FinetuneConfig, run: Path):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    # Accelerate runs several CPU processes (gloo) only with cpu=True; torchrun on a machine without
    # a GPU should not silently train N independent copies.
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cpu = cfg.cpu or (several and not torch.cuda.is_available() and not _has_xpu())
    if not several:  # Accelerate keeps one state per process; a second run here (notebook, tests) may set others
        from accelerate.state import AcceleratorState
        AcceleratorState._reset_state()
    try:
        compile_args = {"dynamo_backend": cfg.torchcompile} if cfg.torchcompile else {}  # prepare() compiles
        accelerator = Accelerator(cpu=cpu, mixed_precision=cfg.mixed_precision, **compile_args,
                                  gradient_accumulation_steps=cfg.grad_accum_steps, log_with=cfg.report_to or None,
                                  project_config=ProjectConfiguration(project_dir=str(run),
                                                                      logging_dir=str(run / "logs")))
    except (ValueError, ImportError, RuntimeError) as e:
        raise NFNetZooError(f"cannot set up training ({str(e).splitlines()[0]}); check --mixed-precision, "
                            f"--torchcompile, --report-to and the accelerate config") from None
    if accelerator.device.type == "cpu" and accelerator.mixed_precision == "fp16":
        # Accelerate has no fp16 autocast or loss scaling on the CPU: it would train in float32 unasked
        raise NFNetZooError("--mixed-precision fp16 needs a GPU (on the CPU Accelerate trains in float32, the "
                            "same as --mixed-precision no); use --mixed-precision bf16 on the CPU")
    if os.environ.get("ACCELERATE_USE_CPU") == "True" and not several:
        # `accelerate launch --cpu` starts one process, whatever --num_processes says
        warnings.warn("one training process: `accelerate launch --cpu` starts only one; for several CPU "
                      "processes use torchrun --nproc-per-node N -m nfnet_zoo_cli finetune --cpu ...")
    if cfg.report_to and not accelerator.log_with:  # Accelerate only warns, and the curves would be lost
        raise NFNetZooError(f"--report-to {cfg.report_to}: the tracker's package is not installed; "
                            f"pip install {cfg.report_to if cfg.report_to != 'all' else 'tensorboard'}, "
                            f"or leave --report-to out")
    return accelerator


def _unwrap(accelerator, model: nn.Module) -> nn.Module:
    """The plain module, without torch.compile's wrapper: removed before accelerate sees it, as
    accelerate < 1.3 (no keep_torch_compile) puts it back."""
    return accelerator.unwrap_model(getattr(model, "_orig_mod", model))


def _has_xpu() -> bool:
    return hasattr(torch, "xpu") and torch.xpu.is_available()


def _is_fsdp2(accelerator) -> bool:
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    return plugin is not None and getattr(plugin, "fsdp_version", 1) == 2


def _resume(t: _Training) -> None:
    run, progress = t.run, t.progress
    if t.accelerator.is_main_process:  # exports a kill interrupted: the files they were replacing are intact
        for leftover in run.glob("**/.export-*"):
            shutil.rmtree(leftover, ignore_errors=True)
    schedule = t.scheduler.state_dict()  # the schedule of this command's --epochs
    saved = load_run_state(t.accelerator, run, progress=progress.state_dict(), **t.state())
    # runstate.py checks the kinds of values but lets a null through (a value not set yet); these are always set
    numbers = all(type(saved[k]) in (int, float) for k in Progress.FIELDS if k not in ("history", "best"))
    if not (numbers and 0 <= saved["epoch"] and 0 <= saved["step"] <= len(t.train_loader)
            and 0 <= saved["global_step"]):
        raise NFNetZooError(f"{state_dir(run)}/progress.json does not fit this run (epoch {saved['epoch']}, step "
                            f"{saved['step']} of {len(t.train_loader)}); restore the run folder from a copy, or "
                            f"start a new run")
    if saved["epoch"] > t.cfg.epochs:
        raise NFNetZooError(f"{run} has trained {saved['epoch']} epochs, more than --epochs {t.cfg.epochs}; pass "
                            f"--epochs {saved['epoch'] + 1} or more to train further (its models are in {run})")
    progress.load_state_dict(saved)
    t.accelerator.print(f"resuming {run} at epoch {progress.epoch + 1}, step {progress.step}")
    if t.scheduler.state_dict() != schedule:  # saved for another --epochs: same curve, stretched to the new end
        t.scheduler.load_state_dict(schedule)
        t.scheduler.step_update(progress.global_step)
        total = t.cfg.epochs * math.ceil(len(t.train_loader) / t.cfg.grad_accum_steps)
        t.accelerator.print(f"--epochs {t.cfg.epochs}: the {t.cfg.sched} schedule saved for another length is "
                             f"rebuilt to end at epoch {t.cfg.epochs} ({total} updates) and continues from update "
                             f"{progress.global_step} (lr {_lr(t.optimizer):.4g})")
    if t.accelerator.is_main_process:  # the arguments it now runs with (--epochs ...): a later --resume reads them
        write_json_atomic(run / "args.json", t.cfg.to_json())


def _announce(t: _Training) -> None:
    cfg, accelerator, data = t.cfg, t.accelerator, t.data
    if cfg.report_to:
        accelerator.init_trackers("nfnet-zoo", config={k: v for k, v in cfg.to_json().items()
                                                       if isinstance(v, (int, float, str, bool))})
    problem = plotting_problem() if accelerator.is_main_process else None
    if problem:
        t.draw_curves = False
        warnings.warn(f"{CURVES} will not be drawn: {problem} ({INSTALL}; then `nfnet-zoo curves {t.run}` draws "
                      f"it for this run)")
    if accelerator.is_main_process:
        accelerator.print(f"fine-tuning {cfg.model} on {data.num_train} images ({len(data.classes)} classes), "
                          f"validating on {data.num_val}; {accelerator.num_processes} process(es) on "
                          f"{accelerator.device.type}, global batch {cfg.global_batch(accelerator.num_processes)}, "
                          f"lr {t.lr:.4g}, AGC {cfg.clipping or 'off'}, "
                          + (f"the classifier only for {cfg.freeze_epochs} epoch(s), " if cfg.freeze_epochs else "")
                          + f"{t.train_size}px train / {t.test_size}px "
                          f"eval; run folder {t.run}")


def _train_one_epoch(t: _Training, stop: StopRequest) -> None:
    """Train epoch `progress.epoch` from batch `progress.step` on; save the state every --save-every updates;
    on Ctrl-C / SIGTERM (agreed by all processes) save it and raise KeyboardInterrupt."""
    from tqdm.auto import tqdm
    cfg, accelerator, progress = t.cfg, t.accelerator, t.progress
    t.sampler.epoch = progress.epoch
    if t.data.shards:  # the stream reads past the consumed batches without decoding them
        t.sampler.skip, loader = progress.step, t.train_loader
    else:
        loader = accelerator.skip_first_batches(t.train_loader, progress.step) if progress.step else t.train_loader
    bar = tqdm(total=len(t.train_loader), initial=progress.step, desc=f"epoch {progress.epoch + 1}/{cfg.epochs}",
               disable=None if accelerator.is_local_main_process else True, leave=False, dynamic_ncols=True)
    images_per_step = cfg.batch_size * accelerator.num_processes
    nonfinite = torch.zeros((), dtype=torch.bool, device=accelerator.device)  # checked only at log steps: no sync
    progress.start_clock()
    t.scheduler.step_update(progress.global_step)
    t.model.train()
    for x, y in loader:
        loss = _train_step(t, x, y)
        nonfinite |= ~torch.isfinite(loss)
        progress.add_step(loss, images_per_step)
        bar.update(1)
        if not accelerator.sync_gradients:
            continue
        progress.global_step += 1
        t.scheduler.step_update(progress.global_step)
        if t.ema is not None:
            t.ema.update(t.unwrapped, step=progress.global_step)
        saving = bool(cfg.save_every) and progress.global_step % cfg.save_every == 0
        check = progress.global_step % cfg.log_interval == 0 or saving
        if check or accelerator.num_processes == 1 and stop.requested:
            _raise_if_diverged(nonfinite, accelerator, progress, t.run)
            if check and bar.disable is False:
                bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{progress.images / progress.elapsed():.0f}")
            stopping = _stop_agreed(stop, accelerator, check)
            if stopping or saving:
                _save(t)
            if stopping:
                bar.close()
                accelerator.print(f"stopped at epoch {progress.epoch + 1}, step {progress.step}; state saved in "
                                  f"{t.run}/state; continue with: nfnet-zoo finetune --resume {t.run}",
                                  file=sys.stderr)
                raise KeyboardInterrupt
    bar.close()
    _raise_if_diverged(nonfinite, accelerator, progress, t.run)
    progress.stop_clock()


def _train_step(t: _Training, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Forward, backward, AGC on the accumulated gradient, step (Accelerate skips the step and AGC on
    accumulation micro-steps); with --sam, the ascent step before the first micro-batch's forward and the restore
    of the weights before AGC (sam.py); returns the detached loss."""
    with t.accelerator.accumulate(t.model):
        if t.mixup is not None:
            x, y = t.mixup(x, y)
        if t.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if t.sam is not None and not t.sam.perturbed:  # the first micro-batch of an optimizer step: w -> w + e
            t.sam.ascend(t.accelerator, t.model, t.train_loss_fn, x, y)
        loss = t.train_loss_fn(t.model(x), y)
        t.accelerator.backward(loss)
        if t.frozen:
            drop_frozen_grads(t.backbone)  # before AGC and the step, which then leave these weights alone
        if t.sam is not None and t.accelerator.sync_gradients:  # back to w, which AGC and the step move
            t.sam.restore()
        if t.clip_params is not None:
            stats = unscale_and_clip_(t.accelerator, t.clip_params, t.cfg.clipping)
            if stats is not None:  # None on accumulation micro-steps
                t.progress.add_clip(stats.clipped / stats.units)
        t.optimizer.step()
        t.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _validate(model: nn.Module, loader, accelerator, classes: list[str]) -> dict:
    """Val loss, top-1 and top-5 (%) and per-class top-1, each sample counted once across processes (None without
    a val split)."""
    if loader is None:
        return {"val_loss": None, "top1": None, "top5": None, "per_class": None}
    if getattr(loader, "streamed", False):
        return _validate_stream(model, loader, accelerator, len(classes))
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    rows = []
    with torch.no_grad():
        for x, y in loader:
            with accelerator.autocast():
                out = model(x)
            c1, c5 = topk_correct(out.float(), y, (1, min(5, len(classes))))
            per_sample = torch.stack([loss_fn(out.float(), y), c1.float(), c5.float(), y.float()], 1)
            rows.append(accelerator.gather_for_metrics(per_sample))
    model.train()
    rows = torch.cat(rows).double().cpu()
    m = rows.mean(0).tolist()
    per_class = per_class_accuracy(rows[:, 1].bool(), rows[:, 3].long(), {c: i for i, c in enumerate(classes)})
    return {"val_loss": m[0], "top1": 100 * m[1], "top5": 100 * m[2], "per_class": per_class}


def _validate_stream(model: nn.Module, loader, accelerator, num_classes: int) -> dict:
    """_validate for shards: each process scores its own share, of any length, and sums are reduced once (no
    gather_for_metrics: it assumes equal shares padded by duplicates)."""
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    sums = torch.zeros(4, dtype=torch.float64, device=accelerator.device)  # loss, top-1, top-5, count
    with torch.no_grad():
        for x, y in loader:
            with accelerator.autocast():
                out = model(x)
            c1, c5 = topk_correct(out.float(), y, (1, min(5, num_classes)))
            sums += torch.stack([loss_fn(out.float(), y).double(), c1.sum().double(), c5.sum().double(),
                                 sums.new_tensor(len(y))])
    model.train()
    sums = accelerator.reduce(sums, "sum") if accelerator.num_processes > 1 else sums
    n = sums[3].item()
    if not n:
        return {"val_loss": None, "top1": None, "top5": None, "per_class": None}
    return {"val_loss": sums[0].item() / n, "top1": 100 * sums[1].item() / n, "top5": 100 * sums[2].item() / n,
            "per_class": None}  # per class: not gathered for streams


def _end_of_epoch(t: _Training, metrics: dict) -> None:
    """Log the epoch's row (metrics.jsonl, trackers, one line), export last (and best) weights, and move
    `progress` to the next epoch (the caller then saves the state)."""
    accelerator, cfg, progress = t.accelerator, t.cfg, t.progress
    train_loss = accelerator.reduce(torch.stack([progress.loss_sum, progress.loss_sum.new_tensor(progress.loss_count)]), "sum")
    clipped = progress.clip_sum.item() / progress.clip_count if progress.clip_count else None
    row = {"epoch": progress.epoch + 1, "train_loss": (train_loss[0] / train_loss[1]).item(), **metrics,
           "lr": _lr(t.optimizer), "images_per_sec": progress.images / max(progress.epoch_time, 1e-9),
           "clipped_fraction": clipped}
    progress.history.append({k: row[k] for k in METRIC_KEYS})
    # best by val top-1 (the first of equals); without a val split the last epoch is the best
    improved = progress.best is None or row["top1"] is None or row["top1"] > progress.best["top1"]
    if improved:
        progress.best = dict(row)
    export = _unwrap(accelerator, t.eval_model)
    if accelerator.is_main_process:
        save_model_folder(export, t.run / "last", t.data.classes, t.model_args, t.test_size, t.notes)
        if improved:
            save_model_folder(export, t.run, t.data.classes, t.model_args, t.test_size, t.notes)
        write_json_atomic(t.run / "metrics.jsonl", progress.history, lines=True)
        _draw_curves(t)
    if cfg.report_to:
        accelerator.log({k: v for k, v in row.items() if v is not None and k not in ("epoch", "per_class")},
                        step=progress.epoch + 1)
    accelerator.print(_epoch_line(row, cfg.epochs))
    progress.next_epoch()


def _draw_curves(t: _Training) -> None:
    """RUN/curves.png from the rows so far. A plotting fault warns once and training goes on without curves; a
    disk fault while writing the file is a machine fault, as for metrics.jsonl."""
    if not t.draw_curves:
        return
    try:
        png = curves_png(t.progress.history, run_title(t.run, t.cfg.to_json()), t.cfg.clipping)
    except Exception as e:  # noqa: BLE001 - whatever matplotlib raises, the run is worth more than its figure
        t.draw_curves = False
        warnings.warn(f"{CURVES} not drawn ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}); "
                      f"training goes on; `nfnet-zoo curves {t.run}` draws it later")
        return
    write_bytes_atomic(t.run / CURVES, png)


def _save(t: _Training) -> None:
    save_run_state(t.accelerator, t.run, progress=t.progress.state_dict(), **t.state())


def _stop_agreed(stop: StopRequest, accelerator, at_check: bool) -> bool:
    if accelerator.num_processes == 1:
        return stop.requested
    if not at_check:  # processes agree only at steps they all check
        return False
    flag = torch.tensor(float(stop.requested), device=accelerator.device)
    return bool(accelerator.reduce(flag, "max").item())


def _raise_if_diverged(nonfinite: torch.Tensor, accelerator, progress: Progress, run: Path) -> None:
    flag = accelerator.reduce(nonfinite.float(), "max") if accelerator.num_processes > 1 else nonfinite
    if bool(flag.item()):
        saved = (f"the last good state is in {run}/state (epoch {saved_epoch(run)})"
                 if state_dir(run) is not None else "no state had been saved yet")
        raise NFNetZooError(f"training diverged: the loss became non-finite at epoch {progress.epoch + 1}, step "
                            f"{progress.step}; {saved} and the best model in {run}; start again with a lower --lr "
                            f"(or --clipping > 0, or --mixed-precision bf16 instead of fp16)")


def _lr(optimizer) -> float:
    """The learning rate: the classifier's, the highest with --layer-decay (timm's lr_scale 1)."""
    return max(group["lr"] for group in optimizer.param_groups)


def _epoch_line(row: dict, epochs: int) -> str:
    fmt = lambda k, f: "-" if row.get(k) is None else format(row[k], f)
    return (f"epoch {row['epoch']}/{epochs}: train loss {fmt('train_loss', '.4f')}, val loss {fmt('val_loss', '.4f')}, "
            f"top-1 {fmt('top1', '.2f')}%, top-5 {fmt('top5', '.2f')}%, {fmt('images_per_sec', '.1f')} img/s, "
            f"clipped {fmt('clipped_fraction', '.3f')}")


__all__ = ["finetune", "METRIC_KEYS"]
