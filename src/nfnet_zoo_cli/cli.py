"""Command line: argument parsing only; each command calls one public function of nfnet_zoo.

This package imports nothing of nfnet_zoo (whose import loads torch and timm) for `--help`, usage errors or
parsing: each handler imports what it calls, and `main` the error types once the arguments are parsed.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

from .settings import (BAD_IMAGES, CHECK_LEVELS, SETTINGS, add_finetune_arguments, argtype, default_workers, flag,
                       finetune_options)


# --- convert ---------------------------------------------------------------------------------
def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert an official DeepMind checkpoint (F0_haiku.npz ...) into a timm model folder",
        description="Read an official DeepMind NFNet checkpoint safely (no code is executed), infer "
        "its architecture from the tensor shapes, and write DIR/model.safetensors and a timm "
        "DIR/config.json. Load the result with nfnet_zoo.load_model('DIR'), or with "
        "timm.create_model('local-dir:DIR', pretrained=True) (timm's own NFNet where it can express the shape, "
        "else after `import nfnet_zoo`).",
    )
    p.add_argument("src", help="DeepMind checkpoint, e.g. F0_haiku.npz (a dill/pickle file)")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--activation", default="gelu",
                   help="nonlinearity the checkpoint was trained with; shapes cannot reveal it (default: gelu)")
    p.add_argument("--alpha", type=argtype("alpha"), default=0.2,
                   help="residual scaling alpha the checkpoint was trained with (default: 0.2)")
    p.set_defaults(func=_run_convert)


def _run_convert(args: argparse.Namespace) -> None:
    from nfnet_zoo.models.convert import convert_haiku_checkpoint

    out = convert_haiku_checkpoint(args.src, args.out, activation=args.activation, alpha=args.alpha)
    print(f"wrote {out}/model.safetensors and {out}/config.json")


# --- finetune, evaluate, predict, demo ------------------------------------------------------
@contextlib.contextmanager
def _plain_warnings():
    # warnings from data checks are messages for the user: one line each, no source line
    import warnings
    original = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"
    try:
        yield
    finally:
        warnings.formatwarning = original


def _add_finetune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune", help="fine-tune an NFNet (or any timm model) on your images (folders, tables, Hub datasets, "
        "parquet, WebDataset shards), with AGC",
        description="Fine-tune on DIR/<class>/<image> (or DIR/train + DIR/val, a Hugging Face dataset "
        "saved with save_to_disk, parquet files, a CSV, a Hub dataset hfds/NAME or WebDataset shards; see --data-dir) with the paper's recipe adapted to fine-tuning: SGD with Nesterov "
        "momentum 0.9 (--opt: any timm optimizer), lr = --lr-base x global batch / 256, linear warmup then "
        "cosine decay per step (--sched), "
        "weight decay without gains, skip gains and biases, label smoothing, AGC on every parameter but "
        "the classifier weight, the variant's dropout and stochastic depth, DeepMind's evaluation "
        "preprocessing (squash to S+32, centre crop S) at the variant's test size. Runs on CPU, one GPU, "
        "or many GPUs through `accelerate launch` or `torchrun` (several CPU processes: torchrun). Writes RUN/model.safetensors + config.json (best epoch by "
        "val top-1), RUN/last/, metrics.jsonl, curves.png (with matplotlib: the `plots` extra), summary.json, "
        "README.md, args.json and a resumable state.",
        argument_default=argparse.SUPPRESS)
    add_finetune_arguments(p)  # every flag, from FinetuneConfig's declarations (settings.py)
    p.set_defaults(func=_run_finetune)


def _run_finetune(args: argparse.Namespace) -> None:
    from nfnet_zoo.errors import NFNetZooError
    from nfnet_zoo.training.finetune import finetune

    options = finetune_options(args)
    resume = getattr(args, "resume", None)
    if resume == "":
        if "output" not in options:
            raise NFNetZooError("--resume needs the run folder: --resume RUN (or --output RUN --resume)")
        resume = options["output"]
    with _plain_warnings():
        finetune(resume=resume, **options)


def _add_curves(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "curves", help="draw a run's training curves (RUN/curves.png) from its metrics.jsonl",
        description="Draw RUN/curves.png from RUN/metrics.jsonl: loss (train and val), val top-1 and top-5, "
        "the learning rate and the fraction of units AGC clipped, per epoch. `finetune` draws it at the end of "
        "each epoch when matplotlib is installed; this command draws it for a run trained without, or redraws "
        "it. Needs matplotlib: pip install 'nfnet-zoo[plots]'. An existing RUN/curves.png is replaced.")
    p.add_argument("run", metavar="RUN", help="run folder written by `nfnet-zoo finetune`")
    p.set_defaults(func=_run_curves)


def _run_curves(args: argparse.Namespace) -> None:
    from nfnet_zoo.training.curves import write_curves

    print(f"wrote {write_curves(args.run)}")


_TTA = ("also score each image's horizontal mirror and average the two views' class probabilities (test-time "
        "augmentation: twice the compute; for images whose class a mirror keeps, trained with flips as finetune's "
        "--hflip does; not for digits or text)")


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="top-1, top-5 and per-class accuracy of a model on labelled images (any --data-dir source)",
        description="Evaluate MODEL on DIR's val/ (or validation/) folder, or on all of DIR/<class>/* "
        "when it has none, with the model's own evaluation preprocessing. Class folders are matched to "
        "the model's class names. When MODEL is a run folder and DIR the data it was trained on, only "
        "the run's held-out split (RUN/data.json) is scored, and the output says so (a Hub dataset hfds/NAME is "
        "the run's data when its name and config are, read at the run's commit).")
    p.add_argument("model", metavar="MODEL", help="run folder, local-dir:PATH, hf-hub:REPO, or a registered "
                   "name with weights (nfnet_f0)")
    p.add_argument("--data-dir", required=True, help="images, as finetune's --data-dir takes them: a folder "
                   "(DIR/<class>/<image>), a saved dataset, parquet/arrow files, metadata.csv/jsonl, a CSV file, or a "
                   "Hub dataset hfds/NAME[:CONFIG][@REVISION]")
    for name in ("input_key", "target_key"):
        p.add_argument(flag(name), default=None, help=SETTINGS[name].help)
    p.add_argument("-b", "--batch-size", type=argtype("batch_size"), default=64, help="batch size (default: 64)")
    p.add_argument("-j", "--workers", type=argtype("workers"), default=default_workers(),
                   help=f"data loading processes (default: 4, or the CPUs available if fewer: {default_workers()} "
                   "here)")
    p.add_argument("--bad-images", choices=BAD_IMAGES, default="skip",
                   help="unreadable image files: leave out with a warning, or stop (default: skip)")
    p.add_argument("--check-images", choices=CHECK_LEVELS, default="full",
                   help="check before evaluating: decode every image (full), headers only (header), or none "
                   "(default: full)")
    p.add_argument("--tta", action="store_true", help=_TTA)
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> None:
    import json
    from nfnet_zoo.evaluation import evaluate, format_evaluation

    with _plain_warnings():
        result = evaluate(args.model, args.data_dir, batch_size=args.batch_size, workers=args.workers,
                          bad_images=args.bad_images, check_images=args.check_images, input_key=args.input_key,
                          target_key=args.target_key, tta=args.tta)
    print(json.dumps(result, indent=2) if args.json else format_evaluation(result))


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="top-k labels with probabilities for image files, folders, datasets or paths on stdin",
        description="Classify images with MODEL (its evaluation preprocessing). Each INPUT is an image file, a folder "
        "(every image under it, recursively, in name order; links followed, each real file once), a dataset (a Hub "
        "dataset hfds/NAME[:CONFIG][@REVISION], a datasets.save_to_disk folder, parquet or arrow files: the image of "
        "every row of every split in order, or of --split; each result is named INPUT/SPLIT/ROW) or - (image paths "
        "on stdin, one per line, read as they come). Images are decoded batch by batch and each result is printed "
        "as soon as its batch is scored: text, a JSON array (--json), JSON lines (--jsonl) or CSV (--csv: image, "
        "label_1, prob_1, ... label_k, prob_k, error). A file that cannot be read as an image does not stop the "
        "others: its entry holds the error ({\"image\": ..., \"error\": ...}). Exit status: 0 when every image "
        "was scored, 1 when any could not be read, 2 when nothing ran (a missing INPUT or a folder without images "
        "is refused before the model is loaded).")
    p.add_argument("model", metavar="MODEL", help="run folder, local-dir:PATH, hf-hub:REPO, or a registered "
                   "name with weights (nfnet_f0)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image file, folder of images, dataset, or - for paths "
                   "on stdin")
    p.add_argument("--split", action="append", metavar="NAME", help="score only this split of the dataset INPUTs "
                   "(repeat for several; default: every split, in the dataset's order)")
    p.add_argument("--input-key", metavar="COLUMN", help="the dataset's image column (default: its one Image column)")
    p.add_argument("-k", "--topk", type=argtype("topk"), default=5, help="labels per image (default: 5)")
    p.add_argument("-b", "--batch-size", type=argtype("batch_size"), default=32, help="batch size (default: 32)")
    p.add_argument("-j", "--workers", type=argtype("workers"), default=default_workers(),
                   help=f"data loading processes (default: 4, or the CPUs available if fewer: {default_workers()} "
                   "here)")
    p.add_argument("--tta", action="store_true", help=_TTA)
    form = p.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="print one JSON array, an image's object per line")
    form.add_argument("--jsonl", action="store_true", help="print JSON lines: one object per image")
    form.add_argument("--csv", action="store_true", help="print CSV with a header row")
    p.set_defaults(func=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    import csv
    import json
    from nfnet_zoo.data import image_paths
    from nfnet_zoo.errors import NFNetZooError
    from nfnet_zoo.evaluation import csv_header, csv_row, format_prediction, iter_predictions
    from nfnet_zoo.models.load import load_model

    # files, folders and datasets checked here, before the model is loaded
    paths = image_paths(args.inputs, sys.stdin, args.split, args.input_key)
    net = load_model(args.model)
    k = min(args.topk, net.num_classes)
    out = sys.stdout
    rows = csv.writer(out, lineterminator="\n")
    if args.csv:
        rows.writerow(csv_header(k))
    count = failed = 0
    try:
        for r in iter_predictions(net, paths, args.topk, batch_size=args.batch_size, workers=args.workers,
                                  tta=args.tta):
            if args.csv:
                rows.writerow(csv_row(r, k))
            elif args.jsonl:
                out.write(json.dumps(r) + "\n")
            elif args.json:  # the array opened before the first entry, each entry ended by the next one's comma
                out.write(("[\n" if count == 0 else ",\n") + json.dumps(r))
            else:
                out.write(format_prediction(r) + "\n")
            out.flush()  # each result as its batch is scored, also into a pipe
            count += 1
            failed += "error" in r
    except BrokenPipeError:  # the reader stopped reading (`| head`): as other Unix tools, stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (Python's flush at exit would fail again)
        return 0
    if args.json:
        out.write("\n]\n" if count else "[]\n")
    if not count:
        raise NFNetZooError("no image paths on stdin; give one path per line")
    if failed:
        print(f"nfnet-zoo predict: {failed} of {count} images could not be read (see their entries)", file=sys.stderr)
    return 1 if failed else 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="fine-tune the tiny NFNet on scikit-learn's handwritten digits (CPU, no network)",
        description="Build an image folder from scikit-learn's 1,797 handwritten digits (shipped with the "
        "package), train nfnet_zoo_tiny on it from scratch on the CPU, evaluate it, and print where the "
        "model is. A few minutes on a laptop.")
    p.add_argument("--output", default="runs/demo", help="run folder (default: runs/demo; replaced if it "
                   "holds an earlier demo run)")
    p.add_argument("-j", "--workers", type=argtype("workers"), default=default_workers(2),
                   help="data loading processes (default: 2, or 1 on a machine with one CPU)")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> None:
    from nfnet_zoo.demo import run_demo

    with _plain_warnings():
        run_demo(args.output, workers=args.workers)


# --- export ----------------------------------------------------------------------------------
def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="write a model as an ONNX file (or TorchScript) that runs without nfnet-zoo",
        description="Write MODEL as an ONNX file for onnxruntime (or a TorchScript file), with every "
        "weight-standardised convolution folded into a plain one (no standardisation runs per call) and a dynamic "
        "batch size. Input `image`: float32 N x 3 x H x W at the exported size, resized, cropped and normalised as "
        "the file's metadata_props say (key `preprocessing`: input_size, interpolation, crop_pct, crop_mode, mean, "
        "std; `label_names`); output `logits`. Atomic write; a file the command did not write is replaced only with "
        "--overwrite.")
    p.add_argument("model", metavar="MODEL", help="run folder, local-dir:PATH, hf-hub:REPO, or a registered "
                   "name with weights (nfnet_f0)")
    p.add_argument("--format", choices=("onnx", "torchscript"), default="onnx",
                   help="onnx (torch.onnx.export(dynamo=True); needs the onnx extra) or torchscript "
                   "(torch.jit.trace) (default: onnx)")
    p.add_argument("-o", "--output", metavar="FILE", help="file to write (default: MODEL/model.onnx, or "
                   "MODEL/model.pt for torchscript, when MODEL is a folder)")
    p.add_argument("--image-size", type=argtype("image_size"), default=None, metavar="PX",
                   help="height and width in pixels the file takes (default: the model's evaluation size)")
    p.add_argument("--overwrite", action="store_true", help="replace --output even if nfnet-zoo did not write it")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> None:
    from nfnet_zoo.export import export_model

    print(f"wrote {export_model(args.model, args.output, args.format, args.image_size, args.overwrite)}")


# --- push, publish, cards (Hub publishing: nfnet_zoo.hub) -------------------------------------
def _add_hub_target(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repo-id", required=True, help="Hub repo NAMESPACE/NAME (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps "
                   "its visibility)")
    p.add_argument("--revision", help="branch to push to (created from main if missing; default: main)")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to the branch")
    p.add_argument("--commit-message", help="commit title (default: 'Upload <files>')")
    p.add_argument("--token", help="Hub token with write access (default: your `hf auth login` token or HF_TOKEN; "
                   "prefer those: a command-line token is visible to other users of the machine)")
    p.add_argument("--endpoint", help="Hub URL (default: HF_ENDPOINT, else https://huggingface.co)")
    p.add_argument("--dry-run", action="store_true", help="list what would be uploaded; contact nothing")


def _hub_kwargs(args: argparse.Namespace) -> dict:
    return dict(private=args.private, revision=args.revision, create_pr=args.create_pr,
                commit_message=args.commit_message, token=args.token, endpoint=args.endpoint, dry_run=args.dry_run)


def _add_push(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "push", help="upload a fine-tuned run folder (weights, config, model card, curves) to the Hugging Face Hub",
        description="Upload RUN/model.safetensors, RUN/config.json, the model card and RUN/curves.png (when "
        "drawn; the card shows it) to a Hub model repo, creating it if needed. Nothing else leaves the machine "
        "(no training state, no pickles). Only files "
        "that differ from the Hub's copy are committed, so pushing an unchanged folder makes no commit. An "
        "edited RUN/README.md is uploaded as it is; the untouched draft is filled in with the repo id. RUN is "
        "never modified, and no file of it that is a link is read or sent. config.json is first checked against "
        "the weights as `predict` checks a model (nothing goes up that predict would refuse), then goes up in the shared "
        "form: where timm's own NFNet can express the architecture (the F family), plain timm, transformers and "
        "the Hub's widget load it (timm.create_model('hf-hub:NAMESPACE/NAME', pretrained=True)); other "
        "architectures need `import nfnet_zoo` first; nfnet_zoo.load_model('hf-hub:NAMESPACE/NAME') builds the "
        "exact network.")
    p.add_argument("run", help="run folder written by `nfnet-zoo finetune` (or any timm save_for_hf folder)")
    p.add_argument("--dataset", dest="dataset_id", metavar="ID",
                   help="the Hub dataset id the run trained on (e.g. beans), listed in the card's metadata (default: "
                   "the dataset of a run on --data-dir hfds/NAME; a local folder's name is not a dataset id, so the "
                   "card names none there)")
    _add_hub_target(p)
    p.set_defaults(func=_run_push)


def _run_push(args: argparse.Namespace) -> None:
    from nfnet_zoo.hub.push import push_to_hub

    print(push_to_hub(args.run, args.repo_id, dataset_id=args.dataset_id, **_hub_kwargs(args)))


def _add_publish(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "publish", help="convert an official DeepMind checkpoint and push it to the Hub with its card and config",
        description="Convert an official DeepMind NFNet checkpoint (F0_haiku.npz ... F6_haiku.npz) as "
        "`nfnet-zoo convert` does, in a temporary folder, and push model.safetensors, config.json and its "
        "model card (the zoo card for F0-F6) to a Hub model repo.")
    p.add_argument("src", help="DeepMind checkpoint, e.g. F1_haiku.npz")
    p.add_argument("--activation", default="gelu", help="nonlinearity the checkpoint was trained with (default: gelu)")
    p.add_argument("--alpha", type=argtype("alpha"), default=0.2, help="residual scaling alpha of the checkpoint (default: 0.2)")
    _add_hub_target(p)
    p.set_defaults(func=_run_publish)


def _run_publish(args: argparse.Namespace) -> None:
    from nfnet_zoo.hub.push import publish_checkpoint

    print(publish_checkpoint(args.src, args.repo_id, activation=args.activation, alpha=args.alpha,
                             **_hub_kwargs(args)))


def _add_cards(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cards", help="regenerate model_cards/ and hub_configs/ for the released variants",
        description="Write model_cards/<tag>/README.md and hub_configs/<tag>/config.json for every registered "
        "variant with DeepMind's released weights (nfnet_f0.dm_in1k ... nfnet_f6.dm_in1k), from the variant "
        "table, with parameter counts and GMACs measured by code. Deterministic: files already up to date "
        "are left alone.")
    p.add_argument("--out", default=".", help="folder that holds model_cards/ and hub_configs/ (default: .)")
    p.add_argument("--namespace", help="Hub namespace the cards' usage snippets name (default: nfnet-zoo)")
    p.set_defaults(func=_run_cards)


def _run_cards(args: argparse.Namespace) -> None:
    from nfnet_zoo.hub.push import write_zoo_cards

    changed = write_zoo_cards(args.out, namespace=args.namespace)
    print("\n".join(f"wrote {p}" for p in changed) if changed else "model cards and hub configs are up to date")


# --- (other commands register themselves below: one _add_<command> function each) ------------

_COMMANDS = [_add_convert, _add_finetune, _add_curves, _add_evaluate, _add_predict, _add_export, _add_demo, _add_push,
             _add_publish, _add_cards]


class _Parser(argparse.ArgumentParser):
    """Bad arguments are one line, `nfnet-zoo <command>: error: ...`, like every other refusal (exit 2)."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="nfnet-zoo",
        description="DeepMind-faithful NFNets for timm: convert, fine-tune, evaluate, export and publish.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    import warnings
    args = build_parser().parse_args(argv)
    # timm <= 1.0.21 uses torch.jit.interface, which torch 2.14 deprecates with a warning at its import: a line before
    # every command's output that is timm's to fix, not the user's
    warnings.filterwarnings("ignore", message="`torch.jit.interface` is deprecated", category=FutureWarning)
    from .versions import check_versions
    old = check_versions()  # before nfnet_zoo's import, which an old torch or timm could break
    if old:
        print(f"nfnet-zoo {args.command}: error: {old}", file=sys.stderr)
        return 2
    from nfnet_zoo.errors import NFNetZooError, machine_fault  # nfnet_zoo imports torch and timm: only now
    try:
        code = args.func(args) or 0  # a command returns 1 when part of its work failed (predict: unreadable images)
    except NFNetZooError as e:
        print(f"nfnet-zoo {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nfnet-zoo {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a fault of the machine (disk full, read-only, permissions): exit 1
        print(f"nfnet-zoo {args.command}: error: {machine_fault(e)}", file=sys.stderr)
        return 1
    finally:
        _leave_process_group()
    return code


def _leave_process_group() -> None:
    """A torchrun process that exits with its gloo group alive can abort ("terminate called without
    an active exception"), turning a one-line refusal into a crash report."""
    dist = sys.modules.get("torch.distributed")  # never imported by --help or usage errors
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run() -> None:
    """The `nfnet-zoo` command: main(), then exit with its status."""
    for stream in (sys.stdout, sys.stderr):  # a class or file name the terminal's encoding cannot show: escapes
        with contextlib.suppress(AttributeError, ValueError):  # (not a UnicodeEncodeError traceback)
            stream.reconfigure(errors="backslashreplace")
    exit_process(main())


def exit_process(code: int) -> None:
    """Exit with CODE. Under torchrun (and accelerate launch) skip the interpreter's teardown: here
    1 two-process run in 5 to 8 aborted after its last line of Python had run (SIGABRT in C++ static
    destruction, "terminate called without an active exception", even after destroy_process_group),
    which torchrun reports as a failed run. Everything this package writes is closed by then."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        sys.exit(code)
    import logging
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

