"""The selective scan, written as the plain sequential recurrence: slow, obviously correct.

Every faster backend in this package is tested against :func:`selective_scan_reference` (values and
gradients, through autograd). Semantics are mamba_ssm's ``selective_scan_ref``:

    delta' = softplus(delta + delta_bias)            (bias and softplus optional)
    x_t    = exp(delta'_t * A) * x_{t-1} + delta'_t * B_t * u_t,   x_{-1} = 0
    y_t    = C_t . x_t + D * u_t
    out    = y * silu(z)                             (if z is given)

Shapes: u, delta, z (batch, dim, L); A (dim, N); B, C (batch, N, L) or (batch, groups, N, L), where
channel d reads group d // (dim // groups); D, delta_bias (dim,).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (bf16, fp16, fp32) is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def expand_groups(BC: torch.Tensor, dim: int) -> torch.Tensor:
    """(batch, N, L) or (batch, groups, N, L) -> (batch, dim, N, L), channel d reading group d // (dim // groups)."""
    if BC.dim() == 3:
        return BC.unsqueeze(1).expand(-1, dim, -1, -1)
    groups = BC.shape[1]
    return BC.repeat_interleave(dim // groups, dim=1)


def prepare_delta(delta: torch.Tensor, delta_bias: torch.Tensor | None, delta_softplus: bool) -> torch.Tensor:
    """delta + delta_bias, then softplus if asked (delta (batch, dim, L), delta_bias (dim,))."""
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].to(delta.dtype)
    if delta_softplus:
        delta = F.softplus(delta)
    return delta


def finish_output(y: torch.Tensor, u: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None) -> torch.Tensor:
    """y + D * u, gated by silu(z) if z is given (all in y's dtype)."""
    if D is not None:
        y = y + u * D[..., None].to(y.dtype)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def selective_scan_reference(
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
):
    """Sequential loop over L in float32 (float64 for float64 inputs); differentiable through autograd.

    Returns ``out`` (dtype of u), and ``(out, last_state)`` with last_state (batch, dim, N) in the
    compute dtype if ``return_last_state``.
    """
    dtype_in = u.dtype
    ct = compute_dtype(dtype_in)
    batch, dim, L = u.shape
    u_c = u.to(ct)
    delta_c = prepare_delta(delta.to(ct), None if delta_bias is None else delta_bias.to(ct), delta_softplus)
    A_c = A.to(ct)
    B_c = expand_groups(B.to(ct), dim)  # (batch, dim, N, L)
    C_c = expand_groups(C.to(ct), dim)
    x = u_c.new_zeros(batch, dim, A.shape[1])
    ys = []
    # unbind once (one autograd node that stacks the steps' gradients), rather than indexing step t
    # (whose backward writes a full-length tensor per step: quadratic in L)
    steps = zip(delta_c.unbind(-1), u_c.unbind(-1), B_c.unbind(-1), C_c.unbind(-1))
    for dt, u_t, B_t, C_t in steps:
        dt = dt[..., None]  # (batch, dim, 1)
        x = torch.exp(dt * A_c) * x + dt * B_t * u_t[..., None]
        ys.append((x * C_t).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else u_c.new_zeros(batch, dim, 0)
    out = finish_output(y, u_c, None if D is None else D.to(ct), z).to(dtype_in)
    return (out, x) if return_last_state else out
