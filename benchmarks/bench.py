"""nfnet-zoo vs timm's dm_nfnet_f0 with the same weights, measured in one run, interleaved.

Cases: inference (eager fp32, bf16 autocast, torch.compile), the exported ONNX model in onnxruntime
(`nfnet-zoo export`) against eager timm, eager ours and optimize_for_inference at batch 1 and 8, a
training step (forward, backward, AGC, SGD), AGC alone, peak memory of a training step, and end-to-end
fine-tuning. Every figure is the median of repeated runs after warm-up, with the two models alternating, and every inference
case reports how far each model's logits are from DeepMind's numerics (a float64 reference: timm's
network with DeepMind's weight standardisation and tanh-GELU swapped in, which matches DeepMind's
own outputs; see tests/test_variants.py). Runs on the CPU, or on a GPU when one is present.

    python benchmarks/bench.py [--quick] [--skip e2e,compile] [--out BENCHMARKS.md]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

try:
    import resource
except ImportError:  # not on Windows
    resource = None

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _minor_faults() -> int:
    # Pages the kernel mapped in on first touch: fresh buffers above glibc's 32 MB mmap threshold
    # cost ~1.5 us per 4 KB page here, and how many depends on the process's allocation history.
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0


def _interleaved(fns: dict[str, Callable[[], object]], device, repeats: int, warmup: int = 2) -> dict:
    """Median seconds of each function, the functions alternating within every repeat.

    Also "spread": the lowest and highest timm / ours ratio of a single repeat (the two runs of one
    repeat are back to back, so they share the machine's state), which shows how noisy the case is;
    and "faults": each function's median count of minor page faults per run (CPU, Linux).
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    faults = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            _sync(device)
            f = _minor_faults()
            t = time.perf_counter()
            fn()
            _sync(device)
            times[k].append(time.perf_counter() - t)
            faults[k].append(_minor_faults() - f)
    result: dict = {k: statistics.median(v) for k, v in times.items()}
    result["times"] = times
    if "on" in times and "off" in times:
        result["ratios"] = [b / a for a, b in zip(times["on"], times["off"])]
    if "ours" in times and "timm" in times:
        ratios = [b / a for a, b in zip(times["ours"], times["timm"])]
        result["spread"] = (min(ratios), max(ratios))
        if resource and device.type == "cpu":
            result["faults"] = (statistics.median(faults["ours"]), statistics.median(faults["timm"]))
    return result


def _pretrained_like(seed: int = 0):
    """timm's dm_nfnet_f0 with weights moved off their init (skip gains on, gains and biases perturbed)."""
    import timm

    torch.manual_seed(seed)
    theirs = timm.create_model("dm_nfnet_f0")
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if n.endswith("skipinit_gain"):
                p.uniform_(0.5, 1.5)
            elif n.endswith(".gain"):
                p.mul_(1 + 0.2 * torch.randn_like(p))
            elif n.endswith(".bias"):
                p.normal_(0, 0.1)
    return theirs


def _deepmind_reference(theirs) -> torch.nn.Module:
    """An independent float64 model with DeepMind's numerics: timm's network, DeepMind's forms."""
    from timm.models.nfnet import GammaAct

    ref = copy.deepcopy(theirs).double().eval()
    for m in ref.modules():
        if hasattr(m, "scale") and hasattr(m, "eps"):
            m.eps = 1e-30
        if isinstance(m, GammaAct):
            m.act_fn = lambda t, inplace=False: F.gelu(t, approximate="tanh")
    return ref


def bench_inference(theirs, ours, device, batch: int, size: int, repeats: int, compile_: bool) -> list[dict]:
    x = torch.randn(batch, 3, size, size, device=device)
    with torch.no_grad():
        ref = _deepmind_reference(theirs).to(device)(x.double()).float()
    rows = []
    ours, theirs = ours.eval(), theirs.eval()
    for fmt in (torch.contiguous_format, torch.channels_last):
        ours.to(memory_format=fmt)
        theirs.to(memory_format=fmt)
        xf = x.contiguous(memory_format=fmt)
        lowp = torch.bfloat16
        cases = [("eager fp32", None, False), (f"eager {str(lowp)[6:]} autocast", lowp, False)]
        if compile_ and fmt == torch.channels_last:
            cases.append(("torch.compile fp32", None, {}))
            # Inductor's freezing (what optimize_for_inference(compile=True) uses) for both
            cases.append(("torch.compile fp32 + Inductor freezing", None, {"freezing": True}))
            if device.type == "cuda":  # what a GPU user runs: bf16, channels_last, compiled
                cases.append((f"torch.compile {str(lowp)[6:]} autocast", lowp, {}))
        for name, dtype, comp in cases:
            models = {"ours": ours, "timm": theirs}
            if comp is not False:
                torch._dynamo.reset()
                models = {k: torch.compile(m, options=comp or None) for k, m in models.items()}

            def run(m, dtype=dtype):
                with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32,
                                                            enabled=dtype is not None):
                    return m(xf)

            t0 = time.perf_counter()
            outs = {k: run(m).float() for k, m in models.items()}  # also compiles
            compile_s = time.perf_counter() - t0
            t = _interleaved({k: (lambda m=m: run(m)) for k, m in models.items()}, device, repeats)
            rows.append(dict(
                case=f"inference {name}, {'channels_last' if fmt == torch.channels_last else 'NCHW'}",
                batch=batch, size=size, ours_s=t["ours"], timm_s=t["timm"], ratio=t["timm"] / t["ours"],
                spread=t["spread"], faults=t.get("faults"), ours_img_s=batch / t["ours"], timm_img_s=batch / t["timm"],
                ours_dev=(outs["ours"] - ref).abs().max().item(), timm_dev=(outs["timm"] - ref).abs().max().item(),
                **({"first_call_s": compile_s} if comp is not False else {})))
            print(_fmt_row(rows[-1]), flush=True)
    ours.to(memory_format=torch.contiguous_format)
    theirs.to(memory_format=torch.contiguous_format)
    return rows


