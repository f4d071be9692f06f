"""Vision Mamba against DeiT: training and inference throughput, MFU and peak memory, in one process, on one GPU.

    python benchmarks/vim.py --out vim.json                      # the issue's four workloads, Vim-Ti vs DeiT-Ti
    python benchmarks/vim.py --models vim_tiny vim_tiny+ckpt deit_tiny_patch16_224 --workloads train@1248x16
    python benchmarks/vim.py --task --workloads train@224x256    # also our ImageClassification via Lightning
    python benchmarks/vim.py --models vim_tiny --workloads train@224x256 --profile 25   # where the step's time goes
    python benchmarks/vim.py --smoke                             # CPU, tiny sizes: checks the script runs

Workloads are ``train@SIZExBATCH`` or ``infer@SIZExBATCH``; the defaults are training and inference at 224
(batch 256) and at 1248x1248 (batch 16). Models are timm names (``vim_tiny`` is ours, registered by
``mmpretrain.models``; ``deit_tiny_patch16_224`` uses timm's fused SDPA attention), optionally with
``+ckpt`` (per-block activation checkpointing; training only), ``+compile`` (``torch.compile``, default mode;
our scan and convolution kernels enter the graph as custom ops), ``+graphs`` (``torch.compile`` with
``mode="reduce-overhead"``: CUDA graphs), ``+autotune`` (``torch.compile`` autotuning its matrix products:
``mode="max-autotune"``, CUDA graphs included, with ``+graphs``; ``"max-autotune-no-cudagraphs"``, as the DeiT
recipes compile, without), ``+fused`` (training: AdamW's single fused kernel, ``fused=True``, as our recipes
run it, instead of PyTorch's default multi-tensor ``foreach`` implementation) and ``+freescan`` (Vim only: each
selective scan replaced by an elementwise stand-in that reads the scan's inputs and writes its output once, with
gradients for all of them; the step then costs everything but the scan). The default compares vim_tiny,
vim_tiny+ckpt, deit_tiny_patch16_224 (eager: the issue's anchor) and deit_tiny_patch16_224+graphs (DeiT-Ti at
its fastest: eager it is host-bound at 224, and graphs train it 2.1x faster on an H200).

Every run: synthetic batch already on the GPU, bf16 autocast, float32 weights; training is forward,
cross-entropy, backward and an AdamW step; inference runs under ``torch.inference_mode``. Median step time
over the timed steps after warm-up (benchmarks/timing.py), samples/s, peak memory, and MFU: FLOPs of one
step over its time and the bf16 dense peak. FLOPs are counted with FlopCounterMode on the meta device
(matrix products and convolutions; the mixer skips its scan on meta tensors); the selective scan adds
9 * batch * d_inner * L * d_state per layer and direction forward (mamba_ssm's count), three times that for
a training step. Prints a table with each model's ratio to the first model that is not ours (DeiT-Ti) and
writes JSON.

``--bound`` also prints, for each ``+freescan`` row, an upper bound on any Vim step with the same model code
around its scans: the free-scan step, less the stand-in's own kernel time (profiled alone, compiled, at the same
shapes: inside the step Inductor may fuse it with its neighbours, so this subtracts at least what it costs
there), plus the scans' exponentials at the GPU's measured rate (benchmarks/exp_rate.py): one per channel, state and step
forward; training adds one for the backward, which must recompute the decays to keep O(batch * dim * L) memory,
and one more with ``+ckpt``, whose blocks run their forward twice. A scan cannot take less than its
exponentials, and the rest of the step is measured, so no scan kernel makes this model faster than the bound.

    python benchmarks/vim.py --bound --models vim_tiny+graphs+freescan deit_tiny_patch16_224 --workloads infer@1248x16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import time
from collections.abc import Callable
from typing import Any
from unittest import mock

import timm
import torch
import torch.nn.functional as F
from timing import peak_flops, timed
from torch.utils.flop_counter import FlopCounterMode

import mmpretrain.models  # noqa: F401  (registers vim_* with timm)
import mmpretrain.models.mamba as mamba_module
from mmpretrain.models.mamba import BiMambaMixer

DEFAULT_WORKLOADS = ["train@224x256", "infer@224x256", "train@1248x16", "infer@1248x16"]
DEFAULT_MODELS = ["vim_tiny", "vim_tiny+ckpt", "deit_tiny_patch16_224", "deit_tiny_patch16_224+graphs"]
# --smoke: a CPU run at tiny sizes, to check that the script works end to end
SMOKE_WORKLOADS = ["train@64x2", "infer@64x2"]
SMOKE_KWARGS = {"depth": 2}


def parse_workload(spec: str) -> tuple[str, int, int]:
    try:
        mode, rest = spec.split("@")
        size, batch = (int(v) for v in rest.split("x"))
    except ValueError:
        raise SystemExit(f"--workloads: {spec!r} is not MODE@SIZExBATCH (e.g. train@224x256)") from None
    if mode not in ("train", "infer"):
        raise SystemExit(f"--workloads: {spec!r}: mode must be train or infer")
    return mode, size, batch


def parse_model(spec: str) -> tuple[str, set[str]]:
    name, *flags = spec.split("+")
    unknown = set(flags) - {"ckpt", "compile", "graphs", "autotune", "fused", "freescan"}
    if unknown:
        raise SystemExit(f"--models: {spec!r}: unknown option(s) {sorted(unknown)}; use +ckpt, +compile, +graphs, "
                         "+autotune, +fused or +freescan")
    if name not in timm.list_models():
        raise SystemExit(f"--models: {name!r} is not a timm model name")
    if "freescan" in flags and not name.startswith("vim"):
        raise SystemExit(f"--models: {spec!r}: +freescan replaces Vim's selective scan; {name} has none")
    return name, set(flags)


def build(name: str, size: int, num_classes: int, extra: dict[str, Any]) -> torch.nn.Module:
    return timm.create_model(name, img_size=size, num_classes=num_classes, **extra)


def free_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, out_scale=1.0,
              out_add=None, **_):
    """The ``+freescan`` stand-in for ``selective_scan`` (the arguments the mixer passes): elementwise in u's dtype,
    reading each input once and writing u's shape once, with a gradient for every input."""
    dtype = u.dtype
    s = (B.sum(1, keepdim=True) + C.sum(1, keepdim=True)).to(dtype) + A.sum().to(dtype)
    if delta_bias is not None:
        s = s + delta_bias.to(dtype)[:, None]
    if D is not None:
        s = s + D.to(dtype)[:, None]
    y = u * (delta + s)
    if z is not None:
        y = y * z
    y = y * out_scale
    return y + out_add if out_add is not None else y


