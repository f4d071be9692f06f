"""What the kernels' dispatchers ask of the running environment, answered in one place."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
from pathlib import Path

import torch

# looked up once, at import: importlib inside a function torch.compile traces would break its graph at every call
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def _source_key(root: Path) -> int:
    """A 63-bit hash of every Python file under ``root`` (names and contents)."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return int(digest.hexdigest()[:15], 16)


# Our custom ops take this as their last argument. Inductor's caches (AOTAutograd's and the FX graph cache) key a
# compiled graph on the traced graph, not on the code of the custom ops in it: their kernels, fake implementations
# and autograd rules. After an upgrade a warm cache could hand back a graph built around the old ops (with a backward
# traced from the old rule, and size asserts from the old fakes). As a constant in every call, the hash of this
# package's sources puts the ops' code into the traced graph, so a graph compiled with other ops is never reused.
OPS_SOURCE_KEY = _source_key(Path(__file__).parent)


def triton_available() -> bool:
    return _HAS_TRITON


def interpreter_active() -> bool:
    """True if Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1 when triton was imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make ``t``'s GPU the current one for a kernel launch (a no-op for CPU tensors, as in the interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
