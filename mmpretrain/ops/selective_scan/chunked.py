"""The selective scan in plain PyTorch, chunk by chunk, with a hand-written backward (the ``torch`` backend).

The sequence is cut into chunks of T steps, laid out time-first so that one step's (batch, dim, N) state
is one contiguous block. Inside a chunk everything that does not depend on the previous state runs as a
few large vectorised operations over the whole chunk (the decays a_t = exp(delta_t A), the inputs
delta_t B_t u_t, the read-out C_t . x_t and every gradient reduction); only the recurrence itself,

    x_t = a_t * x_{t-1} + b_t                 (forward)
    g_t = C_t dy_t + a_{t+1} * g_{t+1}        (backward: g_t = dLoss/dx_t)

is a loop over the chunk's steps, one in-place multiply-add of a (batch, dim, N) block per step. This is
the sequential recurrence of the reference, so it is exact and unconditionally stable (no cumulative sums
of log-decays, no divisions, nothing to overflow for any delta and A), while it does far fewer and larger
operations than the reference's autograd graph: on one CPU core a Vim layer's forward and backward are
about three times faster, and the backward keeps about eight times less (measurements in :mod:`.dispatch`).

Memory: the forward keeps the inputs in float32 (time-first copies, O(batch*dim*L)) and one (batch, dim, N)
state per chunk (the full state divided by T); the backward recomputes each chunk's states from its
starting state. Working memory is a few (T, batch, dim, N) tensors of one chunk. Nothing of size
(batch, dim, L, N) exists at any time.

On GPUs (where ``auto`` picks the fused triton kernels when triton is present) the loop costs one kernel
launch per step and direction, about 3 L launches per forward and backward, and the vectorised work reads
and writes the chunk buffers some 40 times per state element. Without the loop: the masked segment sum
over T x T per chunk (this backend's previous version) does T times the work, and was measured 28x slower
than the reference on CPU and 5x slower on an H200; cumulative sums of log decays (by cumsum or by a
triangular matmul) were not tried, as their exp(-sum) factors overflow for strong decays.
"""

from __future__ import annotations

import math

import torch

from .reference import compute_dtype, finish_output, prepare_delta

_SOFTPLUS_THRESHOLD = 20.0  # F.softplus's: above it, softplus(x) = x
# device types where the contractions over N or channels are matrix products (elsewhere: product and sum)
_MATMUL_DEVICES = ("cpu",)

# elements of one (T, batch, dim, N) chunk buffer that the automatic chunk size aims for, by device type:
# CPUs want the chunk's buffers in cache (measured on one core at Vim shapes: 4M elements per buffer was
# 1.3x slower than 1M); GPUs want few, large operations (each one costs a launch and host time)
_CHUNK_ELEMENTS = {"cpu": 1 << 20}
_CHUNK_ELEMENTS_OTHER = 1 << 24
_MAX_CHUNK = 64