def scan_state_steps(model: torch.nn.Module, batch: int) -> int:
    """(channel, state, step) triples the selective scans of one forward pass walk: each takes an exponential."""
    L = getattr(getattr(model, "patch_embed", None), "num_patches", 0) + 1
    return sum(2 * batch * m.d_inner * L * m.d_state for m in model.modules() if isinstance(m, BiMambaMixer))


def scan_flops(model: torch.nn.Module, batch: int) -> int:
    """Forward FLOPs of the selective scans (not seen by FlopCounterMode): 9 per state-step (mamba_ssm's count)."""
    return 9 * scan_state_steps(model, batch)


def count_flops(name: str, size: int, batch: int, num_classes: int, train: bool, extra: dict[str, Any]) -> int:
    with torch.device("meta"):
        model = build(name, size, num_classes, extra)
        x = torch.empty(batch, 3, size, size)
        y = torch.zeros(batch, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        if train:
            F.cross_entropy(model(x), y).backward()
        else:
            with torch.no_grad():
                model(x)
    return int(counter.get_total_flops()) + scan_flops(model, batch) * (3 if train else 1)


def time_steps(step: Callable[[], object], steps: int, warmup: int, device: torch.device) -> list[float]:
    if device.type == "cuda":
        return timed(step, steps, warmup)
    times = []  # CPU (--smoke): nothing to synchronise
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def profile_steps(step: Callable[[], object], steps: int, top: int) -> dict[str, Any]:
    """GPU time per step: in all and for the ``top`` kernels (torch.profiler over ``steps`` steps, after the
    timed ones), with the step's wall time over the same steps: their difference is time the GPU waited."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    kernels: dict[str, tuple[float, int]] = {}
    for evt in prof.key_averages():
        us = getattr(evt, "self_device_time_total", 0.0)
        if us and "CUDA" in str(getattr(evt, "device_type", "")):
            kernels[evt.key] = (us / 1e3 / steps, evt.count // steps)
    gpu_ms = sum(ms for ms, _ in kernels.values())
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]
    return {"wall_ms_profiled": wall_ms, "gpu_ms": gpu_ms, "launches": sum(n for _, n in kernels.values()),
            "top_kernels": [{"kernel": k[:110], "ms": ms, "calls": n} for k, (ms, n) in ranked]}


def bench_model(spec: str, mode: str, size: int, batch: int, steps: int, warmup: int, num_classes: int,
                device: torch.device, extra: dict[str, Any], profile: int = 0) -> dict[str, Any]:
    """One model on one workload: a plain loop, bf16 autocast on CUDA (float32 on CPU); with ``profile``, the
    top kernels of the step too (:func:`profile_steps`)."""
    name, flags = parse_model(spec)
    stand_in = mock.patch.object(mamba_module, "selective_scan", free_scan)
    with stand_in if "freescan" in flags else contextlib.nullcontext():
        return _bench_model(name, flags, mode, size, batch, steps, warmup, num_classes, device, extra, profile)


def _bench_model(name: str, flags: set[str], mode: str, size: int, batch: int, steps: int, warmup: int,
                 num_classes: int, device: torch.device, extra: dict[str, Any], profile: int) -> dict[str, Any]:
    model = build(name, size, num_classes, extra).to(device)
    if "ckpt" in flags:
        model.set_grad_checkpointing(True)
    train = mode == "train"
    model.train(train)
    if "autotune" in flags:
        model = torch.compile(model, mode="max-autotune" if "graphs" in flags else "max-autotune-no-cudagraphs")
    elif "graphs" in flags:
        model = torch.compile(model, mode="reduce-overhead")
    elif "compile" in flags:
        model = torch.compile(model)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, num_classes, (batch,), device=device)
    opt = None
    if train:  # fused=None: PyTorch's default (foreach on CUDA); fused needs the parameters on a GPU
        fused = True if "fused" in flags and device.type == "cuda" else None
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, fused=fused)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def train_step():
        with autocast:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def infer_step():
        with torch.inference_mode(), autocast:
            model(x)

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        times = time_steps(train_step if train else infer_step, steps, warmup, device)
    except torch.cuda.OutOfMemoryError:
        return {"error": "out of memory"}
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else math.nan
    out = {"step_s": statistics.median(times), "peak_gib": peak,
           "params": sum(p.numel() for p in model.parameters())}
    if profile and device.type == "cuda":
        out["profile"] = profile_steps(train_step if train else infer_step, 3, profile)
    return out


def standin_seconds(mixer: BiMambaMixer, batch: int, L: int, train: bool, iters: int = 10) -> float:
    """Kernel seconds (profiled: no host time) of one :func:`free_scan` call at a mixer's shapes (bf16,
    channels-contiguous as the mixer passes them, with the output epilogue), compiled; with ``train`` its backward
    too."""
    E, N, dev = mixer.d_inner, mixer.d_state, "cuda"

    def cl(channels):  # (batch, channels, L) views of (batch, L, channels) tensors
        return torch.randn(batch, L, channels, device=dev, dtype=torch.bfloat16).transpose(1, 2)

    inputs = [cl(E), cl(E), -torch.rand(E, N, device=dev) - 0.5, cl(N), cl(N), torch.ones(E, device=dev), cl(E),
              torch.zeros(E, device=dev), cl(E)]
    for t in inputs:
        t.requires_grad_(train)

    def scan(u, delta, A, B, C, D, z, bias, add):
        return free_scan(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True, out_scale=0.5,
                         out_add=add)

    fn = torch.compile(scan)
    gout = cl(E)

    def step():
        with torch.inference_mode(not train):
            y = fn(*inputs)
            if train:
                torch.autograd.grad(y, inputs, gout)

    for _ in range(3):
        step()
    return profile_steps(step, iters, top=1)["gpu_ms"] / 1e3


def anchor_of(rows: list[dict[str, Any]], workload: str) -> dict[str, Any] | None:
    """The workload's first timed loop row of a model that is not ours (DeiT-Ti), or None."""
    return next((b for b in rows if b["workload"] == workload and b["how"] == "loop"
                 and not b["model"].startswith("vim") and "step_s" in b), None)


