"""Selective scan (Mamba's S6 recurrence): a sequential reference, a chunked PyTorch scan, fused Triton kernels.

``selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
return_last_state=False, backend="auto")`` -- see :func:`.dispatch.selective_scan`.
"""

from .chunked import selective_scan_chunked
from .dispatch import BACKENDS, mamba_ssm_available, resolve_backend, selective_scan, triton_available
from .reference import selective_scan_reference

__all__ = [
    "BACKENDS",
    "mamba_ssm_available",
    "resolve_backend",
    "selective_scan",
    "selective_scan_chunked",
    "selective_scan_reference",
    "triton_available",
]
