"""Every setting of `nfnet-zoo finetune`, declared once.

Each field of `FinetuneConfig` carries its default and, in its metadata, its help, its range or choices (or why
it is free-form), whether `--resume` may change it, and what argparse needs beyond that. Made from these:
- `add_finetune_arguments`: the flags of `nfnet-zoo finetune`;
- `validate`: the one check of a value, for the command line (through `nfnet_zoo.finetune`), the Python API
  and a resumed run's args.json alike;
- `RESUMABLE` and `--resume`'s help, which lists it;
- `markdown_table`: README's table of the flags (tests/test_settings.py holds the README to it).

To add a flag to `nfnet-zoo finetune`: add a field with `setting(...)` to FinetuneConfig (its default, help, group,
and a range, choices, on/off, or what it is if free-form; `resumable=True` only if it changes how a run runs, not
what it computes), read `cfg.<name>` where the run uses it (nfnet_zoo/training/recipe.py or finetune.py), and
paste the new `markdown_table()` into README (tests/test_settings.py says so when it differs).

Pure Python (stdlib only): `nfnet-zoo --help` and usage errors read this module before anything imports torch.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional


class SettingError(ValueError):
    """A value outside its declaration; the message starts with the flag (nfnet_zoo raises it as NFNetZooError)."""


@dataclass(frozen=True)
class Range:
    """A finite number of `kind` in [lo, hi] (an end in `open` is excluded); None is allowed if `optional`."""

    kind: type
    lo: float
    hi: float
    open: str = ""            # "lo", "hi" or "lo hi"
    optional: bool = False

    def describe(self, article: bool = True) -> str:
        what = "an integer" if self.kind is int else "a number"
        what = what if article else what.split()[1]
        lo, hi = (str(int(v)) if float(v).is_integer() else f"{v:g}" for v in (self.lo, self.hi))
        return f"{what} in {'(' if 'lo' in self.open else '['}{lo}, {hi}{')' if 'hi' in self.open else ']'}"

    def problem(self, value: Any) -> Optional[str]:
        if value is None and self.optional:
            return None
        ok_type = isinstance(value, int) if self.kind is int else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type or not math.isfinite(value):
            return f"must be {self.describe()}, got {value!r}"
        if value < self.lo or value > self.hi or ("lo" in self.open and value == self.lo) or (
                "hi" in self.open and value == self.hi):
            return f"must be {self.describe()}, got {value!r}"
        return None


# Choices, here because the command line offers them; the package imports them from here.
MIXED_PRECISION = ("no", "bf16", "fp16")
BAD_IMAGES = ("skip", "error")
# --check-images: decode every image, read headers and end markers only, or check nothing (data/image_check.py)
CHECK_LEVELS = ("full", "header", "none")
# timm's schedules that are functions of the update count: exact on resume, stepped per update.
# Not "plateau" (per epoch, on a metric, with state of its own; deprecated in timm) nor "none".
# --class-balance: off, class-weighted loss, class-balanced sampler (nfnet_zoo/training/balance.py)
CLASS_BALANCE = ("none", "loss", "sampler")
SCHEDULES = ("cosine", "tanh", "step", "multistep", "poly", "wsd", "rsqrt", "constant")


@dataclass(frozen=True)
class Setting:
    """What FinetuneConfig's field metadata says of one setting (see `setting`)."""

    help: str
    group: str
    within: Optional[Range] = None      # a number in a range
    choices: tuple = ()                 # one of these strings
    switch: bool = False                # on or off (None too where the default is None)
    free: str = ""                      # free-form: what it is (checked where it is used: a path, a timm name)
    check: Optional[Callable[[Any], Optional[str]]] = None  # a value of several numbers: its own check ...
    values: str = ""                    # ... and what it takes, in words
    resumable: bool = False             # --resume may change it
    shown: Optional[str] = None         # the default as --help says it; "{}" is the value (None: the value itself)
    machine: bool = False               # the default depends on the machine: --help adds ": N here"
    short: Optional[str] = None         # argparse: -b, -j
    action: Any = None                  # argparse: store_true, BooleanOptionalAction
    type: Optional[Callable[[str], Any]] = None  # argparse: where `within` gives none
    nargs: Any = None
    const: Any = None
    metavar: Any = None


def setting(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, **declaration: Any
            ) -> Any:
    """A FinetuneConfig field with its declaration (Setting's fields) in its metadata."""
    return field(default=default, default_factory=default_factory, metadata={"setting": Setting(**declaration)})