def auto_chunk_size(batch: int, dim: int, N: int, L: int, device: torch.device | str = "cpu") -> int:
    """Steps per chunk T: as many as keep one (T, batch, dim, N) buffer under a per-device budget, 1..64, <= L.

    The budget is 1M elements (4 MiB float32) on CPUs and 16M elsewhere (GPUs). The recurrence does the
    same work for any T; what T changes is the number of vectorised operations per step and the size of
    the working set (about four chunk buffers).
    """
    budget = _CHUNK_ELEMENTS.get(torch.device(device).type, _CHUNK_ELEMENTS_OTHER)
    return max(1, min(_MAX_CHUNK, budget // max(1, batch * dim * N), L))


def softplus(x: torch.Tensor) -> torch.Tensor:
    """``F.softplus(x)`` (threshold 20); on CPU from vectorised exp and log instead of the slow log1p.

    log1p(y) is computed as log(1 + y) * y / ((1 + y) - 1), exact to a few ulp (Goldberg's trick); on one
    CPU core this is 2.5x faster than ``F.softplus`` in float32. Other devices use ``F.softplus``.
    """
    if x.device.type != "cpu":
        return torch.nn.functional.softplus(x)
    y = torch.exp(x.clamp(max=_SOFTPLUS_THRESHOLD))
    one_plus = 1 + y
    out = torch.log(one_plus).mul_(y).div_(one_plus - 1)
    out = torch.where(one_plus == 1, y, out)  # y below half an ulp of 1: log1p(y) = y
    return torch.where(x > _SOFTPLUS_THRESHOLD, x, out)


def _sum_over_states(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """sum_n x[..., n, d] v[..., n]: (..., N, dg), (..., N) -> (..., dg).

    On CPU a batched matrix product (einsum); elsewhere a product and a sum, which stay in float32 where a
    matrix product would follow ``torch.backends.cuda.matmul.allow_tf32`` (TF32 under the CLI's "high"
    matmul precision: 1e-3 relative error, and no faster for these matrix-vector products).
    """
    if x.device.type in _MATMUL_DEVICES:
        return torch.einsum("...nd,...n->...d", x, v)
    return (x * v[..., None]).sum(-2)


def _sum_over_channels(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """sum_d x[..., n, d] v[..., d]: (..., N, dg), (..., dg) -> (..., N) (see :func:`_sum_over_states`)."""
    if x.device.type in _MATMUL_DEVICES:
        return torch.einsum("...nd,...d->...n", x, v)
    return (x * v[..., None, :]).sum(-1)


def _chunk_states(x0, dt, u, B, A, a, x):
    """A chunk's decays and states, written into the buffers a and x (T, b, G, N, dg).

    x0 (b, G, N, dg) is the state entering the chunk; dt, u (T, b, G, dg); B (T, b, G, N); A (G, N, dg).
    Afterwards a[t] = exp(dt_t A) and x[t] is the state after step t.
    """
    torch.mul(dt[..., None, :], A, out=a)
    a.exp_()
    torch.mul((dt * u)[..., None, :], B[..., None], out=x)  # dt_t B_t u_t
    x[0].addcmul_(a[0], x0)
    for t in range(1, x.shape[0]):
        x[t].addcmul_(a[t], x[t - 1])


class _ChunkedScan(torch.autograd.Function):
    """y = C . x and the last state for u, dt (b, G, dg, L), A (G, dg, N), B, C (b, G, N, L), all one dtype.

    dt is the step size with its bias added; ``delta_softplus`` applies softplus to it here (in the time-first
    layout, and with a cheaper formula on CPU than autograd's). Inside, a step's
    state is laid out (b, G, N, dg): channels innermost, so that the products with the per-channel dt and
    the per-state B, C run over long contiguous rows (3-6x faster on CPU than states innermost at N 8-16).
    """

    @staticmethod
    def forward(ctx, u, dt, A, B, C, chunk: int, delta_softplus: bool):
        with torch.autocast(u.device.type, enabled=False):  # the products over N stay in u's dtype
            return _ChunkedScan._forward(ctx, u, dt, A, B, C, chunk, delta_softplus)

    @staticmethod
    def _forward(ctx, u, dt, A, B, C, chunk: int, delta_softplus: bool):
        batch, G, dg, L = u.shape
        N = A.shape[-1]
        # time-first copies: step t of a chunk is then one contiguous block
        uT, dtT = (t.permute(3, 0, 1, 2).contiguous() for t in (u, dt))  # (L, b, G, dg)
        rawT = None
        if delta_softplus:
            rawT, dtT = dtT, softplus(dtT)
        BT, CT = (t.permute(3, 0, 1, 2).contiguous() for t in (B, C))  # (L, b, G, N)
        At = A.transpose(-1, -2).contiguous()  # (G, N, dg)
        yT = u.new_empty(L, batch, G, dg)
        starts = range(0, L, chunk)
        states = u.new_empty(len(starts) + 1, batch, G, N, dg)  # [i]: the state entering chunk i; [-1]: the last
        states[0].zero_()
        a_buf, x_buf = (u.new_empty(min(chunk, L), batch, G, N, dg) for _ in range(2))
        for i, s in enumerate(starts):
            e = min(s + chunk, L)
            a, x = a_buf[: e - s], x_buf[: e - s]
            _chunk_states(states[i], dtT[s:e], uT[s:e], BT[s:e], At, a, x)
            yT[s:e] = _sum_over_states(x, CT[s:e])  # y_t = C_t . x_t
            states[i + 1] = x[-1]
        del a_buf, x_buf
        ctx.save_for_backward(uT, dtT, rawT, At, BT, CT, states)
        ctx.chunk = chunk
        last = states[-1].transpose(-1, -2).contiguous()  # (b, G, dg, N); a copy, not a view of all states
        return yT.permute(1, 2, 3, 0).contiguous(), last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dlast):
        with torch.autocast(dy.device.type, enabled=False):
            return _ChunkedScan._backward(ctx, dy, dlast)

    @staticmethod
    def _backward(ctx, dy, dlast):
        uT, dtT, rawT, At, BT, CT, states = ctx.saved_tensors
        chunk = ctx.chunk
        L = uT.shape[0]
        dyT = dy.permute(3, 0, 1, 2).contiguous()  # (L, b, G, dg)
        duT, ddtT = torch.empty_like(uT), torch.empty_like(dtT)
        dBT, dCT = torch.empty_like(BT), torch.empty_like(CT)
        dAt = torch.zeros_like(At)
        a_buf, x_buf, g_buf = (uT.new_empty(min(chunk, L), *states.shape[1:]) for _ in range(3))
        # dLoss/dx at the chunk's end through later steps (or through the last state itself)
        carry = dlast.transpose(-1, -2)
        for i in reversed(range(states.shape[0] - 1)):
            s = i * chunk
            e = min(s + chunk, L)
            u_k, dt_k, B_k, C_k, dy_k = uT[s:e], dtT[s:e], BT[s:e], CT[s:e], dyT[s:e]
            a, x, g = a_buf[: e - s], x_buf[: e - s], g_buf[: e - s]
            _chunk_states(states[i], dt_k, u_k, B_k, At, a, x)
            dCT[s:e] = _sum_over_channels(x, dy_k)  # dC_t[n] = sum_d dy_t[d] x_t[n, d]
            # g_t = dLoss/dx_t = C_t dy_t + a_{t+1} g_{t+1}
            torch.mul(dy_k[..., None, :], C_k[..., None], out=g)
            g[-1].add_(carry)
            for t in range(g.shape[0] - 2, -1, -1):
                g[t].addcmul_(a[t + 1], g[t + 1])
            carry = a[0] * g[0]
            # x_t's input term dt_t u_t B_t: d(dt u)_t = sum_n g_t B_t, dB_t[n] = sum_d g_t[n, d] dt_t[d] u_t[d]
            d_dtu = _sum_over_states(g, B_k)
            dBT[s:e] = _sum_over_channels(g, dt_k * u_k)
            # the decay a_t = exp(dt_t A): d(dt_t A) = g_t x_{t-1} a_t (x_{-1}: the chunk's starting state)
            g[1:].mul_(x[:-1])
            g[0].mul_(states[i])
            g.mul_(a)
            ddt = torch.mul(g, At, out=x).sum(-2)  # sum_n d(dt A)[n] A[n]
            dAt.add_(g.mul_(dt_k[..., None, :]).sum((0, 1)))
            torch.addcmul(ddt, d_dtu, u_k, out=ddtT[s:e])
            torch.mul(d_dtu, dt_k, out=duT[s:e])
        if rawT is not None:
            ddtT.mul_(torch.sigmoid(rawT))  # softplus' = sigmoid
        back = lambda t: t.permute(1, 2, 3, 0)  # noqa: E731 - (L, b, G, .) -> (b, G, ., L)
        return back(duT), back(ddtT), dAt.transpose(-1, -2), back(dBT), back(dCT), None, None


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
    """Chunked selective scan with a hand-written backward; same signature and results as the reference.

    ``chunk_size``: steps per chunk (default :func:`auto_chunk_size`: up to 64, fewer when one chunk's
    (T, batch, dim, N) buffer would pass the device's budget). Computes in float32 (float64 for float64
    inputs); the last state is returned in that dtype.
    """
    dtype_in = u.dtype
    ct = compute_dtype(dtype_in)
    batch, dim, L = u.shape
    N = A.shape[1]
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"selective_scan_chunked: chunk_size must be at least 1, got {chunk_size}")
    B4 = B.unsqueeze(1) if B.dim() == 3 else B
    C4 = C.unsqueeze(1) if C.dim() == 3 else C
    # B and C may have different group counts (say B shared, C per group): scan in the finest common grouping
    G = math.lcm(B4.shape[1], C4.shape[1])
    B4, C4 = (t if t.shape[1] == G else t.repeat_interleave(G // t.shape[1], dim=1) for t in (B4, C4))
    dg = dim // G
    u_c = u.to(ct)
    dt = prepare_delta(delta.to(ct), None if delta_bias is None else delta_bias.to(ct), False)  # softplus: inside
    if L == 0:
        dt = softplus(dt) if delta_softplus else dt
        y = u_c.new_zeros(batch, dim, 0)
        x = u_c.new_zeros(batch, dim, N)
    else:
        T = chunk_size or auto_chunk_size(batch, dim, N, L, u.device)
        y, x = _ChunkedScan.apply(u_c.reshape(batch, G, dg, L), dt.reshape(batch, G, dg, L),
                                  A.to(ct).reshape(G, dg, N), B4.to(ct), C4.to(ct), T, delta_softplus)
        y, x = y.reshape(batch, dim, L), x.reshape(batch, dim, N)
    out = finish_output(y, u_c, None if D is None else D.to(ct), z).to(dtype_in)
    if return_last_state:
        return out, x
    return out
