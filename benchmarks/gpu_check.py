"""The GPU check (`make gpu-check`): what a GPU user runs, on whatever torch/timm/accelerate this machine has.

Installs nothing and needs no network; the package is used from src/. Every step's output goes into
one log (default: gpu_check.log), and a summary of the steps ends it:
  1. versions and the device;
  2. the device-aware tests (DeepMind conformance, AGC) with DEVICE set, pytest's `device` fixture
     (--quick: the conformance tests only);
  3. `nfnet-zoo finetune` on generated images with --mixed-precision bf16 --model-ema --channels-last
     --grad-accum-steps 2 --torchcompile, checked from its run folder;
  4. `nfnet-zoo evaluate` of the result;
  5. `benchmarks/bench.py --quick`: on a GPU it writes BENCHMARKS.md's GPU section; on the CPU it
     writes into the log folder (never over the CPU figures), and --quick leaves it out.
Exit status 0 only if every step passed. --quick is the smallest form of each step (CI runs
`make gpu-check DEVICE=cpu QUICK=1`). On the CPU, and with --quick, the fine-tune compiles with the
aot_eager backend: Inductor's code generation for a training graph took over ten minutes on 2 CPU
cores (Inductor itself is tested on the model in tests/test_ecosystem.py); on CUDA it is Inductor.

    python benchmarks/gpu_check.py [--device cuda|cpu] [--quick] [--log PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEVICE_TESTS = ["tests/test_conformance.py", "tests/test_agc.py"]


class Log:
    """Lines to the terminal and to the log file at once."""

    def __init__(self, path: Path):
        self.file = path.open("w", encoding="utf-8")

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        self.file.write(text + "\n")
        self.file.flush()


def _run(log: Log, cmd: list[str], env: dict, timeout: float) -> tuple[int, str]:
    """Run `cmd`, streaming its output into the log; (exit status, output)."""
    log("$ " + " ".join(cmd))
    out = []
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    deadline = time.monotonic() + timeout
    for line in p.stdout:
        log(line.rstrip("\n"))
        out.append(line)
        if time.monotonic() > deadline:
            p.kill()
            log(f"timed out after {timeout:.0f} s")
            break
    return p.wait(), "".join(out)


VERSIONS = ("import sys, torch, timm, accelerate, huggingface_hub as h; "
            "print(f'python {sys.version.split()[0]}, torch {torch.__version__}, timm {timm.__version__}, '"
            "f'accelerate {accelerate.__version__}, huggingface_hub {h.__version__}'); "
            "print('cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')")


# what the steps import: nfnet-zoo's dependencies and pytest
NEEDS = ("torch", "torchvision", "timm", "accelerate", "huggingface_hub", "safetensors", "PIL", "numpy", "pytest")


def _unfit_python() -> str | None:
    """One line when this python lacks a dependency or has one older than nfnet-zoo's floor, else None."""
    import importlib.util
    missing = [name for name in NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        problem = f"{sys.executable} has no {', '.join(missing)}"
    else:
        sys.path.insert(0, str(ROOT / "src"))
        from nfnet_zoo_cli.versions import FLOORS, too_old
        problem = "; ".join(filter(None, (too_old(name, floor) for name, floor in FLOORS.items())))
    return problem and (f"gpu-check: error: {problem}; pass PYTHON=/path/to/python of an environment with "
                        "nfnet-zoo's dependencies (`make setup` makes .venv/bin/python, which gpu-check then uses)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--quick", action="store_true", help="the smallest form of each step (CI on the CPU)")
    p.add_argument("--log", default=str(ROOT / "gpu_check.log"), help="log file (default: gpu_check.log)")
    args = p.parse_args()
    unfit = _unfit_python()
    if unfit:
        print(unfit, file=sys.stderr)
        return 2
    cpu = args.device == "cpu"
    log = Log(Path(args.log))
    work = Path(tempfile.mkdtemp(prefix="nfnet-zoo-gpu-check-"))
    env = dict(os.environ, DEVICE=args.device, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    nfnet_zoo = [sys.executable, "-m", "nfnet_zoo_cli"]
    results: list[tuple[str, str, float]] = []

    def step(name: str, cmd: list[str], timeout: float, check=None) -> str:
        log(f"\n=== {name} ===")
        t = time.monotonic()
        code, out = _run(log, cmd, env, timeout)
        problem = f"exit status {code}" if code else (check(out) if check else None)
        results.append((name, "ok" if not problem else f"FAILED ({problem})", time.monotonic() - t))
        return out

    def check_device(out: str):
        last = out.strip().splitlines()[-1] if out.strip() else ""
        return None if cpu or (last.startswith("cuda ") and "None" not in last and not last.endswith("none")) \
            else "no CUDA GPU visible to torch"
    step("versions and device", [sys.executable, "-c", VERSIONS], 120, check=check_device)

    tests = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *DEVICE_TESTS]
    # --quick: the conformance tests alone (the AGC tests take minutes on 2 CPU cores; `make test` runs them)
    step(f"device-aware tests on {args.device}", tests[:-1] + ["-x"] if args.quick else tests,
         240 if args.quick else 420)

    # 3 classes of generated images (tests/_images.py: real PNG files)
    sys.path.insert(0, str(ROOT / "tests"))
    from _images import make_folder
    data = make_folder(work / "data", n_train=16 if args.quick else 64, n_val=4 if args.quick else 16)
    run = work / "run"
    size, batch, epochs = (32, 8, 1) if args.quick else (64, 32, 3)
    flags = ["--mixed-precision", "bf16", "--model-ema", "--model-ema-decay", "0.9", "--channels-last",
             "--grad-accum-steps", "2", "--torchcompile", "aot_eager" if args.quick or cpu else "inductor"]
    finetune = [*nfnet_zoo, "finetune", "--model", "nfnet_zoo_tiny", "--no-pretrained", "--data-dir", str(data),
                "--output", str(run), "--img-size", str(size), "-b", str(batch), "--epochs", str(epochs),
                "-j", "0" if args.quick else "4", "--lr", "0.1", "--warmup-epochs", "0", *flags] + (["--cpu"] if cpu else [])

    def check_run(out: str):
        try:
            saved = json.loads((run / "args.json").read_text())
            rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        except (OSError, ValueError) as e:
            return f"no run folder ({e})"
        want = dict(mixed_precision="bf16", model_ema=True, channels_last=True, grad_accum_steps=2,
                    torchcompile=flags[-1])
        wrong = {k: saved.get(k) for k, v in want.items() if saved.get(k) != v}
        if wrong or len(rows) != epochs or not (run / "model.safetensors").is_file():
            return f"run folder does not match the flags: {wrong or rows}"
        on = "cpu" if cpu else "cuda"
        return None if f"on {on}" in out else f"did not train on {on}"
    step("finetune: bf16, EMA, channels_last, grad accumulation 2, torch.compile", finetune,
         300 if args.quick else 360, check=check_run)

    def check_eval(out: str):
        try:
            result = json.loads(out[out.index("{"):])
        except ValueError:
            return "no JSON result"
        return None if isinstance(result.get("top1"), (int, float)) else "no top-1 in the result"
    step("evaluate", [*nfnet_zoo, "evaluate", str(run), "--data-dir", str(data), "--json", "-j", "0"], 180,
         check=check_eval)

    if args.quick:
        results.append(("bench.py --quick", "left out (--quick)", 0.0))
    else:
        out = ROOT / "BENCHMARKS.md" if not cpu else Path(args.log).with_suffix(".bench.md")
        # On the CPU the compile cases alone outlast the step (Inductor builds six graphs on 2 cores): left out
        step("bench.py --quick" + (" (GPU section of BENCHMARKS.md)" if not cpu else f" -> {out}"),
             [sys.executable, "benchmarks/bench.py", "--quick", "--skip", "e2e,compile" if cpu else "e2e",
              "--out", str(out)], 900 if cpu else 420)

    log("\n=== summary ===")
    for name, status, seconds in results:
        log(f"{status:<40} {seconds:7.1f} s  {name}")
    failed = [r for r in results if r[1].startswith("FAILED")]
    if failed:
        log(f"gpu-check on {args.device}: FAILED; log {args.log}; generated data and run kept in {work}")
        return 1
    shutil.rmtree(work)  # only what this script generated
    log(f"gpu-check on {args.device}: passed; log {args.log}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
