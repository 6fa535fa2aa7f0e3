"""How far each loader of a shared model is from `nfnet-zoo predict`, on a run whose predictions are confident.

    python benchmarks/sharing_gap.py [--epochs 4] [--out DIR]

Fine-tunes an F-family shape (nfnet_f0 with depths 1,1,1,1 and widths 256: config.json names timm's own
`dm_nfnet_f0`) from scratch on the demo's digits (no network), then loads the run folder the ways its
receivers do (tests/_loaders.py: timm, transformers' AutoModel, TimmWrapper and pipeline, without and with
nfnet-zoo) and prints, per loader, the top-1 agreement with `nfnet-zoo predict` and the largest
probability gap on the validation images. README's "Sharing on the Hub" quotes it.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "nfnet_zoo_cli"]


def _run(args: list) -> str:
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{' '.join(map(str, args[:5]))} ... failed:\n{r.stderr[-2000:]}")
    return r.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--out", help="working folder (default: a temporary one)")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="sharing-gap-"))
    from nfnet_zoo.demo import build_digits_folder

    data = build_digits_folder(out / "digits")
    run = out / "run"
    if not (run / "summary.json").is_file():
        _run([*CLI, "finetune", "--model", "nfnet_f0", "--model-kwargs", "depths=(1,1,1,1)", "widths=(256,256,256,256)",
              "--no-pretrained", "--data-dir", data, "--output", run, "--epochs", args.epochs, "-b", "64", "--lr", "0.2",
              "--img-size", "64", "--hflip", "0", "--seed", "0", "-j", "2"])
    images = sorted(str(p) for p in (data / "val").rglob("*.png"))
    reference = torch.zeros(len(images), 10)
    for i, r in enumerate(json.loads(_run([*CLI, "predict", run, *images, "-k", "10", "--json"]))):
        for p in r["predictions"]:
            reference[i, p["index"]] = p["probability"]
    config = json.loads((run / "config.json").read_text())
    print(f"run: {run} ({config['architecture']} for timm, {config['nfnet_zoo']['architecture']} "
          f"{config['nfnet_zoo']['model_args']} for nfnet-zoo); {len(images)} validation images; "
          f"predict's mean top-1 probability {reference.max(1).values.mean():.3f}")
    print("| loader | nfnet_zoo imported | top-1 agreement | largest probability gap |\n|---|---|---|---|")
    for with_zoo in ("0", "1"):
        loaded = json.loads(_run([sys.executable, ROOT / "tests" / "_loaders.py", run, json.dumps(images),
                                  with_zoo]).splitlines()[-1])
        for loader, probs in loaded.items():
            if loader == "nfnet_zoo imported":
                continue
            if isinstance(probs, dict):
                print(f"| {loader} | {'yes' if with_zoo == '1' else 'no'} | failed: {probs['error']} | |")
                continue
            got = torch.tensor(probs)
            agree = int((got.argmax(1) == reference.argmax(1)).sum())
            print(f"| {loader} | {'yes' if with_zoo == '1' else 'no'} | {agree}/{len(images)} | "
                  f"{(got - reference).abs().max():.2e} |")


if __name__ == "__main__":
    main()