def print_bounds(rows: list[dict[str, Any]], extra: dict[str, Any]) -> None:
    """For each ``+freescan`` row, the bound of the module docstring as samples/s and as a ratio to the workload's
    anchor (adds ``exp2_per_s``, ``standin_ms``, ``scan_exp_ms`` and ``bound_samples_per_s`` to the row)."""
    from exp_rate import exp2_per_second

    rate = exp2_per_second()
    print(f"\nexponentials: {rate / 1e12:.2f}e12 per second (tl.exp2, benchmarks/exp_rate.py)")
    print(f"{'workload':16} {'model':34} {'free-scan ms':>12} {'stand-in ms':>11} {'exp ms':>8} {'bound/s':>10} "
          f"{'x anchor':>9}")
    for r in rows:
        if "freescan" not in r["model"] or "step_s" not in r:
            continue
        name, flags = parse_model(r["model"])
        with torch.device("meta"):
            model = build(name, r["image_size"], 1000, extra)
        mixers = [m for m in model.modules() if isinstance(m, BiMambaMixer)]
        L = model.patch_embed.num_patches + 1
        train = r["mode"] == "train"
        standin_s = 2 * len(mixers) * standin_seconds(mixers[0], r["batch"], L, train)
        exp_s = scan_state_steps(model, r["batch"]) * (3 if "ckpt" in flags else 2 if train else 1) / rate
        bound = r["batch"] / (r["step_s"] - standin_s + exp_s)
        anchor = anchor_of(rows, r["workload"])
        ratio = bound / anchor["samples_per_s"] if anchor else math.nan
        r.update(exp2_per_s=rate, standin_ms=standin_s * 1e3, scan_exp_ms=exp_s * 1e3, bound_samples_per_s=bound)
        print(f"{r['workload']:16} {r['model']:34} {r['step_s'] * 1e3:12.2f} {standin_s * 1e3:11.2f} "
              f"{exp_s * 1e3:8.2f} {bound:10.1f} {ratio:8.2f}x")