def bench_speed_path(ours, device, batch: int, size: int, repeats: int) -> list[dict]:
    """The package's one speed path on and off on the same model: `standardize_once` (what
    optimize_for_inference serves) against the model itself, eval, fp32 and bf16 autocast, both formats."""
    from nfnet_zoo.models.inference import standardize_once

    x = torch.randn(batch, 3, size, size, device=device)
    rows = []
    model = ours.eval()
    for fmt in (torch.contiguous_format, torch.channels_last):
        model.to(memory_format=fmt)
        served = standardize_once(model)
        xf = x.contiguous(memory_format=fmt)
        for name, dtype in (("fp32", None), ("bfloat16 autocast", torch.bfloat16)):
            def run(m, dtype=dtype):
                with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32,
                                                            enabled=dtype is not None):
                    return m(xf)

            same = torch.equal(run(served), run(model))
            t = _interleaved({"on": lambda: run(served), "off": lambda: run(model)}, device, repeats)
            ratios = t["ratios"]
            rows.append(dict(case=f"eval {name}, {'channels_last' if fmt == torch.channels_last else 'NCHW'}",
                             batch=batch, size=size, on_s=t["on"], off_s=t["off"], ratio=t["off"] / t["on"],
                             spread=(min(ratios), max(ratios)), same_bits=same))
            print(f"speed path {rows[-1]['case']}: on {t['on'] * 1e3:.0f} ms, off {t['off'] * 1e3:.0f} ms, "
                  f"{rows[-1]['ratio']:.2f}x, same bits: {same}", flush=True)
    model.to(memory_format=torch.contiguous_format)
    return rows


