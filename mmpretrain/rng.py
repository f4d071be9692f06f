"""The random generators' states of a process as plain values, for checkpoints.

A resumed run must draw the same random numbers as the run it continues (dropout, drop path, Mixup,
anything in the training step), so checkpoints record the states of Python's, NumPy's and torch's global
generators (CPU and every CUDA device) of every rank. The states are plain types (ints, lists, tensors),
so checkpoints still load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def capture_rng_state() -> dict[str, Any]:
    """This process's generator states: ``{"python", "numpy", "torch", "cuda"}`` in plain types."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    return {
        "python": random.getstate(),
        "numpy": [str(kind), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                  float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set this process's generators to a state from :func:`capture_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            torch.cuda.set_rng_state(cuda[min(torch.cuda.current_device(), len(cuda) - 1)])


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank in rank order (``[obj]`` without a process group). Collective: every rank calls it."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        if world > 1:
            out: list[Any] = [None] * world
            torch.distributed.all_gather_object(out, obj)
            return out
    return [obj]
