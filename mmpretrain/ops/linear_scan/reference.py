"""The diagonal linear recurrence, written as the plain sequential loop: slow, obviously correct.

    h_t = lam * h_{t-1} + x_t,   h_{-1} = h0 (zero if not given)            (forward)
    h_t = lam * h_{t+1} + x_t,   h_L  = h0                                  (reverse=True)

with lam (N,) complex and constant over time, x (batch, L, N) complex. Every faster backend in this
package is tested against :func:`linear_scan_reference` (values and gradients, through autograd).

Two equivalent forms of the tensors are accepted (all arguments in the same form):

- complex: ``lam`` (N,), ``x`` (batch, L, N), ``h0`` (batch, N), complex64 or complex128;
- real pairs: ``lam`` (N, 2), ``x`` (batch, L, N, 2), ``h0`` (batch, N, 2), real floating point, the last
  dimension holding (real, imaginary) as :func:`torch.view_as_real` lays it out.

Real pairs may also come channels first (``channels_first=True``): ``x`` (N, 2, batch, L), ``h0``
(N, 2, batch), the layout the chunked scan works in.

Results come back in the form (and layout) of ``x``, in the compute precision: complex128 / float64 when ``x`` is
double precision, complex64 / float32 otherwise (bf16 and fp16 pairs included).
"""

from __future__ import annotations

import torch


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The real dtype the scan runs in: float64 for complex128/float64 inputs, float32 for anything else."""
    return torch.float64 if x.dtype in (torch.float64, torch.complex128) else torch.float32


def to_complex(t: torch.Tensor, real_dtype: torch.dtype) -> torch.Tensor:
    """A complex tensor (of the complex type matching ``real_dtype``) from a complex tensor or a real pair."""
    if t.is_complex():
        return t.to(torch.complex128 if real_dtype == torch.float64 else torch.complex64)
    t = t.to(real_dtype)
    return torch.complex(t[..., 0], t[..., 1])


def linear_scan_reference(
    lam: torch.Tensor,
    x: torch.Tensor,
    h0: torch.Tensor | None = None,
    reverse: bool = False,
    return_last_state: bool = False,
    channels_first: bool = False,
):
    """Sequential loop over L in complex arithmetic; differentiable through autograd.

    Returns the states ``h`` (the shape of ``x``), and ``(h, last)`` if ``return_last_state``, where
    ``last`` is the state after the whole sequence has been read: h_{L-1} forward, h_0 for ``reverse``
    (h0, or zeros, when L = 0).
    """
    if channels_first:  # (N, 2, batch, L) -> (batch, L, N, 2) and back
        res = linear_scan_reference(lam, x.permute(2, 3, 0, 1), None if h0 is None else h0.permute(2, 0, 1),
                                    reverse=reverse, return_last_state=return_last_state)
        if return_last_state:
            return res[0].permute(2, 3, 0, 1), res[1].permute(1, 2, 0)
        return res.permute(2, 3, 0, 1)
    pairs = not x.is_complex()
    rt = compute_dtype(x)
    lam_c, x_c = to_complex(lam, rt), to_complex(x, rt)
    batch, L, N = x_c.shape
    h = to_complex(h0, rt) if h0 is not None else x_c.new_zeros(batch, N)
    # unbind once (one autograd node), rather than indexing step t (a full-length gradient per step)
    steps = x_c.unbind(1)
    order = range(L - 1, -1, -1) if reverse else range(L)
    states: list[torch.Tensor] = [None] * L  # type: ignore[list-item]
    for t in order:
        h = lam_c * h + steps[t]
        states[t] = h
    out = torch.stack(states, dim=1) if L else x_c.new_zeros(batch, 0, N)
    if pairs:
        out, h = torch.view_as_real(out), torch.view_as_real(h)
    return (out, h) if return_last_state else out