def bench_export(theirs, ours, batches: tuple, size: int, repeats: int) -> list[dict]:
    """`nfnet-zoo export`'s ONNX file in onnxruntime (default session options: all graph optimisations, one
    intra-op thread per core) against eager timm, eager ours and optimize_for_inference, fp32 on the CPU, one
    file for every batch size (dynamic batch)."""
    import onnxruntime

    from nfnet_zoo.export import fold_standardization, onnx_bytes
    from nfnet_zoo.models.inference import optimize_for_inference

    ours, theirs = ours.eval(), theirs.eval()
    session = onnxruntime.InferenceSession(onnx_bytes(fold_standardization(ours), torch.randn(2, 3, size, size), {}),
                                           providers=["CPUExecutionProvider"])
    served = optimize_for_inference(copy.deepcopy(ours))  # channels_last, standardised once, no_grad
    rows = []
    for batch in batches:
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
        xn = x.numpy()

        def eager(m):
            with torch.inference_mode():
                return m(x)

        fns = {"timm": lambda: eager(theirs), "ours": lambda: eager(ours),
               "onnxruntime": lambda: session.run(None, {"image": xn}),
               "optimize_for_inference": lambda: served(x)}
        want = eager(ours)
        dev = {"onnxruntime": (torch.from_numpy(fns["onnxruntime"]()[0]) - want).abs().max().item(),
               "optimize_for_inference": (served(x) - want).abs().max().item()}
        t = _interleaved(fns, torch.device("cpu"), repeats)
        row = dict(batch=batch, size=size, **{f"{k}_s": t[k] for k in fns}, dev=dev)
        for k in ("ours", "onnxruntime", "optimize_for_inference"):
            ratios = [a / b for a, b in zip(t["times"]["timm"], t["times"][k])]
            row[f"{k}_ratio"], row[f"{k}_spread"] = t["timm"] / t[k], (min(ratios), max(ratios))
        rows.append(row)
        print(f"export, batch {batch} x {size}: timm eager {t['timm'] * 1e3:.0f} ms; timm / x: "
              + ", ".join(f"{k} {row[k + '_ratio']:.2f}x ({t[k] * 1e3:.0f} ms)"
                          for k in ("ours", "onnxruntime", "optimize_for_inference")), flush=True)
    return rows


def _export_lines(rows: list[dict], repeats: int) -> list[str]:
    lines = ["", "## The exported model in onnxruntime (`nfnet-zoo export`)", "",
             "`nfnet_f0` (same weights as above) exported as `nfnet-zoo export` does (weight standardisation and the "
             "scalar multipliers folded into plain convolutions, `torch.onnx.export(dynamo=True)`, one file with a "
             "dynamic batch), run by "
             "onnxruntime with its default session options (all graph optimisations, intra-op threads = cores); "
             "against eager timm `dm_nfnet_f0`, eager ours and `optimize_for_inference` (channels_last, standardised "
             f"once). fp32, NCHW input, median of {repeats} interleaved repeats; timm / x above 1: x is faster than "
             "timm's eager model. Last column: max |logit - eager ours|.", "",
             "| batch x px | timm eager ms | ours eager | onnxruntime | optimize_for_inference | "
             "onnxruntime single repeats | onnxruntime dev. |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r[k + '_s'] * 1e3:.0f} ms, {r[k + '_ratio']:.2f}x" for k in ("ours", "onnxruntime",
                                                                               "optimize_for_inference")]
        lines.append(f"| {r['batch']} x {r['size']} | {r['timm_s'] * 1e3:.0f} | {' | '.join(cells)} | "
                     f"{r['onnxruntime_spread'][0]:.2f}-{r['onnxruntime_spread'][1]:.2f} | "
                     f"{r['dev']['onnxruntime']:.1e} |")
    return lines


def _step_fn(model, which: str, device, batch: int, size: int, fmt) -> Callable[[], None]:
    """One training step as each project does it: ours with our AGC, timm's as its train.py does."""
    from timm.models import model_parameters
    from timm.utils import dispatch_clip_grad

    from nfnet_zoo import adaptive_clip_grad_, clipped_parameters, weight_decay_groups

    torch.manual_seed(1)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (batch,), device=device)
    model = model.train().to(memory_format=fmt)
    opt = torch.optim.SGD(weight_decay_groups(model, 2e-5), lr=0.01, momentum=0.9, nesterov=True)
    if which == "ours":
        clipped = clipped_parameters(model)
        clip = lambda: adaptive_clip_grad_(clipped, 0.01)  # noqa: E731
    else:
        clipped = list(model_parameters(model, exclude_head=True))
        clip = lambda: dispatch_clip_grad(clipped, 0.01, mode="agc")  # noqa: E731

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        clip()
        opt.step()

    return step


def bench_train(theirs, ours, device, batch: int, size: int, repeats: int) -> list[dict]:
    rows = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        a, b = copy.deepcopy(theirs), copy.deepcopy(ours)
        steps = {"ours": _step_fn(b, "ours", device, batch, size, fmt),
                 "timm": _step_fn(a, "timm", device, batch, size, fmt)}
        t = _interleaved(steps, device, repeats, warmup=1)
        rows.append(dict(case=f"training step (fwd, bwd, AGC, SGD), {'channels_last' if fmt == torch.channels_last else 'NCHW'}",
                         batch=batch, size=size, ours_s=t["ours"], timm_s=t["timm"], ratio=t["timm"] / t["ours"],
                         spread=t["spread"], faults=t.get("faults"),
                         ours_img_s=batch / t["ours"], timm_img_s=batch / t["timm"]))
        print(_fmt_row(rows[-1]), flush=True)
        del a, b
    return rows


