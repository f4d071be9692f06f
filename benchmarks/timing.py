"""What the benchmark scripts share: GPU step timing and the peak that MFU is measured against.

The scripts run as ``python benchmarks/NAME.py`` (their folder is on ``sys.path``), with mmpretrain
installed or on ``PYTHONPATH``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from mmpretrain.throughput import half_precision_peak


def peak_flops() -> float:
    """bf16 dense peak FLOP/s of the current GPU (NaN when unknown: MFU is then not reported)."""
    peak = half_precision_peak(torch.cuda.get_device_name())
    return float("nan") if peak is None else peak


def timed(step: Callable[[], object], steps: int, warmup: int) -> list[float]:
    """Seconds of each of ``steps`` calls of ``step`` after ``warmup`` untimed ones, synchronised around each."""
    times = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def copy_bandwidth(device: str, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy, bytes read + written per second (median of 20)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    times = []
    for i in range(25):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        if i >= 5:
            times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * nbytes / statistics.median(times)
