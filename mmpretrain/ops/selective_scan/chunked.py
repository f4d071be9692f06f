"""The selective scan as a chunked parallel scan in plain PyTorch (any device; the CPU path and GPU fallback).

The sequence is cut into chunks of T steps. Inside a chunk, with dA_t = delta_t * A (<= 0 for the usual
negative A) and a_t = exp(dA_t), the state is

    x_t = exp(sum_{k<=t} dA_k) * x_in + sum_{s<=t} exp(segsum[t, s]) * delta_s * B_s * u_s,
    segsum[t, s] = sum_{s<k<=t} dA_k  (s <= t),  -inf above the diagonal,

so every exponent is a sum of the increments themselves, never a difference of two large cumulative sums:
nothing overflows and nothing cancels (the "stable segsum" of Mamba-2's minimal implementation). The
state at the chunk's end is carried to the next chunk. Working memory is (batch, dim, N, T, T) for one
chunk, never (batch, dim, L, N) for the whole sequence; when gradients are needed each chunk runs under
``torch.utils.checkpoint``, so what autograd keeps is the chunk inputs plus one (batch, dim, N) state per
chunk, and the chunk's internals are recomputed in the backward pass.
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from .reference import compute_dtype, finish_output, prepare_delta

# elements of one (batch, dim, N, T, T) chunk tensor that the automatic chunk size aims to stay under
_CHUNK_BUDGET = 1 << 25


def auto_chunk_size(batch: int, dim: int, N: int, L: int) -> int:
    """Largest power of two T (4..16) with batch*dim*N*T*T under the budget, and no longer than needed for L.

    The work per step grows with T (the (T, T) decay matrix); larger T only saves per-chunk overhead.
    """
    t = 4
    while t < 16 and t < L and batch * dim * N * (2 * t) ** 2 <= _CHUNK_BUDGET:
        t *= 2
    return t


def _upper_masks(T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(s >= t, s > t) as (T, T) booleans indexed [t, s]: what segsum blanks before and after its cumsum."""
    idx = torch.arange(T, device=device)
    return idx[None, :] >= idx[:, None], idx[None, :] > idx[:, None]


def segsum(dA: torch.Tensor, masks: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """(..., T) -> (..., T, T) with [t, s] = sum_{s<k<=t} dA[k] for s <= t and -inf above the diagonal."""
    T = dA.shape[-1]
    not_strictly_lower, upper = masks if masks is not None else _upper_masks(T, dA.device)
    x = dA[..., :, None].expand(*dA.shape, T)  # x[..., t, s] = dA[t]
    x = x.masked_fill(not_strictly_lower, 0.0)
    out = torch.cumsum(x, dim=-2)  # sum over k <= t of dA[k] * [k > s]
    return out.masked_fill(upper, -math.inf)


def _scan_chunk(x0, u, dt, A, B, C, masks=None):
    """One chunk. x0 (b, G, dg, N); u, dt (b, G, dg, T); A (G, dg, N); B, C (b, G, N, T) in any float dtype.

    Returns y (b, G, dg, T) and the state after the chunk (b, G, dg, N), both in x0's dtype.
    """
    ct = x0.dtype
    B = B.to(ct)[:, :, None]  # (b, G, 1, N, T)
    C = C.to(ct)[:, :, None]
    dA = dt[..., None, :] * A[..., None]  # (b, G, dg, N, T)
    decay_in = torch.exp(torch.cumsum(dA, dim=-1))  # exp(sum_{k<=t} dA_k)
    if masks is None or masks[0].shape[0] != dA.shape[-1]:  # the last chunk may be shorter
        masks = _upper_masks(dA.shape[-1], dA.device)
    L_mat = torch.exp(segsum(dA, masks))  # (b, G, dg, N, T, T)
    dBu = (dt * u)[..., None, :] * B  # (b, G, dg, N, T)
    # a batched (T, T) x (T,) product, written out: cuBLAS is slow for millions of tiny matrices
    x = (L_mat * dBu[..., None, :]).sum(dim=-1) + decay_in * x0[..., None]
    y = (x * C).sum(dim=-2)
    return y, x[..., -1].contiguous()  # a copy: a view would keep the whole chunk's states alive


def selective_scan_chunked(
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
    chunk_size: int | None = None,
):
    """Chunked parallel selective scan; same signature and results as ``selective_scan_reference``.

    ``chunk_size``: steps per chunk (default: 16, or less so that one chunk's (batch, dim, N, T, T)
    tensors stay under 32M elements). Computes in float32 (float64 for float64 inputs).
    """
    dtype_in = u.dtype
    ct = compute_dtype(dtype_in)
    batch, dim, L = u.shape
    N = A.shape[1]
    B4 = B.unsqueeze(1) if B.dim() == 3 else B
    C4 = C.unsqueeze(1) if C.dim() == 3 else C
    G = B4.shape[1]
    dg = dim // G
    T = chunk_size or auto_chunk_size(batch, dim, N, L)

    u_c = u.to(ct)
    dt = prepare_delta(delta.to(ct), None if delta_bias is None else delta_bias.to(ct), delta_softplus)
    u_g = u_c.view(batch, G, dg, L)
    dt_g = dt.view(batch, G, dg, L)
    A_g = A.to(ct).view(G, dg, N)
    x = u_c.new_zeros(batch, G, dg, N)
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    use_checkpoint = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    ys = []
    # split (one autograd node that concatenates the chunks' gradients), not slicing (whose backward
    # would write a full-length zero tensor per chunk: quadratic in L)
    pieces = [torch.split(t, T, dim=-1) for t in (u_g, dt_g, B4, C4)]
    masks = _upper_masks(T, u.device)
    for u_k, dt_k, B_k, C_k in zip(*pieces):
        args = (x, u_k, dt_k, A_g, B_k, C_k, masks)
        if use_checkpoint:
            y, x = checkpoint(_scan_chunk, *args, use_reentrant=False)
        else:
            y, x = _scan_chunk(*args)
        ys.append(y)
    y = torch.cat(ys, dim=-1).reshape(batch, dim, L) if ys else u_c.new_zeros(batch, dim, 0)
    out = finish_output(y, u_c, None if D is None else D.to(ct), z).to(dtype_in)
    if return_last_state:
        return out, x.reshape(batch, dim, N)
    return out
