"""``selective_scan``: one entry point over the backends, with argument checks.

Backends (``backend=``):

- ``"reference"``: the sequential loop (:mod:`.reference`), slow, obviously correct.
- ``"torch"``: the scan in plain PyTorch, chunk by chunk with a hand-written backward (:mod:`.chunked`);
  any device.
- ``"triton"``: fused Triton kernels (:mod:`.triton_kernels`); CUDA tensors (or Triton's interpreter).
- ``"mamba_ssm"``: ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``, when that package is
  importable (never required).
- ``"auto"`` (default): ``"triton"`` for CUDA tensors when triton is importable, ``"torch"`` otherwise.

Why ``auto`` never picks the reference: the torch backend is as fast or faster with and without
gradients, at short and long sequences, and keeps far less for the backward. Measured on one CPU core
(float32, softplus, z, D, delta_bias; CPU ms, reference / torch; MiB that autograd keeps):

==================  ===========  ================  =============
shape (b, d, L, N)  forward      forward+backward  kept for bwd
==================  ===========  ================  =============
64, 192, 17, 8      12.2 / 7.0   39.7 / 17.5       38 / 7
32, 384, 197, 16    216 / 110    886 / 289         804 / 96
1, 384, 1025, 16    50 / 20      283 / 52
4, 64, 4097, 16     164 / 61     1434 / 167
2, 6, 7, 4          0.2 / 0.2    0.8 / 0.7
==================  ===========  ================  =============

Only at a handful of elements (b 2, d 16, L 1) is the reference ahead, by 0.3 ms. On GPUs without triton
the order is the same: the reference launches about twenty kernels per step, the torch backend three
(plus a few per chunk).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch

from .._runtime import triton_available
from .chunked import selective_scan_chunked
from .reference import selective_scan_reference

BACKENDS = ("auto", "reference", "torch", "triton", "mamba_ssm")


# looked up once: importlib inside a function torch.compile traces would break its graph at every call
_HAS_MAMBA_SSM = importlib.util.find_spec("mamba_ssm") is not None


def mamba_ssm_available() -> bool:
    return _HAS_MAMBA_SSM


def _mamba_ssm_fn() -> Callable:
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "selective_scan backend 'mamba_ssm' needs the mamba_ssm package, which is not importable here "
            f"({e}); use backend='auto', 'triton' or 'torch'"
        ) from e
    return selective_scan_fn


def resolve_backend(backend: str, u: torch.Tensor) -> str:
    """The concrete backend ``backend`` means for tensors like ``u``.

    'auto' picks triton for CUDA tensors when triton is importable, else torch (see the module docstring).
    """
    if backend not in BACKENDS:
        raise ValueError(f"selective_scan: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if u.is_cuda and triton_available() else "torch"
    return backend


def check_shapes(u, delta, A, B, C, D, z, delta_bias) -> None:
    """Raise ValueError naming the argument whose shape does not fit the others."""
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be (batch, dim, L), got shape {tuple(u.shape)}")
    batch, dim, L = u.shape
    if tuple(delta.shape) != (batch, dim, L):
        raise ValueError(f"selective_scan: delta must have u's shape {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"selective_scan: A must be (dim={dim}, N), got shape {tuple(A.shape)}")
    if A.is_complex():
        raise ValueError("selective_scan: A must be real (complex A is not supported)")
    N = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.dim() == 3:
            ok = tuple(t.shape) == (batch, N, L)
        elif t.dim() == 4:
            groups = t.shape[1]
            ok = tuple(t.shape) == (batch, groups, N, L) and groups > 0 and dim % groups == 0
        else:
            ok = False
        if not ok:
            raise ValueError(
                f"selective_scan: {name} must be (batch={batch}, N={N}, L={L}) or (batch, groups, N, L) with "
                f"groups dividing dim={dim}, got shape {tuple(t.shape)}"
            )
    if z is not None and tuple(z.shape) != (batch, dim, L):
        raise ValueError(f"selective_scan: z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and tuple(t.shape) != (dim,):
            raise ValueError(f"selective_scan: {name} must be (dim={dim},), got shape {tuple(t.shape)}")


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    backend: str = "auto",
    reverse: bool = False,
    out_scale: float = 1.0,
    out_add: torch.Tensor | None = None,
):
    """Selective scan (Mamba's S6 recurrence) with mamba_ssm's semantics.

    Args:
        u: input (batch, dim, L).
        delta: step sizes (batch, dim, L); ``delta + delta_bias``, then softplus if ``delta_softplus``.
        A: state matrix (dim, N), real (negative for a decaying state).
        B, C: input and output projections (batch, N, L), or (batch, groups, N, L) with groups dividing
            dim, where channel d uses group d // (dim // groups).
        D: skip connection (dim,), optional.
        z: gate (batch, dim, L), optional: the output is multiplied by silu(z).
        delta_bias: (dim,), optional.
        delta_softplus: apply softplus to delta (after the bias).
        return_last_state: also return the final state (batch, dim, N), float32 (float64 for float64 inputs).
        backend: "auto", "reference", "torch", "triton" or "mamba_ssm" (see the module docstring).
        reverse: scan from the last position to the first (an extension of mamba_ssm's semantics): the result
            equals flipping u, delta, z, B and C along L, scanning, and flipping the output back. The triton
            backend does it without copies (how a bidirectional model's backward direction avoids its flips);
            the others flip.
        out_scale, out_add: the output is ``out_scale * y + out_add`` (an extension too; ``out_add`` has u's
            shape): how a bidirectional mixer averages its two directions, the second scan adding to the first's
            output. The triton backend applies both as it stores the output (and scales the output's gradient as
            it reads it), with no separate kernel; the others compute them after the scan.

    Returns:
        ``out`` (batch, dim, L) in u's dtype, or ``(out, last_state)``. All backends are differentiable
        with respect to every tensor argument.
    """
    check_shapes(u, delta, A, B, C, D, z, delta_bias)
    if out_add is not None and tuple(out_add.shape) != tuple(u.shape):
        raise ValueError(f"selective_scan: out_add must have u's shape {tuple(u.shape)}, got {tuple(out_add.shape)}")
    which = resolve_backend(backend, u)
    kwargs = dict(D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                  return_last_state=return_last_state)
    if which == "triton":
        if not triton_available():
            raise RuntimeError("selective_scan backend 'triton' needs the triton package; use backend='torch'")
        from .triton_kernels import selective_scan_triton

        return selective_scan_triton(u, delta, A, B, C, reverse=reverse, out_scale=out_scale, out_add=out_add,
                                     **kwargs)
    res = _unfused(which, u, delta, A, B, C, reverse, kwargs)
    if out_scale == 1.0 and out_add is None:
        return res
    out = res[0] if return_last_state else res
    if out_scale != 1.0:
        out = out * out_scale
    if out_add is not None:
        out = out + out_add
    return (out, res[1]) if return_last_state else out


def _unfused(which: str, u, delta, A, B, C, reverse: bool, kwargs: dict):
    """The scan on a backend other than triton (``kwargs``: :func:`selective_scan`'s keyword arguments)."""
    return_last_state = kwargs["return_last_state"]
    z = kwargs["z"]
    if reverse:
        flip = lambda t: t.flip(-1) if t is not None else None  # noqa: E731
        u, delta, B, C, kwargs["z"] = flip(u), flip(delta), flip(B), flip(C), flip(z)
        res = selective_scan(u, delta, A, B, C, backend=which, **kwargs)
        return (res[0].flip(-1), res[1]) if return_last_state else res.flip(-1)
    if which == "reference":
        return selective_scan_reference(u, delta, A, B, C, **kwargs)
    if which == "torch":
        return selective_scan_chunked(u, delta, A, B, C, **kwargs)
    return _mamba_ssm_fn()(u, delta, A, B, C, **kwargs)
