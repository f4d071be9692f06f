"""``linear_scan``: one entry point over the backends, with argument checks.

Backends (``backend=``):

- ``"reference"``: the sequential loop (:mod:`.reference`), slow, obviously correct.
- ``"torch"``: the chunked parallel scan in plain PyTorch (:mod:`.chunked`); any device.
- ``"auto"`` (default): ``"torch"``.
"""

from __future__ import annotations

import torch

from .chunked import linear_scan_chunked
from .reference import linear_scan_reference

BACKENDS = ("auto", "reference", "torch")


def resolve_backend(backend: str) -> str:
    """The concrete backend ``backend`` means ('auto' is the chunked torch scan)."""
    if backend not in BACKENDS:
        raise ValueError(f"linear_scan: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return "torch" if backend == "auto" else backend


def check_shapes(lam: torch.Tensor, x: torch.Tensor, h0: torch.Tensor | None, channels_first: bool = False) -> None:
    """Raise ValueError naming the argument whose shape or form does not fit the others."""
    if channels_first:
        if x.is_complex() or not x.is_floating_point() or x.dim() != 4 or x.shape[1] != 2:
            raise ValueError("linear_scan: with channels_first=True, x must be real pairs (N, 2, batch, L), "
                             f"got {x.dtype} of shape {tuple(x.shape)}")
        N, _, batch, _ = x.shape
        shapes = (("lam", lam, (N, 2)), ("h0", h0, (N, 2, batch)))
        form = "real-pair"
    elif x.is_complex():
        form, tail = "complex", ()
        if x.dim() != 3:
            raise ValueError(f"linear_scan: complex x must be (batch, L, N), got shape {tuple(x.shape)}")
    else:
        form, tail = "real-pair", (2,)
        if not x.is_floating_point() or x.dim() != 4 or x.shape[-1] != 2:
            raise ValueError(
                "linear_scan: x must be complex (batch, L, N) or a real pair (batch, L, N, 2) as "
                f"torch.view_as_real lays it out, got {x.dtype} of shape {tuple(x.shape)}"
            )
    if not channels_first:
        batch, _, N = x.shape[:3]
        shapes = (("lam", lam, (N, *tail)), ("h0", h0, (batch, N, *tail)))
    for name, t, shape in shapes:
        if t is None:
            continue
        if t.is_complex() != x.is_complex() or not (t.is_complex() or t.is_floating_point()):
            raise ValueError(f"linear_scan: x is in {form} form, so {name} must be too (got {t.dtype})")
        if tuple(t.shape) != shape:
            raise ValueError(f"linear_scan: {name} must have shape {shape} for x of shape {tuple(x.shape)}, "
                             f"got {tuple(t.shape)}")


def linear_scan(
    lam: torch.Tensor,
    x: torch.Tensor,
    h0: torch.Tensor | None = None,
    reverse: bool = False,
    return_last_state: bool = False,
    backend: str = "auto",
    chunk_size: int | None = None,
    channels_first: bool = False,
):
    """Diagonal linear recurrence h_t = lam * h_{t-1} + x_t along the sequence (lam constant over time).

    Args:
        lam: the diagonal (N,) complex, or (N, 2) real pair. For accuracy |lam| <= 1 (a stable recurrence).
        x: inputs (batch, L, N) complex, or (batch, L, N, 2) real pairs (last dim: real, imaginary, as
            ``torch.view_as_real``); any float dtype (bf16 pairs are fine: the scan runs in float32).
        h0: the state before the first step (batch, N) complex / (batch, N, 2); zeros if None.
        reverse: scan from the end: h_t = lam * h_{t+1} + x_t, with h0 entering at t = L - 1 (the
            backward direction of a bidirectional layer, without flipping the sequence).
        return_last_state: also return the state after the whole sequence (h_{L-1}; h_0 for reverse).
        backend: "auto", "reference" or "torch" (see the module docstring).
        chunk_size: steps per chunk for the torch backend (None: automatic, 8..64).
        channels_first: real pairs laid out (N, 2, batch, L) for x, (N, 2, batch) for h0 and the last
            state: the layout the torch backend computes in, so it needs no transposes (the LRU's
            projections write and read it directly); ``lam`` is then (N, 2).

    Returns:
        the states ``h`` with x's shape and form, in float32 / complex64 (float64 / complex128 for
        double-precision x), or ``(h, last_state)``. Differentiable with respect to lam, x and h0 on every
        backend; autocast is switched off inside.
    """
    check_shapes(lam, x, h0, channels_first)
    kwargs = dict(reverse=reverse, return_last_state=return_last_state, channels_first=channels_first)
    if resolve_backend(backend) == "reference":
        return linear_scan_reference(lam, x, h0, **kwargs)
    return linear_scan_chunked(lam, x, h0, chunk_size=chunk_size, **kwargs)
