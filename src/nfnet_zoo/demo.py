"""`nfnet-zoo demo`: the whole fine-tuning path on a real dataset that needs no network.

scikit-learn ships the 1,797 8x8 handwritten digits of the UCI "optdigits" set. They become an image
folder (each digit centred on a 20x20 canvas, upscaled 4x; 80/20 stratified train/val split, fixed),
then `finetune` trains `nfnet_zoo_tiny` from scratch on the CPU and `evaluate` reports the result.

The canvas keeps DeepMind's evaluation crop honest: at 32 px the eval transform squashes to 64 and
centre-crops 32, i.e. the middle half of the image, which holds the whole digit.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from .files import CURVES, check_manifest, remove_owned, write_manifest
from .errors import NFNetZooError

DEMO_MODEL = "nfnet_zoo_tiny"
DATASET = "digits"
# Tuned on this 2-core machine for >= 95% val top-1 well within 10 minutes (see the report/README).
DEMO_ARGS = dict(epochs=12, batch_size=64, lr=0.2, warmup_epochs=1, weight_decay=5e-5, clipping=0.04,
                 img_size=32, hflip=0.0, scale=(0.15, 0.6), smoothing=0.1, pretrained=False, save_every=0,
                 seed=0)


def build_digits_folder(root: str | Path) -> Path:
    """Write scikit-learn's digits as ROOT/{train,val}/<digit>/<n>.png (once; reused if complete and unchanged).

    ROOT must be missing, empty, or a digits folder this function wrote (its manifest proves it); anything
    else is refused, never replaced.
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise NFNetZooError("the demo needs scikit-learn: pip install 'nfnet-zoo[demo]'") from None
    root = Path(root)
    if _check_digits_folder(root):
        return root
    digits = load_digits()
    idx_train, idx_val = train_test_split(np.arange(len(digits.images)), test_size=0.2, random_state=0,
                                          stratify=digits.target)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))  # ours alone: a fresh name
    try:
        for split, idx in (("train", idx_train), ("val", idx_val)):
            for i in idx:
                canvas = np.zeros((20, 20), dtype=np.uint8)
                canvas[6:14, 6:14] = np.round(digits.images[i] * (255 / 16)).astype(np.uint8)
                folder = tmp / split / str(digits.target[i])
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(canvas, "L").resize((80, 80), Image.BICUBIC).save(folder / f"{i:04d}.png")
        write_manifest(tmp)
        os.rename(tmp, root)  # replaces only a missing or empty ROOT
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def _check_digits_folder(root: Path) -> bool:
    """True: ROOT is a complete digits folder of ours; False: missing or empty; else refused."""
    if not root.exists() and not root.is_symlink():
        return False
    if root.is_dir() and not root.is_symlink() and not any(root.iterdir()):
        return False
    problem = check_manifest(root) if root.is_dir() and not root.is_symlink() else "not a folder"
    if problem is None:
        return True
    raise NFNetZooError(f"{root} exists and is not a digits folder the demo wrote ({problem}); nothing was "
                        f"changed: move it away, or pass an --output in another folder")


def _check_output(output: Path, data: Path) -> None:
    """OUTPUT must be missing, empty, or an earlier demo run this tool can prove it wrote (its manifest)."""
    if output.resolve() == data.resolve():
        raise NFNetZooError(f"--output {output} is where the demo writes its images; pass another --output")
    if not output.exists() and not output.is_symlink():
        return
    if output.is_dir() and not output.is_symlink() and not any(output.iterdir()):
        return
    problem = check_manifest(output) if output.is_dir() and not output.is_symlink() else "not a folder"
    if problem is not None:
        raise NFNetZooError(f"--output {output} is not empty and is not an earlier demo run this tool can prove "
                            f"it wrote ({problem}); nothing was changed: pass a new --output, or move it away")


def run_demo(output: str | Path = "runs/demo", workers: int = 2) -> Path:
    """Build the digits folder beside OUTPUT, fine-tune the tiny NFNet on it, evaluate; returns the run.

    An earlier demo run in OUTPUT is replaced; any other content of OUTPUT, or a DIGITS folder beside it
    that the demo did not write, is refused before anything is written.
    """
    from .evaluation import evaluate, format_evaluation
    from .training.finetune import finetune

    output = Path(output)
    data_root = output.parent / DATASET
    _check_output(output, data_root)
    _check_digits_folder(data_root)
    data = build_digits_folder(data_root)
    if output.is_dir():
        problem = remove_owned(output)  # an earlier demo run: replaced, as --help says
        if problem is not None:
            raise NFNetZooError(f"--output {output} changed while the demo started ({problem}); nothing was deleted")
    run = finetune(model=DEMO_MODEL, data_dir=str(data), output=str(output), workers=workers, **DEMO_ARGS)
    result = evaluate(str(run), str(data), workers=workers)
    write_manifest(run)  # what a later demo may replace: exactly these files
    print()
    print(format_evaluation(result))
    files = ["model.safetensors", "config.json", "README.md", "metrics.jsonl"] + \
        ([CURVES] if (run / CURVES).is_file() else [])
    print(f"\nThe fine-tuned model is in {run}/ ({', '.join(files)}).")
    print(f"  nfnet-zoo predict {run} {data}/val/3/*.png | head")
    print(f"  python -c \"import nfnet_zoo; m = nfnet_zoo.load_model('{run}')\"")
    return run


__all__ = ["run_demo", "build_digits_folder", "DEMO_ARGS"]
