"""Batch sizes for throughput, and the GPU peaks MFU is measured against."""

from __future__ import annotations

import torch

from mmpretrain.cli import batch_size_of, items_of
from mmpretrain.throughput import half_precision_peak


def test_batch_sizes_and_items():
    images = {"image": torch.zeros(6, 3, 8, 8), "label": torch.zeros(6), "key": ["k"] * 6}
    tokens = {"input_ids": torch.zeros(4, 128, dtype=torch.long), "key": ["k"] * 4}
    assert batch_size_of(images) == 6 and items_of(images) == 6
    assert batch_size_of(tokens) == 4 and items_of(tokens) == 4 * 128


def test_peaks_of_the_gpus_lightning_names_differently():
    assert half_precision_peak("NVIDIA H200") == 989e12
    assert half_precision_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert half_precision_peak("NVIDIA GeForce GTX 1080") is None
