"""What the kernels' dispatchers ask of the running environment, answered in one place."""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

# looked up once, at import: importlib inside a function torch.compile traces would break its graph at every call
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _HAS_TRITON


def interpreter_active() -> bool:
    """True if Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1 when triton was imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make ``t``'s GPU the current one for a kernel launch (a no-op for CPU tensors, as in the interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