_MEMORY_CHILD = """
import json, resource, sys, torch, timm, nfnet_zoo
sys.path.insert(0, {here!r})
from bench import _step_fn
dev = torch.device({device!r})
torch.manual_seed(0)
model = timm.create_model({arch!r}).to(dev)
with torch.no_grad():
    for n, p in model.named_parameters():
        if n.endswith("skipinit_gain"):
            p.fill_(1.0)
step = _step_fn(model, {which!r}, dev, {batch}, {size}, torch.contiguous_format)
if dev.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
for _ in range(3):
    step()
def hwm():
    # VmHWM belongs to this process image; ru_maxrss survives exec and would report the parent's peak.
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else hwm()
print(json.dumps(dict(peak_bytes=peak)))
"""


def bench_memory(device, batch: int, size: int) -> dict:
    """Peak memory of training steps, each model in a fresh process (RSS on the CPU, allocator on a GPU)."""
    peaks = {}
    for which in ("ours", "timm"):
        arch = "nfnet_f0" if which == "ours" else "dm_nfnet_f0"
        code = _MEMORY_CHILD.format(here=str(HERE), which=which, arch=arch, device=str(device), batch=batch, size=size)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(r.stderr[-2000:])
        peaks[which] = json.loads(r.stdout.strip().splitlines()[-1])["peak_bytes"]
    row = dict(case=f"peak memory of a training step ({'max allocated' if device.type == 'cuda' else 'peak RSS of a fresh process'})",
               batch=batch, size=size, ours_mb=peaks["ours"] / 2**20, timm_mb=peaks["timm"] / 2**20,
               ratio=peaks["ours"] / peaks["timm"])
    print(f"{row['case']}: ours {row['ours_mb']:.0f} MiB, timm {row['timm_mb']:.0f} MiB, ours/timm {row['ratio']:.2f}")
    return row


def _fmt_row(r: dict) -> str:
    dev = f"  max |logit - DeepMind| ours {r['ours_dev']:.1e}, timm {r['timm_dev']:.1e}" if "ours_dev" in r else ""
    faults = f", page faults ours {r['faults'][0] / 1e3:.0f}k timm {r['faults'][1] / 1e3:.0f}k" if r.get("faults") else ""
    return (f"{r['case']}: ours {r['ours_s'] * 1e3:.0f} ms, timm {r['timm_s'] * 1e3:.0f} ms, "
            f"timm/ours {r['ratio']:.2f}x (repeats {r['spread'][0]:.2f}-{r['spread'][1]:.2f}{faults}){dev}")


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _machine(device) -> str:
    import timm

    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "none"
    return (f"CPU {cpu_name()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; GPU {gpu}; "
            f"Python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}")


_GPU_HEADING = "## GPU run"


_KEPT_HEADING = "## Start-up before the first training step"  # written by bench_startup.py


def _merge(path: Path, lines: list[str], gpu: bool) -> str:
    """A CPU run rewrites the file but keeps its GPU section; a GPU run replaces only that section.
    Either keeps bench_startup.py's section, at the end."""
    old = path.read_text() if path.exists() else ""
    kept = old.find("\n" + _KEPT_HEADING)
    if kept >= 0:
        end = old.find("\n## ", kept + 1)
        section, old = old[kept + 1:end + 1 if end >= 0 else None], old[:kept + 1] + (old[end + 1:] if end >= 0 else "")
        return _merge_main(old, lines, gpu).rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    return _merge_main(old, lines, gpu)


def _merge_main(old: str, lines: list[str], gpu: bool) -> str:
    start = old.find("\n" + _GPU_HEADING)
    kept_gpu = old[start + 1:] if start >= 0 else ""
    if not gpu:
        kept_gpu = kept_gpu or (f"{_GPU_HEADING}\n\nNot measured yet. On a machine with a CUDA GPU, "
                                "`python benchmarks/bench.py --skip e2e` fills this section (batch 32; fp32, "
                                "bf16 autocast, channels_last, torch.compile) and leaves the CPU tables as "
                                "they are.\n")
        return "\n".join(["# Benchmarks", ""] + lines) + "\n\n" + kept_gpu
    cpu_part = (old[:start + 1] if start >= 0 else old) or "# Benchmarks\n"
    section = [_GPU_HEADING, ""] + [("#" + line if line.startswith("## ") else line) for line in lines]
    return cpu_part.rstrip("\n") + "\n\n" + "\n".join(section) + "\n"


