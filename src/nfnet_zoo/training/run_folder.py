"""The run folder of `nfnet-zoo finetune`: what it holds, who may write it, and what a resume reads back.

RUN:
  model.safetensors, config.json   best epoch by val top-1 (timm `save_for_hf`, config.json in the shared
                                   form of shared_config.py; nfnet_zoo.load_model(RUN) builds the exact
                                   network, timm.create_model("local-dir:RUN", pretrained=True) timm's)
  last/                            the same for the last epoch
  metrics.jsonl                    one JSON object per epoch
  curves.png                       loss, top-1/top-5, learning rate and AGC clipped fraction per epoch (redrawn
                                   each epoch; needs matplotlib: pip install 'nfnet-zoo[plots]')
  args.json, data.json             resolved arguments; the exact file list and split
  summary.json, README.md          results; model card draft (nfnet_zoo.write_model_card)
  state/                           the resumable state, no pickles (runstate.py; every --save-every steps
                                   and each epoch)

`resolve` turns arguments (or a run to resume) into the settings and the folder, refusing a folder that
holds anything else; `own_run_folder` takes it (one process at a time, runlock.py); the rest write it.
"""
from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from torch import nn

from nfnet_zoo_cli.settings import RESUMABLE, SettingError, flag, validate

from ..data import ImageData, load_image_data
from ..data.hfds import is_hub_id, parse_hub_id
from ..errors import NFNetZooError
from ..files import CURVES, write_json_atomic
from ..models.cards import write_model_card
from ..models.load import check_checkpoint
from ..models.shared_config import rewrite_shared
from .recipe import FinetuneConfig, check_timm_names
from .runlock import LOCK, RunLock
from .runstate import state_dir

if TYPE_CHECKING:
    from .progress import Progress


def resolve(config: Optional[FinetuneConfig], resume: Optional[str], overrides: dict[str, Any]
             ) -> tuple[FinetuneConfig, Path, bool]:
    if resume:
        run = Path(resume).expanduser()
        if not (run / "args.json").is_file():
            raise NFNetZooError(f"{run} is not a fine-tuning run (no args.json); pass the RUN folder written by "
                                f"`nfnet-zoo finetune --output RUN`, or start a new run without --resume")
        if state_dir(run) is None:  # the same command starts it again: see restartable
            raise NFNetZooError(f"{run} has no saved state yet (it stopped before its first save); start it again "
                                f"with the same command (its arguments are in {run}/args.json)")
        _check_settings(overrides)
        try:
            saved = json.loads((run / "args.json").read_text(encoding="utf-8"))
            if not isinstance(saved, dict):
                raise ValueError("not a JSON object")
            cfg = FinetuneConfig.from_json(saved)
            _check_config(cfg)
        except (ValueError, TypeError, UnicodeDecodeError, NFNetZooError) as e:
            raise NFNetZooError(f"{run}/args.json is damaged or foreign ({str(e).splitlines()[0][:120]}); restore "
                                f"it, or start a new run") from None
        if cfg.checkpoint and cfg.model_args is None:  # a run of an older nfnet-zoo: rebuilt from the checkpoint
            check_checkpoint(cfg.checkpoint)
        changed = sorted(k for k, v in overrides.items() if k not in RESUMABLE and k != "output"
                         and getattr(cfg, k, None) != v)
        if changed:
            raise NFNetZooError(f"cannot change {', '.join(map(flag, changed))} when "
                                f"resuming (they are fixed in {run}/args.json); start a new run to change them")
        for k in RESUMABLE & overrides.keys():
            setattr(cfg, k, overrides[k])
        _check_together(cfg)
        cfg.output = str(run)
        return cfg, run, True
    cfg = config or FinetuneConfig()
    unknown = set(overrides) - set(FinetuneConfig.__dataclass_fields__)
    if unknown:
        raise TypeError(f"finetune() got unknown arguments {sorted(unknown)}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    _check_config(cfg)
    if cfg.checkpoint:
        check_checkpoint(cfg.checkpoint)
    if cfg.output is None:
        name = (parse_hub_id(cfg.data_dir).name.rpartition("/")[2] if is_hub_id(cfg.data_dir)  # no : or @ in it
                else Path(cfg.data_dir).name or "data")
        base = Path("runs") / f"{(cfg.model or 'checkpoint').replace('/', '_')}-{name}"
        run, i = base, 1
        while run.exists():
            i += 1
            run = base.with_name(f"{base.name}-{i}")
        cfg.output = str(run)
    run = Path(cfg.output).expanduser()
    if state_dir(run) is not None:
        raise NFNetZooError(f"{run} already holds a run; continue it with --resume {run}, or pass another --output")
    if run.exists() and (not run.is_dir() or not restartable(run)):
        raise NFNetZooError(f"--output {run} exists and is not empty; pass a new folder (nothing is overwritten)")
    return cfg, run, False


# What a run writes before its first saved state; a folder holding only these is started again by the same
# command (and `--resume` says so): the arguments and file list, temporary files a kill left, and, once
# args.json is there, the exports of an epoch whose state a kill prevented.
_RUN_START = ("args.json", "data.json", ".args.json.*.tmp", ".data.json.*.tmp", "state.tmp", "logs",
              ".shared-*", LOCK)  # the shared-folder probe, if a kill came before its removal


_RUN_EXPORTS = ("model.safetensors", "config.json", "last", "metrics.jsonl", ".metrics.jsonl.*.tmp", ".export-*",
                CURVES, f".{CURVES}.*.tmp")


def restartable(run: Path) -> bool:
    names = [p.name for p in run.iterdir()]
    allowed = _RUN_START + (_RUN_EXPORTS if "args.json" in names else ())
    return all(any(fnmatch.fnmatchcase(n, pattern) for pattern in allowed) for n in names)


def _check_config(cfg: FinetuneConfig) -> None:
    if not isinstance(cfg.data_dir, str) or not cfg.data_dir:
        raise NFNetZooError("no data: pass --data-dir DIR with DIR/<class>/<image> (or DIR/train and DIR/val)")
    if not isinstance(cfg.model or cfg.checkpoint, str):
        raise NFNetZooError("no model: pass --model NAME (e.g. nfnet_f0), or --checkpoint RUN of an earlier run")
    if cfg.model_args is not None and not (isinstance(cfg.model_args, dict) and isinstance(cfg.model, str)):
        raise NFNetZooError("model_args must be a JSON object beside the model's name")
    _check_settings(cfg.to_json())
    _check_together(cfg)
    check_timm_names(cfg)


def _check_together(cfg: FinetuneConfig) -> None:
    """What one setting's declaration cannot check: its value against another's."""
    if cfg.freeze_epochs > cfg.epochs:
        raise NFNetZooError(f"--freeze-epochs {cfg.freeze_epochs} is more than --epochs {cfg.epochs}; pass --epochs "
                            f"{cfg.freeze_epochs} or more, or --freeze-epochs {cfg.epochs} or fewer (equal: a linear "
                            f"probe) in a new run")


def _check_settings(values: dict[str, Any]) -> None:
    """The settings' declared ranges and choices (nfnet_zoo_cli.settings.validate), as our one-line error."""
    try:
        validate(values)
    except SettingError as e:
        raise NFNetZooError(str(e)) from None


def load_data(run: Path, resuming: bool) -> ImageData:
    try:
        return ImageData.load(run / "data.json")
    except FileNotFoundError:
        problem = "is missing"
    except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError) as e:
        problem = f"is damaged or foreign ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})"
    fix = (f"restore it, or start a new run with the same arguments ({run}/args.json) and another --output"
           if resuming else "run the command again")
    raise NFNetZooError(f"{run}/data.json {problem}; {fix}")


