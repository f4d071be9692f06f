"""Depthwise causal conv1d + SiLU (the Vim mixer's convolution): forward and backward GPU time of the triton
kernels at several block shapes, against the reference (PyTorch's conv1d) and the memory floor.

Inputs are what the mixer passes: x a channels-contiguous (batch, dim, L) view of a (batch, L, 2 dim) bf16
projection, weight (dim, 4), bias (dim,). Times are medians of CUDA-event timings of the kernels alone
(``triton.testing.do_bench``, inputs rotated so the cache is not reused across calls); the floor is the bytes
a pass must move (forward: x read, out written; backward: x and dout read, dx written) over the
device-to-device copy bandwidth measured in the same run.

    python benchmarks/causal_conv1d.py                                   # Vim-Ti at 224 (b256) and 1248 (b16)
    python benchmarks/causal_conv1d.py --blocks 16:64:4 32:64:4 64:64:8  # (steps, channels, warps) to try
"""

from __future__ import annotations

import argparse
import datetime
import json

import torch
from timing import copy_bandwidth

from mmpretrain.ops.causal_conv1d import causal_conv1d_reference
from mmpretrain.ops.causal_conv1d import triton_kernels as tk


def inputs(batch: int, dim: int, L: int, sets: int = 4):
    """``sets`` independent input sets (rotated by the timing, so each call reads memory, not the cache)."""
    out = []
    for i in range(sets):
        g = torch.Generator(device="cpu").manual_seed(i)
        xz = torch.randn(batch, L, 2 * dim, generator=g).to("cuda", torch.bfloat16)
        x = xz[..., :dim].transpose(1, 2).requires_grad_(True)
        w = (torch.randn(dim, 4, generator=g) * 0.5).cuda().requires_grad_(True)
        b = torch.randn(dim, generator=g).cuda().requires_grad_(True)
        dout = torch.randn(batch, L, dim, generator=g).to("cuda", torch.bfloat16).transpose(1, 2)
        out.append((x, w, b, dout))
    return out


def bench(fn, sets, backward: bool) -> float:
    """Median ms of a forward (or, with ``backward``, of the backward alone) over rotated input sets."""
    import triton.testing

    state = {"i": 0}
    outs = [fn(x, w, b) for x, w, b, _ in sets] if backward else None

    def call():
        i = state["i"] = (state["i"] + 1) % len(sets)
        x, w, b, dout = sets[i]
        if backward:
            torch.autograd.grad(outs[i], (x, w, b), dout, retain_graph=True)
        else:
            with torch.no_grad():
                fn(x, w, b)

    return triton.testing.do_bench(call, warmup=20, rep=100, return_mode="median")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["256:384:197", "16:384:6085"], help="batch:dim:L")
    p.add_argument("--blocks", nargs="+", default=["16:64:4", "32:64:4", "64:64:4", "32:32:2", "64:128:8"],
                   help="steps:channels:warps per program (per tile in the backward), tried for both kernels")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    bw = copy_bandwidth("cuda")
    rows = []
    defaults = (tk.FWD_BLOCKS, tk.BWD_BLOCKS)
    for shape in args.shapes:
        batch, dim, L = (int(v) for v in shape.split(":"))
        sets = inputs(batch, dim, L)
        act = batch * dim * L * 2  # bytes of one bf16 activation
        floors = {"fwd": 2 * act / bw * 1e3, "bwd": 3 * act / bw * 1e3}
        ref = lambda x, w, b: causal_conv1d_reference(x, w, b, "silu")  # noqa: E731
        x0, w0, b0, _ = sets[0]
        expected = ref(x0.float(), w0, b0)
        rows.append(dict(shape=shape, impl="reference (F.conv1d)", fwd_ms=bench(ref, sets, False),
                         bwd_ms=bench(ref, sets, True), **{f"floor_{k}_ms": v for k, v in floors.items()}))
        for spec in args.blocks:
            blocks = tuple(int(v) for v in spec.split(":"))
            tk.FWD_BLOCKS = tk.BWD_BLOCKS = blocks
            fn = lambda x, w, b: tk.causal_conv1d_triton(x, w, b, "silu")  # noqa: E731
            err = ((fn(x0, w0, b0).float() - expected).norm() / expected.norm()).item()
            rows.append(dict(shape=shape, impl=f"triton {spec}", fwd_ms=bench(fn, sets, False),
                             bwd_ms=bench(fn, sets, True), rel_err=err,
                             **{f"floor_{k}_ms": v for k, v in floors.items()}))
        tk.FWD_BLOCKS, tk.BWD_BLOCKS = defaults
        del sets
        torch.cuda.empty_cache()
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, {datetime.date.today()}; copy bandwidth "
          f"{bw / 1e12:.2f} TB/s; defaults: forward {defaults[0]}, backward {defaults[1]} "
          "(steps, channels, warps)")
    print(f"{'shape b:d:L':14} {'implementation':22} {'fwd ms':>8} {'x floor':>8} {'bwd ms':>8} {'x floor':>8}")
    for r in rows:
        print(f"{r['shape']:14} {r['impl']:22} {r['fwd_ms']:8.3f} {r['fwd_ms'] / r['floor_fwd_ms']:7.1f}x "
              f"{r['bwd_ms']:8.3f} {r['bwd_ms'] / r['floor_bwd_ms']:7.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
