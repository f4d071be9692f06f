"""Selective scan, forward + backward: ms/step, peak memory and achieved bytes/s for each backend.

Default shape: one Vim-Ti layer, one direction (batch 64, L 197, dim 384, N 16), bf16 u/delta/z/B/C,
float32 A/D/delta_bias, softplus and z on (as Vim calls it). Each backend runs in the same process on the
same inputs; the table gives the median step time over CUDA events (as called from Python, host overhead
included), the GPU kernel time per step (torch.profiler: the step without the host's gaps), the peak
memory of one step (all
allocations, inputs included, and what the step added), the bytes a step must move at the least
(every input read and every output written once, forward and backward) over the step time and over the
GPU time, each also as a fraction of the device-to-device copy bandwidth measured in the same run. Relative errors of out and
of each gradient against the reference (float32 arithmetic, same inputs) are printed too.

    python benchmarks/selective_scan.py [--batch 64 --dim 384 --length 197 --state 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import statistics

import torch
from timing import copy_bandwidth

from mmpretrain.ops.selective_scan import selective_scan_chunked, selective_scan_reference
from mmpretrain.ops.selective_scan.dispatch import mamba_ssm_available, triton_available


def make_inputs(batch: int, dim: int, L: int, N: int, dtype: torch.dtype, device: str, seed: int = 0,
                layout: str = "channels_last"):
    """Inputs as the Vim mixer gives them (``channels_last``: u, delta, z, B, C are transposed views of
    (batch, L, channels) tensors, as linear layers leave them) or contiguous (batch, channels, L)."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    dt_init = torch.exp(torch.rand(dim, generator=g) * (torch.log(torch.tensor(0.1)) - torch.log(torch.tensor(1e-3)))
                        + torch.log(torch.tensor(1e-3)))
    inputs = {
        "u": randn(batch, dim, L).to(dtype),
        "delta": randn(batch, dim, L, scale=0.1).to(dtype),
        # Mamba's initialisation: A = -(1..N) per channel, delta_bias = softplus^-1(dt), dt log-uniform in [1e-3, 0.1]
        "A": -torch.arange(1, N + 1, dtype=torch.float32).repeat(dim, 1).to(device),
        "B": randn(batch, N, L).to(dtype),
        "C": randn(batch, N, L).to(dtype),
        "D": torch.ones(dim, device=device),
        "z": randn(batch, dim, L).to(dtype),
        "delta_bias": (dt_init + torch.log(-torch.expm1(-dt_init))).to(device),
    }
    for k, v in inputs.items():
        if layout == "channels_last" and v.dim() == 3:
            v = v.transpose(1, 2).contiguous().transpose(1, 2)  # same values, channels contiguous
        inputs[k] = v.requires_grad_(True)
    return inputs


def min_bytes(batch: int, dim: int, L: int, N: int, elsize: int) -> int:
    """Bytes a fused fwd+bwd must move at the least: inputs read once and outputs written once per pass."""
    seq, bc = batch * dim * L, batch * N * L
    fwd = (3 * seq + 2 * bc) + seq  # read u, delta, z, B, C; write out
    bwd = (4 * seq + 2 * bc) + (3 * seq + 2 * bc)  # read u, delta, z, dout, B, C; write du, ddelta, dz, dB, dC
    return (fwd + bwd) * elsize


def step(fn, inputs, dout):
    out = fn(**inputs)
    leaves = list(inputs.values())
    return out, torch.autograd.grad(out, leaves, dout)


def bench(fn, inputs, dout, warmup: int, reps: int):
    """Median ms of fwd+bwd and of fwd alone; peak GiB of one fwd+bwd (total and added by the step)."""
    for _ in range(warmup):
        step(fn, inputs, dout)
    torch.cuda.synchronize()
    times, fwd_times = [], []
    for _ in range(reps):
        s, m, e = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        s.record()
        out = fn(**inputs)
        m.record()
        torch.autograd.grad(out, list(inputs.values()), dout)
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
        fwd_times.append(s.elapsed_time(m))
        del out
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = step(fn, inputs, dout)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return statistics.median(times), statistics.median(fwd_times), peak / 2**30, (peak - base) / 2**30, result


