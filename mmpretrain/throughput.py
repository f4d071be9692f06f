"""Throughput and MFU reporting: Lightning's ThroughputMonitor, knowing the peaks of the GPUs we run on."""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch.callbacks import ThroughputMonitor

# dense bf16/fp16 peak FLOP/s by device-name fragment, for chips that Lightning's table names
# differently (it knows "H200 SXM1"; the driver reports a plain "NVIDIA H200")
HALF_PRECISION_PEAKS = {"h200": 989e12, "gh200": 989e12, "h100 80gb hbm3": 989e12, "h100 sxm": 989e12}


def half_precision_peak(device_name: str) -> float | None:
    name = device_name.lower()
    for fragment in sorted(HALF_PRECISION_PEAKS, key=len, reverse=True):
        if fragment in name:
            return HALF_PRECISION_PEAKS[fragment]
    return None


class MFUThroughputMonitor(ThroughputMonitor):
    """ThroughputMonitor that also reports MFU on GPUs missing from Lightning's peak table.

    Args:
        batch_size_fn: samples in a batch.
        length_fn: items (tokens, samples) in a batch.
        available_flops: peak FLOP/s per device to measure MFU against; default: Lightning's table, then ours.
        **kwargs: passed to Lightning's ``Throughput`` (``window_size`` ...).
    """

    def __init__(self, batch_size_fn, length_fn=None, available_flops: float | None = None, **kwargs: Any) -> None:
        super().__init__(batch_size_fn=batch_size_fn, length_fn=length_fn, **kwargs)
        self.peak_override = available_flops

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        peak = self.peak_override
        device = trainer.strategy.root_device
        half = str(trainer.precision) in ("bf16-mixed", "bf16-true", "16-mixed", "16-true")
        if peak is None and self.available_flops is None and device.type == "cuda" and half:
            peak = half_precision_peak(torch.cuda.get_device_name(device))
        if peak is not None:
            self.available_flops = int(peak)
            for key in list(self._throughputs):
                self._throughputs[key] = Throughput(available_flops=self.available_flops,
                                                    world_size=trainer.world_size, **self.kwargs)