def recorded(about: str) -> Any:
    """A field the run fills in when it starts (args.json records it); no flag sets it."""
    return field(default=None, metadata={"recorded": about})


def default_workers(most: int = 4) -> int:
    """Data loading processes by default: `most`, or fewer where fewer CPUs are available to this process
    (more would only contend, and torch's DataLoader warns about them)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity (macOS, Windows)
        cpus = os.cpu_count() or 1
    return max(1, min(most, cpus))


def key_value(text: str) -> tuple[str, object]:
    """argparse type of KEY=VALUE: VALUE as a Python literal where it is one, else the string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


_EPOCHS = Range(int, 1, 100_000)
_BATCH = Range(int, 1, 65_536)
_WORKERS = Range(int, 0, 1024)
_AREA = Range(float, 0, 1, open="lo")


def _epochs(value: Any) -> Optional[str]:
    items = value if isinstance(value, (list, tuple)) and value else [value]
    wrong = next((p for p in map(_EPOCHS.problem, items) if p), None)
    return f"takes epochs; each {wrong}" if wrong else None


def _area_range(value: Any) -> Optional[str]:
    pair = tuple(value) if isinstance(value, (tuple, list)) else ()
    if len(pair) == 2 and not any(map(_AREA.problem, pair)) and pair[0] <= pair[1]:
        return None
    return f"must be MIN MAX with 0 < MIN <= MAX <= 1, got {' '.join(map(repr, pair)) or repr(value)}"


MODEL_DATA = "model and data"
RECIPE = "recipe (timm train.py names)"
TIMM = "timm's augmentation, optimizers and schedules (timm train.py names)"
RUNNING = "running"
_SIZE = Range(int, 8, 8192, optional=True)
_FRACTION = Range(float, 0, 1, open="hi")
_RATE = Range(float, 0, 1, open="hi", optional=True)
_PAPER = "{}, the paper's"