def kernel_times(fn, inputs, dout, steps: int = 5) -> dict[str, float]:
    """Device time per step (ms) of each GPU kernel of a fwd+bwd, from torch.profiler; "all" sums them.

    Unlike the event timing of the whole step, this leaves out the gaps where the GPU waits for the host.
    """
    from torch.profiler import ProfilerActivity, profile

    step(fn, inputs, dout)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step(fn, inputs, dout)
        torch.cuda.synchronize()
    times: dict[str, float] = {}
    for evt in prof.key_averages():
        # kernels only: a CPU op's row (an autograd Function's, say) can carry its kernels' time as well
        if "CUDA" not in str(getattr(evt, "device_type", "CUDA")):
            continue
        us = getattr(evt, "self_device_time_total", None)
        if us is None:
            us = getattr(evt, "self_cuda_time_total", 0.0)
        if us:
            times[evt.key] = us / 1e3 / steps
    total = sum(times.values())
    top = dict(sorted(times.items(), key=lambda kv: -kv[1])[:4])
    return {"all": total, **top}


def rel_errors(result, expected):
    out, grads = result
    out_ref, grads_ref = expected
    names = ["out"] + ["d" + k for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    errs = {}
    for name, a, b in zip(names, [out, *grads], [out_ref, *grads_ref]):
        errs[name] = ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()
    return errs


def kernel_resources() -> list[str]:
    """Registers and spills of every compiled triton kernel of the package (best effort across triton versions)."""
    lines = []
    try:
        from mmpretrain.ops.selective_scan import triton_kernels as tk

        for name in ("_fwd_kernel", "_bwd_kernel"):
            for entry in getattr(getattr(tk, name), "device_caches", {}).values():
                cache = entry[0] if isinstance(entry, tuple) else entry
                for ck in cache.values():
                    consts = {k: v for k, v in getattr(ck, "constants", {}).items() if isinstance(v, (int, bool))}
                    lines.append(f"{name}: regs {getattr(ck, 'n_regs', '?')} spills {getattr(ck, 'n_spills', '?')} "
                                 f"warps {ck.metadata.num_warps} shared {ck.metadata.shared} {consts}")
    except Exception as e:  # noqa: BLE001 - diagnostics only
        lines.append(f"(kernel resources unavailable: {e!r})")
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--length", type=int, default=197)
    p.add_argument("--state", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--layout", default="channels_last", choices=["channels_last", "contiguous"],
                   help="memory layout of u, delta, z, B, C (channels_last is what the Vim mixer passes)")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--triton", nargs="*", default=["default", "32:8:4:64"],
                   help="triton launch configurations to time: 'default', block_d:block_d_bwd:sub_chunk:chunk, or "
                        "TritonConfig fields over the defaults, e.g. sub_chunk_bwd=1,bc_reduce=partial")
    p.add_argument("--skip", nargs="*", default=[], choices=["reference", "torch"],
                   help="backends to leave out (the first one timed is the accuracy baseline)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per triton configuration")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    device = "cuda"
    dtype = getattr(torch, args.dtype)
    b, d, L, N = args.batch, args.dim, args.length, args.state
    inputs = make_inputs(b, d, L, N, dtype, device, layout=args.layout)
    dout = torch.randn(b, d, L, device=device).to(dtype)
    flags = dict(delta_softplus=True)
    nbytes = min_bytes(b, d, L, N, torch.tensor([], dtype=dtype).element_size())
    copy_bw = copy_bandwidth(device)

    runs = [("reference", lambda **kw: selective_scan_reference(**kw, **flags), 2, 5),
            ("torch", lambda **kw: selective_scan_chunked(**kw, **flags), 2, 10)]
    runs = [r for r in runs if r[0] not in args.skip]
    if triton_available():
        from mmpretrain.ops.selective_scan.triton_kernels import (
            TritonConfig,
            selective_scan_triton,
        )

        for spec in args.triton:
            cfg = TritonConfig()
            if "=" in spec:  # TritonConfig fields over the defaults: key=value,key=value
                fields = {}
                for item in spec.split(","):
                    key, value = item.split("=")
                    fields[key] = int(value) if value.lstrip("-").isdigit() else {"true": True, "false": False}.get(
                        value, value)
                cfg = TritonConfig(**fields)
            elif spec != "default":
                bd, bd_bwd, sub, chunk = (int(n) for n in spec.split(":"))
                cfg = TritonConfig(block_d=bd, block_d_bwd=bd_bwd, sub_chunk=sub, chunk=chunk)
            fn = functools.partial(selective_scan_triton, **flags, config=cfg)
            runs.append((f"triton {spec}", fn, args.warmup, args.reps))
    if mamba_ssm_available():
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        runs.append(("mamba_ssm", lambda **kw: selective_scan_fn(**kw, **flags), 3, args.reps))

    rows, expected = [], None
    for name, fn, warmup, reps in runs:
        ms, fwd_ms, peak, added, result = bench(fn, inputs, dout, warmup, reps)
        if expected is None:
            expected = result
        errs = rel_errors(result, expected)
        del result
        kernels = kernel_times(fn, inputs, dout, steps=2 if name == "reference" else 5)
        rows.append(dict(backend=name, ms_per_step=ms, fwd_ms=fwd_ms, peak_gib=peak, step_added_gib=added,
                         min_bytes=nbytes, bytes_per_s=nbytes / (ms / 1e3),
                         fraction_of_copy_bw=nbytes / (ms / 1e3) / copy_bw, max_rel_err=max(errs.values()),
                         rel_err=errs, gpu_ms=kernels["all"], kernels=kernels))
        torch.cuda.empty_cache()

    props = torch.cuda.get_device_properties(0)
    meta = dict(date=datetime.date.today().isoformat(), device=props.name, torch=torch.__version__,
                shape=dict(batch=b, dim=d, length=L, state=N), dtype=args.dtype, layout=args.layout, copy_bw_bytes_per_s=copy_bw,
                min_bytes_per_step=nbytes)
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    print(f"\nselective scan fwd+bwd, batch {b}, dim {d}, L {L}, N {N}, {args.dtype}, softplus, z, D, delta_bias")
    print(f"{meta['device']}, torch {meta['torch']}, triton {meta.get('triton')}, {meta['date']}; "
          f"copy bandwidth {copy_bw / 1e12:.2f} TB/s (read + write); min bytes/step {nbytes / 1e6:.1f} MB")
    hdr = (f"{'backend':<24}{'ms/step':>10}{'fwd ms':>9}{'GPU ms':>9}{'peak GiB':>10}"
           f"{'added GiB':>11}{'GB/s':>7}{'of copy':>9}{'GPU GB/s':>10}{'of copy':>9}{'max rel err':>13}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        gpu_bw = nbytes / (r["gpu_ms"] / 1e3) if r["gpu_ms"] else float("nan")
        print(f"{r['backend']:<24}{r['ms_per_step']:>10.3f}{r['fwd_ms']:>9.3f}{r['gpu_ms']:>9.3f}"
              f"{r['peak_gib']:>10.3f}{r['step_added_gib']:>11.3f}{r['bytes_per_s'] / 1e9:>7.0f}"
              f"{r['fraction_of_copy_bw']:>9.1%}{gpu_bw / 1e9:>10.0f}{gpu_bw / copy_bw:>9.1%}{r['max_rel_err']:>13.1e}")
    print("\nGPU time per step by kernel (ms):")
    for r in rows:
        print(f"  {r['backend']}: " + ", ".join(f"{k[:40]} {v:.3f}" for k, v in r["kernels"].items()))
    resources = kernel_resources()
    print("\n".join(resources))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows, kernels=resources), f, indent=2)


if __name__ == "__main__":
    main()