# Measured at e61264f (the last commit with them), kernels on vs off on the same nfnet_f0 (random weights), medians
# of 7 interleaved rounds on this 2-core machine, `nfnet_zoo.fast_kernels(True/False)`; removed at c2d7fc4 because
# their eval output was not the reference's bits (5.9e-8 on nfnet_zoo_tiny, 2.0e-7 on nfnet_f0), which timm's exact
# FX test requires. (case, kernels on ms, off ms, off / on, single rounds)
REMOVED_KERNELS = [
    ("eval fp32, NCHW", "8 x 256", 1360, 1619, 1.21, "1.10-1.27"),
    ("eval fp32, channels_last", "8 x 256", 1152, 1512, 1.31, "1.28-1.34"),
    ("eval bfloat16 autocast, channels_last", "8 x 256", 622, 842, 1.35, "1.33-1.36"),
    ("training step (fwd, bwd, AGC, SGD), NCHW", "8 x 192", 2147, 2367, 1.10, "1.04-1.22"),
    ("training step (fwd, bwd, AGC, SGD), channels_last", "8 x 192", 2031, 2391, 1.17, "0.67-2.09"),
]


def _speed_path_lines(rows: list[dict]) -> list[str]:
    lines = ["", "## The speed path on and off (same model)", "",
             "`optimize_for_inference` serves a copy whose weight standardisation is computed once "
             "(`nfnet_zoo.models.inference.standardize_once`); \"off\" is the model itself, the reference path "
             "and the only one training takes. Same `nfnet_f0` weights, same input, interleaved; off / on above 1: "
             "the speed path is faster. \"same bits\": `torch.equal` of the two outputs.", "",
             "| case | batch x px | on ms | off ms | off / on | single repeats | same bits |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['batch']} x {r['size']} | {r['on_s'] * 1e3:.0f} | {r['off_s'] * 1e3:.0f} | "
                     f"{r['ratio']:.2f}x | {r['spread'][0]:.2f}-{r['spread'][1]:.2f} | "
                     f"{'yes' if r['same_bits'] else 'NO'} |")
    lines += ["", "Training has no speed path: the CPU kernels that had one were removed because they did not give "
              "the reference's bits. What they bought, kernels on vs off on the same `nfnet_f0`, measured at "
              "e61264f before their removal (medians of 7 interleaved rounds, this machine):", "",
              "| case | batch x px | kernels on ms | off ms | off / on | single rounds |", "|---|---|---|---|---|---|"]
    lines += [f"| {c} | {b} | {on} | {off} | {r:.2f}x | {s} |" for c, b, on, off, r, s in REMOVED_KERNELS]
    return lines


