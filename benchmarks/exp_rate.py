"""How many exponentials a GPU takes per second: the special-function floor of a selective scan.

The recurrence x_t = exp(dt_t A) x_{t-1} + ... takes one exponential per (channel, state, step) forward, and a
backward that recomputes its states from checkpoints (O(batch * dim * L) memory) at least one more. GPUs compute
them on special-function units (16 a cycle per multiprocessor on Hopper, a sixteenth of the FMA rate), which
bounds a scan from below no matter how it is written. This script measures the rate of Triton's ``tl.exp2``
(what our kernels use) on independent arguments, with nothing else that limits it.

    python benchmarks/exp_rate.py          # exponentials per second on the current GPU
"""

from __future__ import annotations

import statistics

import torch
import triton
import triton.language as tl


@triton.jit
def _exp2_kernel(out_ptr, scale_ptr, iters, BLOCK: tl.constexpr, N: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    a = tl.load(scale_ptr + tl.arange(0, N))
    x = (offs % 7).to(tl.float32) * 1e-3 + 0.01
    acc = tl.zeros((BLOCK, N), dtype=tl.float32)
    for _ in range(iters):
        acc += tl.exp2(x[:, None] * a[None, :])  # N independent exponentials per thread and step
        x += 1e-4
    tl.store(out_ptr + offs, tl.sum(acc, axis=1))


def exp2_per_second(device: str = "cuda", iters: int = 4096, repeats: int = 10) -> float:
    """Median rate of ``tl.exp2`` over ``repeats`` launches that fill every multiprocessor."""
    block, n = 128, 16
    programs = torch.cuda.get_device_properties(device).multi_processor_count * 16
    scale = -torch.arange(1, n + 1, device=device, dtype=torch.float32)
    out = torch.empty(programs * block, device=device)
    times = []
    for i in range(repeats + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        _exp2_kernel[(programs,)](out, scale, iters, BLOCK=block, N=n, num_warps=4)
        end.record()
        torch.cuda.synchronize()
        if i >= 2:
            times.append(start.elapsed_time(end) / 1e3)
    if not torch.isfinite(out).all():
        raise RuntimeError("exp_rate: the kernel produced non-finite sums")
    return programs * block * n * iters / statistics.median(times)


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/exp_rate.py needs a CUDA GPU")
    rate = exp2_per_second()
    props = torch.cuda.get_device_properties(0)
    print(f"{torch.cuda.get_device_name()}: {rate / 1e12:.2f}e12 exp2/s "
          f"({rate / props.multi_processor_count / 1e9:.1f}e9 per multiprocessor)")


if __name__ == "__main__":
    main()