def bench_task(name: str, batch: int, steps: int, warmup: int, num_classes: int) -> dict[str, Any]:
    """Our ImageClassification task through Lightning's Trainer at 224 (benchmarks/classification.py)."""
    from classification import bench_ours

    return bench_ours(name, batch, steps, warmup, num_classes, compile=False, fused=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=None, help=f"default: {' '.join(DEFAULT_MODELS)}")
    parser.add_argument("--workloads", nargs="+", default=None, help=f"default: {' '.join(DEFAULT_WORKLOADS)}")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--task", action="store_true",
                        help="also time our ImageClassification task (Lightning, bf16-mixed, fused AdamW) on "
                             "train@224 workloads, for each model without options")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes (depth 2, 64 px, batch 2, 2 steps)")
    parser.add_argument("--bound", action="store_true",
                        help="measure the GPU's exponential rate and print, for each +freescan row, the fastest a "
                             "Vim step could be (see the module docstring)")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    parser.add_argument("--profile", type=int, default=0, metavar="TOP",
                        help="also profile 3 steps of each loop run: GPU time per step, kernel launches, and the TOP "
                             "kernels by GPU time (printed after the table)")
    args = parser.parse_args()

    if args.smoke:
        device, extra = torch.device("cpu"), dict(SMOKE_KWARGS)
        workloads = args.workloads or SMOKE_WORKLOADS
        steps, warmup = min(args.steps, 2), min(args.warmup, 1)
        peak = math.nan
    else:
        if not torch.cuda.is_available():
            raise SystemExit("benchmarks/vim.py needs a CUDA GPU; use --smoke to check it on CPU")
        device, extra = torch.device("cuda"), {}
        workloads = args.workloads or DEFAULT_WORKLOADS
        steps, warmup = args.steps, args.warmup
        peak = peak_flops()
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # --smoke checks the script, not the compiler: no torch.compile there unless asked for
    models = args.models or [m for m in DEFAULT_MODELS if not (args.smoke and "+graphs" in m)]
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"

    rows = []
    for workload in workloads:
        mode, size, batch = parse_workload(workload)
        for spec in models:
            name, flags = parse_model(spec)
            if mode == "infer" and flags & {"ckpt", "fused"}:
                continue  # checkpointing and the optimizer change nothing without a backward pass
            flops = count_flops(name, size, batch, args.num_classes, mode == "train", extra)
            runs = ["loop"]
            if args.task and mode == "train" and size == 224 and spec == name and device.type == "cuda":
                runs.append("task")
            for how in runs:
                if how == "loop":
                    r = bench_model(spec, mode, size, batch, steps, warmup, args.num_classes, device, extra,
                                    args.profile)
                else:
                    r = bench_task(name, batch, steps, warmup, args.num_classes)
                r.update(workload=workload, model=spec, how=how, mode=mode, image_size=size, batch=batch,
                         flops_per_step=flops, device=device_name, torch=torch.__version__)
                if "step_s" in r:
                    r.update(samples_per_s=batch / r["step_s"], mfu=flops / r["step_s"] / peak)
                rows.append(r)
                print(json.dumps({k: v for k, v in r.items() if k != "profile"}), flush=True)

    print(f"\n{'workload':16} {'model':28} {'how':5} {'samples/s':>10} {'MFU':>7} {'peak GiB':>9} "
          f"{'x anchor':>9} {'mem x':>6}")
    for r in rows:
        anchor = anchor_of(rows, r["workload"])
        if "step_s" not in r:
            print(f"{r['workload']:16} {r['model']:28} {r['how']:5} {r['error']:>10}")
            continue
        speed = r["samples_per_s"] / anchor["samples_per_s"] if anchor else math.nan
        mem = r["peak_gib"] / anchor["peak_gib"] if anchor and anchor["peak_gib"] else math.nan
        print(f"{r['workload']:16} {r['model']:28} {r['how']:5} {r['samples_per_s']:10.1f} {100 * r['mfu']:6.1f}% "
              f"{r['peak_gib']:9.2f} {speed:8.2f}x {mem:5.2f}x")
    if args.bound and device.type == "cuda":
        print_bounds(rows, extra)
    for r in rows:
        if "profile" in r:
            prof = r["profile"]
            print(f"\n{r['workload']} {r['model']}: step {prof['wall_ms_profiled']:.1f} ms wall, "
                  f"{prof['gpu_ms']:.1f} ms GPU, {prof['launches']} kernel launches per step")
            for k in prof["top_kernels"]:
                print(f"  {k['ms']:8.2f} ms {k['calls']:5d} x  {k['kernel']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