def save_model_folder(model: nn.Module, dest: Path, label_names: list[str], model_args: dict, eval_size: int,
                       notes: list[str]) -> None:
    """timm's save_for_hf into a temp folder beside `dest`, config.json in the shared form (shared_config.py:
    loadable by plain timm and transformers, evaluated at `eval_size`), then os.replace file by file."""
    from timm.models import save_for_hf
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=dest.parent if dest.name == "last" else dest))
    try:
        # safetensors wants contiguous tensors: a channels_last model is exported in the default layout
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        with _swapped(model, "state_dict", lambda *a, **k: state):
            save_for_hf(model, str(tmp), model_config={"label_names": list(label_names)},
                        model_args=model_args, safe_serialization=True)
        rewrite_shared(tmp / "config.json", eval_size=eval_size, notes=notes)
        for name in ("model.safetensors", "config.json"):
            os.replace(tmp / name, dest / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _swapped(model: nn.Module, name: str, value):
    original = getattr(model, name)
    setattr(model, name, value)
    try:
        yield
    finally:
        setattr(model, name, original)


# Folders finetune writes into: a link there would have it write into whatever folder the link points at.
_RUN_FOLDERS = ("last", "state", "state.old", "state.tmp", "logs")


def own_run_folder(accelerator, run: Path, resuming: bool, lock: RunLock) -> None:
    """The main process refuses a folder finetune would write into that is a link, creates RUN and takes its lock
    (runlock.py), then checks again what resolve checked (another run may have started there meanwhile); every
    process raises the same one-line refusal."""
    problem = None
    if accelerator.is_main_process:
        link = next((run / n for n in _RUN_FOLDERS if (run / n).is_symlink()), None)
        if link is not None:
            problem = (f"{link} is a link (to {os.readlink(link)}); finetune writes only into folders of the run "
                       f"itself, never through a link: remove the link (or replace it with a copy of the folder)")
        else:
            run.mkdir(parents=True, exist_ok=True)
            problem = lock.acquire()
        if problem is None and not resuming and (state_dir(run) is not None or not restartable(run)):
            problem = (f"{run} was filled by another run while this one started; continue that one with --resume "
                       f"{run}, or pass another --output")
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list
        problem = broadcast_object_list([problem])[0]
    if problem is not None:
        raise NFNetZooError(problem)


def require_shared_run_folder(accelerator, run: Path) -> None:
    """All processes read RUN (data.json, the saved state): on machines without a shared filesystem,
    refuse at the start rather than fail at the first resume."""
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import broadcast_object_list, gather_object
    token = broadcast_object_list([os.urandom(8).hex() if accelerator.is_main_process else None])[0]
    probe = run / f".shared-{token}"
    if accelerator.is_main_process:
        probe.write_text(token)
    accelerator.wait_for_everyone()
    try:
        seen = probe.read_text() == token
    except OSError:
        seen = False
    shared = all(gather_object([seen]))  # every process has read the probe after this
    if accelerator.is_main_process:
        probe.unlink(missing_ok=True)
    if not shared:
        raise NFNetZooError(f"the run folder {run} is not shared by all processes (a process on another machine "
                            f"cannot read what this one writes there); put --output on a filesystem every machine "
                            f"mounts (NFS, Lustre, ...)")


def origin(cfg: FinetuneConfig) -> str:
    """Where the weights of this run come from, for config.json's notes (not the starting weights' own notes)."""
    if cfg.checkpoint:
        return f"fine-tuned with nfnet-zoo from the local weights {Path(cfg.checkpoint).name}"
    if cfg.base_model:
        return f"fine-tuned with nfnet-zoo from {cfg.base_model}"
    return "trained from scratch with nfnet-zoo"


def image_data(cfg: FinetuneConfig, run: Path, resuming: bool, accelerator) -> ImageData:
    """Every process scans the folder and checks its share of the images (results gathered); the main process
    writes RUN/data.json, which a resumed run reads."""
    require_shared_run_folder(accelerator, run)
    if resuming:
        data = load_data(run, resuming)
    else:
        from accelerate.utils import gather_object
        from ..data.shards import shard_root
        accelerator.print(f"reading the shards of {cfg.data_dir} (streamed: images are not checked at the start) ..."
                          if shard_root(cfg.data_dir) else f"checking images in {cfg.data_dir} ({cfg.check_images}) ...")
        data = load_image_data(cfg.data_dir, cfg.val_split, cfg.bad_images, cfg.workers, cfg.check_images,
                               accelerator.process_index, accelerator.num_processes, gather_object,
                               cfg.input_key, cfg.target_key)
        if accelerator.is_main_process:
            data.save(run / "data.json")
    cfg.dataset = data.name
    return data


def saved_epoch(run: Path) -> str:
    try:
        rows = (run / "metrics.jsonl").read_text().splitlines()
        return f"end of {len(rows)}" if rows else "1, mid-epoch"
    except OSError:
        return "?"


def _summary_table(history: list[dict], best_epoch: Optional[int]) -> str:
    cols = [("epoch", "{:d}"), ("train_loss", "{:.4f}"), ("val_loss", "{:.4f}"), ("top1", "{:.2f}"),
            ("top5", "{:.2f}"), ("lr", "{:.2e}"), ("images_per_sec", "{:.1f}"), ("clipped_fraction", "{:.3f}")]
    heads = ["epoch", "train loss", "val loss", "top-1", "top-5", "lr", "img/s", "clipped"]
    cells = [[("-" if r.get(k) is None else f.format(r[k])) + (" *" if k == "epoch" and r["epoch"] == best_epoch
                                                               else "") for k, f in cols] for r in history]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))
    return "\n".join([line(heads), line(["-" * w for w in widths]), *map(line, cells)])