def write_markdown(path: Path, machine: str, command: str, rows: list[dict], agc: dict | None,
                   mem: dict | None, e2e: str | None, repeats: int, gpu: bool = False,
                   speed: list[dict] | None = None, export: list[dict] | None = None) -> None:
    lines = [f"Machine: {machine}", "", f"Command: `{command}`", "",
             "Ratios are timm / ours for time (above 1: ours is faster). Each figure is the median of "
             f"{repeats} runs after warm-up, the two models alternating; \"single repeats\" gives the lowest and "
             "highest ratio of one back-to-back pair, a measure of the machine's noise. Both models hold the same "
             "weights (timm's `dm_nfnet_f0` layout, pretrained-like values) and use the same memory "
             "format. Deviation: max |logit - reference| where the reference is a float64 model with "
             "DeepMind's numerics. Page faults: median minor faults per run, thousands, ours / timm; each "
             "costs about 1.5 us here, and their count changes from process to process with the allocator's "
             "history, which is most of the spread between runs of the eager fp32 cases.", "",
             "| case | batch x px | ours ms | timm ms | timm / ours | single repeats | page faults | ours dev. "
             "| timm dev. |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        dev = (f"{r['ours_dev']:.1e} | {r['timm_dev']:.1e}" if "ours_dev" in r else "- | -")
        faults = f"{r['faults'][0] / 1e3:.0f}k / {r['faults'][1] / 1e3:.0f}k" if r.get("faults") else "-"
        lines.append(f"| {r['case']} | {r['batch']} x {r['size']} | {r['ours_s'] * 1e3:.0f} | "
                     f"{r['timm_s'] * 1e3:.0f} | {r['ratio']:.2f}x | {r['spread'][0]:.2f}-{r['spread'][1]:.2f} | "
                     f"{faults} | {dev} |")
    if speed:
        lines += _speed_path_lines(speed)
    if export:
        lines += _export_lines(export, repeats)
    if agc:
        lines += ["", "## AGC alone (F0 gradients, batch 8, 192 px)", "",
                  f"ours {agc['ours_ms']:.1f} ms, timm's `adaptive_clip_grad` {agc['timm_ms']:.1f} ms: "
                  f"timm / ours **{agc['speedup_vs_timm']:.2f}x**; {agc['ours_pct_of_step']:.2f}% of a "
                  f"{agc['train_step_ms']:.0f} ms training step (timm's {agc['timm_pct_of_step']:.2f}%). "
                  f"Reading every parameter and gradient once: {agc['read_params_and_grads_ms']:.1f} ms. "
                  f"Ours with every unit clipped: "
                  f"{agc['ours_every_unit_clipped_ms']:.1f} ms."]
    if mem:
        lines += ["", "## Peak memory of a training step", "",
                  f"{mem['case']}, batch {mem['batch']} x {mem['size']} px: ours {mem['ours_mb']:.0f} MiB, "
                  f"timm {mem['timm_mb']:.0f} MiB, ours / timm {mem['ratio']:.2f}."]
    if e2e:
        lines += ["", "## End to end: `nfnet-zoo finetune` vs a timm train.py-style loop", "", "```", e2e.strip(), "```"]
    path.write_text(_merge(path, lines, gpu))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats")
    p.add_argument("--skip", default="", help="comma-separated: inference,compile,speedpath,export,train,agc,memory,e2e")
    p.add_argument("--out", default=str(HERE.parent / "BENCHMARKS.md"))
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    import timm

    import nfnet_zoo  # noqa: F401

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    machine = _machine(device)
    print(machine, flush=True)
    repeats = 3 if args.quick else 11  # this shared VM's single repeats spread by 5-30%
    theirs = _pretrained_like().to(device)
    ours = timm.create_model("nfnet_f0").to(device)
    ours.load_state_dict(theirs.state_dict())
    gpu = device.type == "cuda"
    rows = []
    if "inference" not in skip:
        rows += bench_inference(theirs, ours, device, 32 if gpu else 8, 256, repeats, "compile" not in skip)
    speed = None if "speedpath" in skip else bench_speed_path(ours, device, 32 if gpu else 8, 256, repeats)
    export = None if "export" in skip or gpu else bench_export(theirs, ours, (1, 8), 256, repeats)
    if "train" not in skip:
        rows += bench_train(theirs, ours, device, 32 if gpu else 8, 192, repeats)
    agc = None
    if "agc" not in skip:
        from bench_agc import run_benchmark

        agc = run_benchmark(repeats=9 if args.quick else 15, step_repeats=3 if args.quick else 5)
        print(f"AGC alone: ours {agc['ours_ms']:.1f} ms, timm {agc['timm_ms']:.1f} ms, "
              f"{agc['speedup_vs_timm']:.2f}x, {agc['ours_pct_of_step']:.2f}% of a step", flush=True)
    mem = None if "memory" in skip else bench_memory(device, 8, 192)
    e2e = None
    if "e2e" not in skip:
        r = subprocess.run([sys.executable, str(HERE / "bench_finetune.py"), "--repeats", "2" if args.quick else "3"],
                           capture_output=True, text=True)
        e2e = r.stdout[r.stdout.find("\nnfnet_zoo_tiny"):] if r.returncode == 0 else f"failed: {r.stderr[-500:]}"
        print(e2e, flush=True)
    command = "python benchmarks/bench.py" + (" --quick" if args.quick else "") + (f" --skip {args.skip}" if skip else "")
    write_markdown(Path(args.out), machine, command, rows, agc, mem, e2e, repeats, gpu=gpu, speed=speed,
                   export=export)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