@dataclass
class FinetuneConfig:
    """Resolved arguments of one fine-tuning run (stored as RUN/args.json); the defaults are the recipe of
    nfnet_zoo/training/recipe.py."""

    model: Optional[str] = setting(
        None, group=MODEL_DATA, free="a registered model name", shown="the architecture of --checkpoint",
        help="registered model name, e.g. nfnet_f0")
    data_dir: Optional[str] = setting(
        None, group=MODEL_DATA, free="a folder, file or hfds/NAME",
        help="images: DIR/<class>/*, DIR/train + DIR/val (or validation), a datasets.save_to_disk folder, parquet or "
        "arrow files in the Hub's layout (DIR/data/train-*.parquet), an image folder with metadata.csv or "
        "metadata.jsonl, a CSV file of path and label, a Hub dataset hfds/NAME[:CONFIG][@REVISION] (read at the "
        "revision's commit, which a resume reads again), or WebDataset shards: wds/DIR (timm's, with _info.json) or a "
        "folder of .tar shards (train-000000.tar ..., val-*.tar), streamed")
    input_key: Optional[str] = setting(
        None, group=MODEL_DATA, free="a column name", shown="the Image (or file_name) column",
        help="the column holding the images, for datasets, parquet and CSV sources, or the member of a WebDataset "
        "sample, e.g. jpg (timm's --input-key)")
    target_key: Optional[str] = setting(
        None, group=MODEL_DATA, free="a column name", shown="the one label column",
        help="the column holding the labels, for datasets, parquet and CSV sources (timm's --target-key); needed "
        "when there are several; for WebDataset shards the label member, default cls")
    output: Optional[str] = setting(
        None, group=MODEL_DATA, free="a folder", shown="runs/MODEL-DATASET", help="run folder to create")
    epochs: int = setting(
        10, group=RECIPE, within=_EPOCHS, resumable=True, help="epochs")
    batch_size: int = setting(  # global batch = batch_size * processes * grad_accum_steps
        32, group=RECIPE, within=_BATCH, short="-b", help="batch size per process")
    lr: Optional[float] = setting(
        None, group=RECIPE, within=Range(float, 0, 100, open="lo", optional=True),
        shown="--lr-base x global batch / 256", help="learning rate")
    lr_base: float = setting(
        0.1, group=RECIPE, within=Range(float, 0, 100, open="lo"), shown=_PAPER, help="learning rate per 256 images")
    momentum: float = setting(
        0.9, group=RECIPE, within=_FRACTION, help="Nesterov momentum")
    weight_decay: float = setting(
        2e-5, group=RECIPE, within=Range(float, 0, 1), shown=_PAPER,
        help="weight decay, not on gains, skip gains and biases")
    freeze_epochs: int = setting(
        0, group=RECIPE, within=Range(int, 0, 100_000),
        help="epochs at the start in which only the classifier trains (the backbone's weights stay bit for bit; "
        "equal to --epochs: a linear probe), 0 = off; as fastai's fine_tune, the frozen epochs and the rest each "
        "get their own warmup and --sched schedule; at most --epochs")
    warmup_epochs: float = setting(
        1.0, group=RECIPE, within=Range(float, 0, 100_000), help="linear warmup epochs")
    warmup_lr: float = setting(
        0.0, group=RECIPE, within=Range(float, 0, 100), help="learning rate warmup starts at")
    min_lr: float = setting(
        0.0, group=RECIPE, within=Range(float, 0, 100), help="learning rate the schedule ends at")
    layer_decay: Optional[float] = setting(
        None, group=RECIPE, within=Range(float, 0, 1, open="lo", optional=True), shown="off",
        help="layer-wise learning-rate decay (timm's): the classifier trains at the learning rate, each block below "
        "it (the final conv with the last block) at this factor times the one above, the stem lowest (timm's "
        "param_groups_layer_decay over the model's group_matcher); weight decay and AGC apply as without it")
    smoothing: float = setting(
        0.1, group=RECIPE, within=_FRACTION, help="label smoothing")
    class_balance: str = setting(
        "none", group=RECIPE, choices=CLASS_BALANCE,
        help="unequal classes: loss weights each class by N / (K x its count) (label smoothing, mixup and cutmix "
        "targets included); sampler draws each epoch's N images with replacement, every class equally often")
    mixup: float = setting(
        0.0, group=RECIPE, within=Range(float, 0, 1000), help="mixup alpha, 0 = off")
    cutmix: float = setting(
        0.0, group=RECIPE, within=Range(float, 0, 1000), help="cutmix alpha, 0 = off")
    drop: Optional[float] = setting(
        None, group=RECIPE, within=_RATE, shown="the variant's", help="dropout before the classifier")
    drop_path: Optional[float] = setting(
        None, group=RECIPE, within=_RATE, shown="the variant's", help="stochastic depth rate of the last block")
    patience: int = setting(
        0, group=RECIPE, within=Range(int, 0, 100_000), resumable=True,
        help="stop when val top-1 has not improved for this many epochs, 0 = off; the run then ends as a complete "
        "one (best and last models, card, summary.json's stopped), and --resume of it trains no further unless "
        "given a larger --patience (or 0); no effect without a val split")
    model_ema: bool = setting(
        False, group=RECIPE, switch=True, action="store_true",
        help="keep an EMA of the weights (timm ModelEmaV3); it is the one validated and exported")
    model_ema_decay: float = setting(
        0.9998, group=RECIPE, within=Range(float, 0, 1), help="EMA decay")
    clipping: float = setting(
        0.01, group=RECIPE, within=Range(float, 0, 1000), shown=_PAPER,
        help="AGC lambda on every parameter but the classifier weight, 0 = off")
    sam: float = setting(
        0.0, group=RECIPE, within=Range(float, 0, 10),
        help="sharpness-aware minimisation radius rho (Foret et al.; the paper's F6 + SAM used it), 0 = off; e.g. "
        "0.05. Each optimizer step also takes an ascent step, on --sam-fraction of its first micro-batch, per process")
    sam_fraction: float = setting(
        0.2, group=RECIPE, within=Range(float, 0, 1, open="lo"),
        help="fraction of the batch SAM's ascent gradient is computed on (the paper's cheaper form; 1 = Foret et "
        "al.'s)")
    img_size: Optional[int] = setting(
        None, group=RECIPE, within=_SIZE, shown="the variant's train size",
        help="training image size; evaluation uses the variant's test size, scaled alike")
    test_img_size: Optional[int] = setting(
        None, group=RECIPE, within=_SIZE, shown="see --img-size", help="evaluation image size")
    hflip: float = setting(
        0.5, group=RECIPE, within=Range(float, 0, 1), help="horizontal flip probability")
    scale: tuple[float, float] = setting(
        (0.08, 1.0), group=RECIPE, check=_area_range, values="MIN MAX: 0 < MIN <= MAX <= 1", type=float, nargs=2, metavar=("MIN", "MAX"),
        help="random-resized-crop area range")
    # timm's own pieces by name, as timm's train.py takes them
    aa: Optional[str] = setting(
        None, group=TIMM, free="a timm augmentation policy", metavar="POLICY", shown="none",
        help="auto-augment policy in timm's syntax, e.g. rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, v0; `deepmind`: the "
        "variant's RandAugment as DeepMind trained it from scratch (F0 rand-n4-m5, F1-F2 rand-n4-m10, F3-F7 "
        "rand-n4-m15-mmax15); fine-tuning a pretrained model for a few epochs on a small dataset does best with "
        "light augmentation; use it when training from scratch (--no-pretrained)")
    opt: str = setting(
        "sgd", group=TIMM, free="a timm optimizer name", metavar="NAME",
        help="optimizer by timm's name (timm.optim.list_optimizers()): sgd is SGD with Nesterov momentum (the "
        "paper's), adamw, lamb, lion, ...; DeepMind's weight-decay groups and AGC apply to every one; --lr-base is "
        "the SGD rate: give --lr for others")
    opt_kwargs: dict[str, Any] = setting(
        default_factory=dict, group=TIMM, free="KEY=VALUE pairs", type=key_value, nargs="+", metavar="KEY=VALUE",
        shown="none", help="further optimizer arguments, e.g. betas=(0.9,0.99) eps=1e-6")
    sched: str = setting(
        "cosine", group=TIMM, choices=SCHEDULES,
        help="learning-rate schedule by timm's name, after the linear warmup, updated every optimizer step")
    decay_epochs: float = setting(
        90, group=TIMM, within=Range(float, 0, 100_000, open="lo"), help="step: epochs between decays (timm's)")
    decay_milestones: list[int] = setting(
        default_factory=lambda: [90, 180, 270], group=TIMM, check=_epochs, values=f"one or more, each {_EPOCHS.describe(False)}", type=int, nargs="+", metavar="EPOCH",
        help="multistep: epochs to decay at (timm's)")
    decay_rate: float = setting(
        0.1, group=TIMM, within=Range(float, 0, 1000, open="lo"),
        help="step, multistep: lr factor at each decay; poly: the power")
    torchcompile: Optional[str] = setting(
        None, group=RUNNING, free="a torch.compile backend", nargs="?", const="inductor", metavar="BACKEND",
        shown="eager", help="compile the training model with torch.compile (timm's flag; BACKEND without a value: "
        "inductor); the first steps are slower while it compiles")
    grad_accum_steps: int = setting(
        1, group=RUNNING, within=Range(int, 1, 65_536), help="micro-batches per optimizer step")
    grad_checkpointing: bool = setting(
        False, group=RUNNING, switch=True, action="store_true", resumable=True,
        help="recompute each stage's activations in the backward pass instead of keeping them (timm's flag): less "
        "memory for a second forward pass of each stage, the same result")
    channels_last: bool = setting(
        False, group=RUNNING, switch=True, action="store_true", help="channels-last memory layout (faster on GPUs)")
    seed: int = setting(
        42, group=RECIPE, within=Range(int, 0, 2 ** 32 - 1),  # numpy's seeds are 32-bit
        help="seed of initialisation, shuffle and augmentation")
    workers: int = setting(
        default_factory=default_workers, group=RUNNING, within=_WORKERS, resumable=True, short="-j",
        shown="4, or the CPUs available if fewer", machine=True, help="data loading processes per training process")
    pretrained: Optional[bool] = setting(
        None, group=MODEL_DATA, switch=True, action=argparse.BooleanOptionalAction, shown="yes where they exist",
        help="start from the variant's released weights")
    checkpoint: Optional[str] = setting(
        None, group=MODEL_DATA, free="a run folder or .safetensors file", metavar="PATH",
        help="start from local weights: a run folder or a .safetensors file")
    model_kwargs: dict[str, Any] = setting(
        default_factory=dict, group=MODEL_DATA, free="KEY=VALUE pairs", type=key_value, nargs="+",
        metavar="KEY=VALUE", shown="none",
        help="architecture overrides passed to timm.create_model, e.g. widths=(32,64,128,256)")
    mixed_precision: str = setting(
        "no", group=RUNNING, choices=MIXED_PRECISION,
        help="autocast dtype; fp16 (with loss scaling) needs a GPU, bf16 runs on CPUs too")
    cpu: bool = setting(
        False, group=RUNNING, switch=True, action="store_true", resumable=True,
        help="train on the CPU even if a GPU is present")
    val_split: float = setting(
        0.1, group=MODEL_DATA, within=_FRACTION,
        help="fraction of each class held out for validation when DIR has no val/ folder (fixed split)")
    report_to: Optional[str] = setting(
        None, group=RUNNING, free="an Accelerate tracker name", resumable=True, metavar="TRACKER", shown="none",
        help="Accelerate tracker for curves: tensorboard, wandb, mlflow, ... or all")
    bad_images: str = setting(
        "skip", group=MODEL_DATA, choices=BAD_IMAGES, resumable=True,
        help="corrupt, truncated or unreadable image files: leave them out with a warning (skip) or stop (error)")
    check_images: str = setting(
        "full", group=MODEL_DATA, choices=CHECK_LEVELS, resumable=True,
        help="before training, full: decode every image; header: read headers and end markers only (for very "
        "large sets; catches non-images and truncated JPEG/PNG files, not damage inside the data); none: no check, "
        "as timm's train.py. Each process checks its share; results are remembered for unchanged files (in "
        "$NFNET_ZOO_CACHE, default $HF_HOME/nfnet-zoo)")
    save_every: int = setting(
        500, group=RUNNING, within=Range(int, 0, 10 ** 12), resumable=True,
        help="optimizer steps between resumable state saves, besides each epoch's end; 0 = epochs only")
    log_interval: int = setting(
        10, group=RUNNING, within=Range(int, 1, 10 ** 12), resumable=True, help="steps between progress updates")
    # filled in when the run starts
    base_model: Optional[str] = recorded("the Hub repo of the pretrained weights the run started from")
    dataset: Optional[str] = recorded("the data's name")
    model_args: Optional[dict[str, Any]] = recorded(
        "what built the architecture (--model-kwargs and --checkpoint's config.json): --resume rebuilds from "
        "these, never from files elsewhere that may have changed since")

    def global_batch(self, num_processes: int) -> int:
        return self.batch_size * num_processes * self.grad_accum_steps

    def resolved_lr(self, num_processes: int) -> float:
        return self.lr if self.lr is not None else self.lr_base * self.global_batch(num_processes) / 256

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["scale"] = list(self.scale)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "FinetuneConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if "scale" in d:
            d["scale"] = tuple(d["scale"])
        return cls(**d)