def finish(cfg: FinetuneConfig, run: Path, data: ImageData, progress: Progress, img_size: int,
           early: Optional[str] = None) -> None:
    """summary.json, the model card and the closing lines; `early`: why --patience stopped the run, if it did."""
    best = progress.best or {}
    stopped = f"early at epoch {progress.epoch} of {cfg.epochs}: {early}" if early else f"after --epochs {cfg.epochs}"
    summary = {"best_epoch": best.get("epoch"), "top1": best.get("top1"), "top5": best.get("top5"),
               "val_loss": best.get("val_loss"), "per_class": best.get("per_class"), "num_train": data.num_train,
               "num_val": data.num_val,
               "num_classes": len(data.classes), "label_names": data.classes, "model": cfg.model,
               "base_model": cfg.base_model, "img_size": img_size, "train_time_s": round(progress.train_time, 1),
               "epochs_trained": progress.epoch, "stopped": stopped}
    write_json_atomic(run / "summary.json", summary)
    write_model_card(run)
    print(_summary_table(progress.history, best.get("epoch")))
    if early:
        print(f"stopped {stopped}")
    top1 = "-" if best.get("top1") is None else f"{best['top1']:.2f}%"
    print(f"best epoch {best.get('epoch')}: val top-1 {top1}; model in {run} "
          f"(nfnet_zoo.load_model('{run}'), or timm.create_model('local-dir:{run}', pretrained=True))")


__all__ = ["resolve", "restartable", "load_data", "save_model_folder", "own_run_folder", "require_shared_run_folder",
           "origin", "image_data", "saved_epoch", "finish"]
