"""Diagonal (complex) linear recurrence h_t = lam * h_{t-1} + x_t, the scan of the LRU.

``linear_scan(lam, x, h0=None, reverse=False, return_last_state=False, backend="auto", chunk_size=None)``
-- see :func:`.dispatch.linear_scan`. Backends: a sequential reference and a chunked parallel scan in
plain PyTorch (Toeplitz matrix products within chunks, the same scan over chunk ends between them).
"""

from .chunked import auto_chunk_size, linear_scan_chunked
from .dispatch import BACKENDS, linear_scan, resolve_backend
from .reference import linear_scan_reference

__all__ = [
    "BACKENDS",
    "auto_chunk_size",
    "linear_scan",
    "linear_scan_chunked",
    "linear_scan_reference",
    "resolve_backend",
]