SETTINGS: dict[str, Setting] = {f.name: f.metadata["setting"] for f in dataclasses.fields(FinetuneConfig)
                                if "setting" in f.metadata}
# What --resume may change: how a run runs, not what it computes (plus a longer schedule).
RESUMABLE = frozenset(name for name, s in SETTINGS.items() if s.resumable)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def default_of(name: str) -> Any:
    """The default of one FinetuneConfig field."""
    f = FinetuneConfig.__dataclass_fields__[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


# --- validation ----------------------------------------------------------------------------------------------
def problem(name: str, value: Any) -> Optional[str]:
    """What is wrong with `value` for the setting `name` (after its flag), or None."""
    s = SETTINGS[name]
    if s.check:
        return s.check(value)
    if s.within:
        return s.within.problem(value)
    if s.choices and value not in s.choices:
        return f"must be one of {', '.join(s.choices)}, got {value!r}"
    if s.switch and not isinstance(value, bool) and not (value is None and default_of(name) is None):
        return f"must be true or false, got {value!r}"
    return None


def validate(values: Mapping[str, Any]) -> None:
    """Raise SettingError on the first value outside its declaration. The one check of the command line (through
    nfnet_zoo.finetune), the Python API and a resumed run's args.json; names not declared here are left alone."""
    for name, value in values.items():
        wrong = problem(name, value) if name in SETTINGS else None
        if wrong:
            raise SettingError(f"{flag(name)} {wrong}")


# --- the command line ----------------------------------------------------------------------------------------
def _show(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def shown_default(name: str, here: bool = True) -> Optional[str]:
    """The default as --help and README say it (None: not said, as for an off switch); `here`: with this machine's
    value where it depends on the machine."""
    s, value = SETTINGS[name], default_of(name)
    if s.shown is None:
        return None if value is None or s.action == "store_true" else _show(value)
    return s.shown.format(_show(value)) + (f": {value} here" if s.machine and here else "")


def resume_help() -> str:
    names = [flag(n) for n in SETTINGS if n in RESUMABLE]
    return (f"continue RUN (default: --output) from its last saved state with its saved arguments; only "
            f"{', '.join(names[:-1])} and {names[-1]} may change (--epochs N: the schedule is stretched to end at "
            f"epoch N)")


def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    """Every setting as a flag, in its group, plus --resume. The parser should have argument_default SUPPRESS:
    only the flags given reach finetune() (the others keep their defaults, or a resumed run's values)."""
    groups: dict[str, Any] = {}
    for name, s in SETTINGS.items():
        if s.group not in groups:
            groups[s.group] = parser.add_argument_group(s.group)
        said = shown_default(name)
        kwargs = {"help": (s.help + (f" (default: {said})" if said else "")).replace("%", "%%")}
        if s.action:
            kwargs["action"] = s.action
        else:
            kwargs["type"] = s.type or (s.within.kind if s.within else None)
        if s.choices:
            kwargs["choices"] = s.choices
        kwargs.update({k: getattr(s, k) for k in ("nargs", "const", "metavar") if getattr(s, k) is not None})
        groups[s.group].add_argument(*([s.short] if s.short else []), flag(name), **kwargs)
    groups[RUNNING].add_argument("--resume", nargs="?", const="", metavar="RUN", help=resume_help())


def finetune_options(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line, as FinetuneConfig holds them (KEY=VALUE pairs as a dict, a pair of
    numbers as a tuple)."""
    options = {k: v for k, v in vars(args).items() if k in SETTINGS}
    for name, value in options.items():
        if SETTINGS[name].type is key_value:
            options[name] = dict(value)
        elif isinstance(default_of(name), tuple):
            options[name] = tuple(value)
    return options


def markdown_table() -> str:
    """README's table of the flags of `nfnet-zoo finetune`."""
    rows = ["| Flag | Default | Values | `--resume` may change | What it sets |", "|---|---|---|---|---|"]
    for name, s in SETTINGS.items():
        names = [s.short] if s.short else []
        names += [flag(name)] + ([f"--no-{name.replace('_', '-')}"] if s.action is argparse.BooleanOptionalAction
                                 else [])
        if s.within:
            values = s.within.describe(article=False)
        elif s.choices:
            values = ", ".join(f"`{c}`" for c in s.choices)
        elif s.switch:
            values = "on / off"
        else:
            values = s.values or s.free
        off = "off" if s.action == "store_true" else ""
        cells = [", ".join(f"`{n}`" for n in names), shown_default(name, here=False) or off, values,
                 "yes" if s.resumable else "", s.help]
        rows.append("| " + " | ".join(c.replace("|", "\\|").replace("<", "&lt;") for c in cells) + " |")
    return "\n".join(rows) + "\n"


# --- the other commands' numeric flags -----------------------------------------------------------------------
OTHER: dict[str, Range] = {
    "alpha": Range(float, 0, 10, open="lo"),    # convert/publish: the residual scaling alpha
    "batch_size": _BATCH,                       # evaluate, predict
    "workers": _WORKERS,                        # evaluate, predict, demo
    "topk": Range(int, 1, 1_000_000),
    "image_size": Range(int, 1, 4096),          # export: pixels (load.py's _MAX_SIZE bounds a config's sizes alike)
}


def argtype(name: str) -> Callable[[str], Any]:
    """An argparse type for the numeric flag `name` of a command other than finetune."""
    r = OTHER[name]

    def parse(text: str) -> Any:
        try:
            value = r.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {r.describe()}, got {text!r}") from None
        wrong = r.problem(value)
        if wrong:
            raise argparse.ArgumentTypeError(wrong)
        return value
    return parse


__all__ = ["FinetuneConfig", "Setting", "SettingError", "Range", "SETTINGS", "RESUMABLE", "OTHER", "MIXED_PRECISION",
           "BAD_IMAGES", "CHECK_LEVELS", "SCHEDULES", "CLASS_BALANCE", "setting", "recorded", "default_workers", "default_of", "flag",
           "problem", "validate", "shown_default", "resume_help", "add_finetune_arguments", "finetune_options",
           "markdown_table", "argtype", "key_value"]
