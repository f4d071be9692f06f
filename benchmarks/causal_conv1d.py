"""Depthwise causal conv1d + SiLU (the Vim mixer's convolution): forward and backward GPU time of the triton
kernels at several block shapes, against the reference (PyTorch's conv1d) and the memory floor; then both
directions of one x (the bidirectional mixer's two convolutions), as two single-direction calls (autograd adds
their dx) and as ``causal_conv1d_bidirectional`` (one forward kernel for both, at its own block shapes; two
backward kernels, the second adding its dx to the first's).

Inputs are what the mixer passes: x a channels-contiguous (batch, dim, L) view of a (batch, L, 2 dim) bf16
projection, weight (dim, 4), bias (dim,). Times are medians of CUDA-event timings of the kernels alone
(``triton.testing.do_bench``, inputs rotated so the cache is not reused across calls); the floor is the bytes
a pass must move (forward: x read, out written; backward: x and dout read, dx written; for both directions two
outputs and two douts) over the device-to-device copy bandwidth measured in the same run.

    python benchmarks/causal_conv1d.py                                   # Vim-Ti at 224 (b256) and 1248 (b16)
    python benchmarks/causal_conv1d.py --blocks 16:64:4 32:64:4 64:64:8  # (steps, channels, warps) to try
    python benchmarks/causal_conv1d.py --blocks --bidir-blocks 16:64:2 8:32:1  # both directions only
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
    """``sets`` independent input sets (rotated by the timing, so each call reads memory, not the cache): x and
    two directions' weight, bias and output gradient each."""
    out = []
    for i in range(sets):
        g = torch.Generator(device="cpu").manual_seed(i)
        xz = torch.randn(batch, L, 2 * dim, generator=g).to("cuda", torch.bfloat16)
        x = xz[..., :dim].transpose(1, 2).requires_grad_(True)
        params = [t.cuda().requires_grad_(True) for t in (torch.randn(dim, 4, generator=g) * 0.5,
                  torch.randn(dim, generator=g), torch.randn(dim, 4, generator=g) * 0.5, torch.randn(dim, generator=g))]
        douts = [torch.randn(batch, L, dim, generator=g).to("cuda", torch.bfloat16).transpose(1, 2) for _ in "fb"]
        out.append(((x, *params), douts))
    return out


def bench(fn, sets, backward: bool) -> float:
    """Median ms of a forward (or, with ``backward``, of the backward alone) over rotated input sets; ``fn`` takes
    (x, w, b, w_b, b_b) and returns a tuple of outputs."""
    import triton.testing

    state = {"i": 0}
    outs = [fn(*args) for args, _ in sets] if backward else None

    def call():
        i = state["i"] = (state["i"] + 1) % len(sets)
        args, douts = sets[i]
        if backward:
            torch.autograd.grad(outs[i], args, douts[:len(outs[i])], retain_graph=True, allow_unused=True)
        else:
            with torch.no_grad():
                fn(*args)

    return triton.testing.do_bench(call, warmup=20, rep=100, return_mode="median")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["256:384:197", "16:384:6085"], help="batch:dim:L")
    p.add_argument("--blocks", nargs="*", default=["16:64:4", "32:64:4", "64:64:4", "32:32:2", "64:128:8"],
                   help="steps:channels:warps per program (per tile in the backward), tried for both kernels")
    p.add_argument("--bidir-blocks", nargs="*", default=["16:64:2", "8:64:2", "8:32:1", "32:64:4"],
                   help="steps:channels:warps for the forward kernel that does both directions")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    bw = copy_bandwidth("cuda")
    rows = []
    defaults = (tk.FWD_BLOCKS, tk.BWD_BLOCKS, tk.BIDIR_FWD_BLOCKS)

    def row(shape, impl, fn, sets, floors, err=None):
        return dict(shape=shape, impl=impl, fwd_ms=bench(fn, sets, False), bwd_ms=bench(fn, sets, True),
                    rel_err=err, **{f"floor_{k}_ms": v for k, v in floors.items()})

    def rel_err(got, exp):
        return max(((g.float() - e).norm() / e.norm()).item() for g, e in zip(got, exp, strict=True))

    for shape in args.shapes:
        batch, dim, L = (int(v) for v in shape.split(":"))
        sets = inputs(batch, dim, L)
        act = batch * dim * L * 2  # bytes of one bf16 activation
        one = {"fwd": 2 * act / bw * 1e3, "bwd": 3 * act / bw * 1e3}
        two = {"fwd": 3 * act / bw * 1e3, "bwd": 4 * act / bw * 1e3}
        (x0, *p0), _ = sets[0]
        ref = lambda x, w, b, w2, b2: (causal_conv1d_reference(x, w, b, "silu"),)  # noqa: E731
        expected = [o.float() for o in ref(x0.float(), *p0)]
        rows.append(row(shape, "reference (F.conv1d)", ref, sets, one))
        for spec in args.blocks:
            tk.FWD_BLOCKS = tk.BWD_BLOCKS = tuple(int(v) for v in spec.split(":"))
            fn = lambda x, w, b, w2, b2: (tk.causal_conv1d_triton(x, w, b, "silu"),)  # noqa: E731
            rows.append(row(shape, f"triton {spec}", fn, sets, one, rel_err(fn(x0, *p0), expected)))
        tk.FWD_BLOCKS, tk.BWD_BLOCKS = defaults[:2]
        if args.bidir_blocks:
            ref2 = lambda x, w, b, w2, b2: (causal_conv1d_reference(x, w, b, "silu"),  # noqa: E731
                                            causal_conv1d_reference(x, w2, b2, "silu", reverse=True))
            expected = [o.float() for o in ref2(x0.float(), *p0)]
            apart = lambda x, w, b, w2, b2: (tk.causal_conv1d_triton(x, w, b, "silu"),  # noqa: E731
                                             tk.causal_conv1d_triton(x, w2, b2, "silu", reverse=True))
            rows.append(row(shape, "both: 2 triton calls", apart, sets, two, rel_err(apart(x0, *p0), expected)))
        for spec in args.bidir_blocks:
            tk.BIDIR_FWD_BLOCKS = tuple(int(v) for v in spec.split(":"))
            fn = lambda x, w, b, w2, b2: tk.causal_conv1d_bidirectional_triton(x, w, b, w2, b2, "silu")  # noqa: E731
            rows.append(row(shape, f"both: one {spec}", fn, sets, two, rel_err(fn(x0, *p0), expected)))
        tk.BIDIR_FWD_BLOCKS = defaults[2]
        del sets
        torch.cuda.empty_cache()
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, {datetime.date.today()}; copy bandwidth "
          f"{bw / 1e12:.2f} TB/s; defaults (steps, channels, warps): forward {defaults[0]}, backward {defaults[1]}; "
          f"both directions' forward {defaults[2]}")
    print(f"{'shape b:d:L':14} {'implementation':24} {'fwd ms':>8} {'x floor':>8} {'bwd ms':>8} {'x floor':>8}")
    for r in rows:
        print(f"{r['shape']:14} {r['impl']:24} {r['fwd_ms']:8.3f} {r['fwd_ms'] / r['floor_fwd_ms']:7.1f}x "
              f"{r['bwd_ms']:8.3f} {r['bwd_ms'] / r['floor_bwd_ms']:7.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
