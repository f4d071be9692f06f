"""Fused Triton forward and backward kernels for the selective scan (a custom ``torch.autograd.Function``).

One program per (batch row, block of BLOCK_D channels), walking L in order. Inputs may be bf16, fp16,
fp32 or fp64; arithmetic is float32 (float64 for float64 inputs). u, delta, z and the output are
(batch, dim, L); B, C are (batch, groups, N, L); all contiguous.

Each program takes SUB steps at a time as a (SUB, N, BLOCK_D) tile: Triton's default layout puts the
last axis on the lanes, so every thread owns whole channels and the step and state axes live in its
registers. Within the tile the recurrence x_t = a_t x_{t-1} + b_t (a_t = exp(dt_t A), b_t = dt_t B_t u_t)
is an associative scan along the step axis, which stays inside each thread (a sequential fma chain),
and sums over N need no shuffles. (Putting N or the steps on the lanes instead cost 3 to 6 times more
instructions per state-step: cross-lane reductions, per-channel work replicated over lanes.)

Forward: out_t = (C_t . x_t + D u_t) * silu(z_t); every CHUNK steps the state goes to ``ckpt``
(batch, n_chunks, N, dim), whose last entry is the final state.

Backward, chunk by chunk from the last: restart from the previous chunk's checkpoint and recompute the
states at the start of each SUB-step tile of the chunk into a small per-program scratch buffer -- so
activation memory is O(batch*dim*L) plus the checkpoints, never O(batch*dim*L*N) -- then walk the chunk's
tiles backwards with the adjoint g_t = dL/dx_t:

    g_t = C_t dy_t + a_{t+1} g_{t+1}          (g after the last step = dL/d last_state)
    du_t += dt_t sum_n g_t B_t                ddt_t = sum_n g_t (B_t u_t + A a_t x_{t-1})
    dA   += g_t a_t x_{t-1} dt_t              dB_t += g_t dt_t u_t,   dC_t += dy_t x_t   (summed over channels)

Inside a tile both directions are scans with three-part elements, so nothing is shifted by one step and
nothing is divided: a_t x_{t-1} comes from a forward scan of (a, 0, b) (:func:`_decayed_input_combine`;
not from x_t - b_t, which cancels to rounding noise when the decay is strong), and g from a reverse
scan of (a, 1, C dy) (:func:`_adjoint_combine`). dB and dC are summed over a program's channels in
registers and over programs with atomic adds into (batch, groups, N, L) float32; dA, dD and
d(delta_bias) are written per batch row and summed on the host.

Under ``TRITON_INTERPRET=1`` (set before triton is imported) the same kernels run on CPU tensors
through Triton's interpreter; that is how CI tests them without a GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os

import torch
import triton
import triton.language as tl


def interpreter_active() -> bool:
    """True if Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1 when triton was imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _affine_combine(a1, b1, a2, b2):
    """x -> a1 x + b1, then x -> a2 x + b2 (segment 1 before segment 2)."""
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _decayed_input_combine(p1, s1, l1, p2, s2, l2):
    """Segment (prod of a, earlier inputs decayed through the segment's end, last input); 1 before 2.

    For the segment [t0..t] with elements (a_k, 0, bx_k): s = sum_{s<t} prod_{k=s+1..t} a_k bx_s, so that
    a_t x_{t-1} = s + p x_in exactly, without forming x_t - bx_t.
    """
    return p1 * p2, p2 * (s1 + l1) + s2, l2


@triton.jit
def _adjoint_combine(f2, q2, s2, f1, q1, s1):
    """Reverse scan: the first argument is the later segment. Segment [i..j] of elements (a_k, 1, c_k):
    f = a_i, q = prod_{k=i+1..j} a_k, s = sum_{s=i..j} prod_{k=i+1..s} a_k c_s, so that
    g_i = s + q * (a_{j+1} g_{j+1})."""
    qf = q1 * f2
    return f1, qf * q2, s1 + qf * s2


@triton.jit
def _tile_fwd_kernel(
    u_ptr, delta_ptr, At_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, ckpt_ptr,
    dim, L, N, channels_per_group, n_groups, n_chunks,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, SUB: tl.constexpr, CT: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_s = tl.arange(0, SUB)
    mask_d = offs_d < dim
    mask_n = offs_n < N
    mask_nd = mask_n[:, None] & mask_d[None, :]
    group = (pid_d * BLOCK_D) // channels_per_group
    A = tl.load(At_ptr + offs_n[:, None] * dim + offs_d[None, :], mask=mask_nd, other=0.0).to(CT)  # (BN, BD)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(CT)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(CT)
    row = (pid_b * dim + offs_d) * L  # (BD,)
    bc_row = ((pid_b * n_groups + group) * N + offs_n) * L  # (BN,)
    ckpt_off = (pid_b * n_chunks * N + offs_n[:, None]) * dim + offs_d[None, :]  # (b, n_chunks, N, dim)
    x = tl.zeros((BLOCK_N, BLOCK_D), dtype=CT)
    for c in range(n_chunks):
        t0 = c * CHUNK
        n_steps = tl.minimum(L - t0, CHUNK)
        for s0 in range(0, n_steps, SUB):
            t = t0 + s0 + offs_s  # (SUB,)
            mask_t = t < L
            m_td = mask_t[:, None] & mask_d[None, :]
            m_tn = mask_t[:, None] & mask_n[None, :]
            u = tl.load(u_ptr + row[None, :] + t[:, None], mask=m_td, other=0.0).to(CT)  # (SUB, BD)
            dt = tl.load(delta_ptr + row[None, :] + t[:, None], mask=m_td, other=0.0).to(CT)
            if HAS_BIAS:
                dt = dt + bias[None, :]
            if SOFTPLUS:
                dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)
            dt = tl.where(m_td, dt, 0.0)
            Bt = tl.load(B_ptr + bc_row[None, :] + t[:, None], mask=m_tn, other=0.0).to(CT)  # (SUB, BN)
            Ct = tl.load(C_ptr + bc_row[None, :] + t[:, None], mask=m_tn, other=0.0).to(CT)
            a = tl.exp(dt[:, None, :] * A[None, :, :])  # (SUB, BN, BD)
            bx = (dt * u)[:, None, :] * Bt[:, :, None]
            a_cum, b_cum = tl.associative_scan((a, bx), axis=0, combine_fn=_affine_combine)
            xs = a_cum * x[None, :, :] + b_cum
            y = tl.sum(xs * Ct[:, :, None], axis=1)  # (SUB, BD)
            if HAS_D:
                y = y + Dv[None, :] * u
            if HAS_Z:
                zt = tl.load(z_ptr + row[None, :] + t[:, None], mask=m_td, other=0.0).to(CT)
                y = y * zt / (1.0 + tl.exp(-zt))
            tl.store(out_ptr + row[None, :] + t[:, None], y.to(out_ptr.dtype.element_ty), mask=m_td)
            x = tl.sum(tl.where((offs_s == SUB - 1)[:, None, None], xs, -0.0), axis=0)
        tl.store(ckpt_ptr + ckpt_off + c * N * dim, x, mask=mask_nd)


@triton.jit
def _tile_bwd_kernel(
    u_ptr, delta_ptr, At_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, ckpt_ptr, dlast_ptr, scratch_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_part_ptr, dD_part_ptr, dbias_part_ptr,
    dim, L, N, channels_per_group, n_groups, n_chunks, n_blocks,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_DLAST: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, SUB: tl.constexpr, CT: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_s = tl.arange(0, SUB)
    mask_d = offs_d < dim
    mask_n = offs_n < N
    mask_nd = mask_n[:, None] & mask_d[None, :]
    group = (pid_d * BLOCK_D) // channels_per_group
    A = tl.load(At_ptr + offs_n[:, None] * dim + offs_d[None, :], mask=mask_nd, other=0.0).to(CT)  # (BN, BD)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(CT)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(CT)
    row = (pid_b * dim + offs_d) * L
    bc_row = ((pid_b * n_groups + group) * N + offs_n) * L
    state_off = (pid_b * N + offs_n[:, None]) * dim + offs_d[None, :]  # (batch, N, dim) tensors
    ckpt_off = (pid_b * n_chunks * N + offs_n[:, None]) * dim + offs_d[None, :]
    scratch = (scratch_ptr + (pid_b * n_blocks + pid_d) * (CHUNK // SUB) * (BLOCK_N * BLOCK_D)
               + offs_n[:, None] * BLOCK_D + tl.arange(0, BLOCK_D)[None, :])

    if HAS_DLAST:
        h = tl.load(dlast_ptr + state_off, mask=mask_nd, other=0.0).to(CT)
    else:
        h = tl.zeros((BLOCK_N, BLOCK_D), dtype=CT)
    dA_acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=CT)
    dD_acc = tl.zeros((BLOCK_D,), dtype=CT)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=CT)

    for cc in range(n_chunks):
        c = n_chunks - 1 - cc
        t0 = c * CHUNK
        n_sub = tl.cdiv(tl.minimum(L - t0, CHUNK), SUB)
        x = tl.load(ckpt_ptr + ckpt_off + (c - 1) * N * dim, mask=mask_nd & (c > 0), other=0.0).to(CT)
        tl.debug_barrier()  # the previous chunk's reverse walk has read its scratch
        for j in range(n_sub):
            t = t0 + j * SUB + offs_s
            mask_t = t < L
            m_td = mask_t[:, None] & mask_d[None, :]
            m_tn = mask_t[:, None] & mask_n[None, :]
            u = tl.load(u_ptr + row[None, :] + t[:, None], mask=m_td, other=0.0).to(CT)
            dt = tl.load(delta_ptr + row[None, :] + t[:, None], mask=m_td, other=0.0).to(CT)
            if HAS_BIAS:
                dt = dt + bias[None, :]
            if SOFTPLUS:
                dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)
            dt = tl.where(m_td, dt, 0.0)
            Bt = tl.load(B_ptr + bc_row[None, :] + t[:, None], mask=m_tn, other=0.0).to(CT)
            tl.store(scratch + j * (BLOCK_N * BLOCK_D), x)  # state before sub-chunk j
            a = tl.exp(dt[:, None, :] * A[None, :, :])
            bx = (dt * u)[:, None, :] * Bt[:, :, None]
            a_cum, b_cum = tl.associative_scan((a, bx), axis=0, combine_fn=_affine_combine)
            x = tl.sum(tl.where((offs_s == SUB - 1)[:, None, None], a_cum * x[None, :, :] + b_cum, -0.0), axis=0)
        tl.debug_barrier()  # the states are in the scratch before they are read back
        for jj in range(n_sub):
            j = n_sub - 1 - jj
            t = t0 + j * SUB + offs_s
            mask_t = t < L
            m_td = mask_t[:, None] & mask_d[None, :]
            m_tn = mask_t[:, None] & mask_n[None, :]
            x_in = tl.load(scratch + j * (BLOCK_N * BLOCK_D))
            u = tl.load(u_ptr + row[None, :] + t[:, None], mask=m_td, other=0.0).to(CT)
            dt_raw = tl.load(delta_ptr + row[None, :] + t[:, None], mask=m_td, other=0.0).to(CT)
            if HAS_BIAS:
                dt_raw = dt_raw + bias[None, :]
            if SOFTPLUS:
                dt = tl.where(dt_raw <= 20.0, tl.log(1.0 + tl.exp(dt_raw)), dt_raw)
            else:
                dt = dt_raw
            dt = tl.where(m_td, dt, 0.0)
            Bt = tl.load(B_ptr + bc_row[None, :] + t[:, None], mask=m_tn, other=0.0).to(CT)
            Ct = tl.load(C_ptr + bc_row[None, :] + t[:, None], mask=m_tn, other=0.0).to(CT)
            dy = tl.load(dout_ptr + row[None, :] + t[:, None], mask=m_td, other=0.0).to(CT)
            dtu = dt * u
            a = tl.exp(dt[:, None, :] * A[None, :, :])  # (SUB, BN, BD)
            bx = dtu[:, None, :] * Bt[:, :, None]
            p, s, _ = tl.associative_scan((a, tl.zeros_like(a), bx), axis=0, combine_fn=_decayed_input_combine)
            ax = s + p * x_in[None, :, :]  # a_t x_{t-1}
            xs = ax + bx
            if HAS_Z:
                y = tl.sum(xs * Ct[:, :, None], axis=1)
                if HAS_D:
                    y = y + Dv[None, :] * u
                zt = tl.load(z_ptr + row[None, :] + t[:, None], mask=m_td, other=0.0).to(CT)
                sig_z = 1.0 / (1.0 + tl.exp(-zt))
                dz = dy * y * sig_z * (1.0 + zt * (1.0 - sig_z))
                tl.store(dz_ptr + row[None, :] + t[:, None], dz.to(dz_ptr.dtype.element_ty), mask=m_td)
                dy = dy * zt * sig_z
            cy = dy[:, None, :] * Ct[:, :, None]
            _, q, sg = tl.associative_scan((a, tl.zeros_like(a) + 1.0, cy), axis=0, combine_fn=_adjoint_combine,
                                           reverse=True)
            g = sg + q * h[None, :, :]
            dC = tl.sum(dy[:, None, :] * xs, axis=2)  # (SUB, BN)
            dB = tl.sum(g * dtu[:, None, :], axis=2)
            du = dt * tl.sum(g * Bt[:, :, None], axis=1)  # (SUB, BD)
            if HAS_D:
                du = du + dy * Dv[None, :]
                dD_acc += tl.sum(dy * u, axis=0)
            ddt = tl.sum(g * (Bt[:, :, None] * u[:, None, :] + A[None, :, :] * ax), axis=1)
            dA_acc += tl.sum(g * ax * dt[:, None, :], axis=0)
            if SOFTPLUS:
                ddt = ddt / (1.0 + tl.exp(-dt_raw))
            ddt = tl.where(m_td, ddt, 0.0)
            dbias_acc += tl.sum(ddt, axis=0)
            tl.store(du_ptr + row[None, :] + t[:, None], du.to(du_ptr.dtype.element_ty), mask=m_td)
            tl.store(ddelta_ptr + row[None, :] + t[:, None], ddt.to(ddelta_ptr.dtype.element_ty), mask=m_td)
            # summed over the channels of the group: per block here, across blocks by atomics
            tl.atomic_add(dB_ptr + bc_row[None, :] + t[:, None], dB, mask=m_tn, sem="relaxed")
            tl.atomic_add(dC_ptr + bc_row[None, :] + t[:, None], dC, mask=m_tn, sem="relaxed")
            h = tl.sum(tl.where((offs_s == 0)[:, None, None], a * g, -0.0), axis=0)

    tl.store(dA_part_ptr + state_off, dA_acc, mask=mask_nd)
    tl.store(dD_part_ptr + pid_b * dim + offs_d, dD_acc, mask=mask_d)
    tl.store(dbias_part_ptr + pid_b * dim + offs_d, dbias_acc, mask=mask_d)


def _tl_compute_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@dataclasses.dataclass(frozen=True)
class TritonConfig:
    """Launch parameters. ``block_d`` / ``block_d_bwd``: channels per program in the forward / backward kernel
    (upper bounds: scaled down for N > 16, and a program stays inside one group); ``sub_chunk``: steps each
    program scans at a time in registers; ``chunk``: steps between state checkpoints (a multiple of
    ``sub_chunk``); ``num_warps``: None gives one warp per 32 channels."""

    block_d: int = 32
    block_d_bwd: int = 8
    sub_chunk: int = 4
    chunk: int = 64
    num_warps: int | None = None

    def __post_init__(self):
        if self.sub_chunk & (self.sub_chunk - 1) or self.chunk % self.sub_chunk:
            raise ValueError(f"selective_scan_triton: sub_chunk ({self.sub_chunk}) must be a power of two "
                             f"dividing chunk ({self.chunk})")


def _channels_per_program(dim: int, groups: int, block_d: int, bn: int) -> int:
    """A power of two <= block_d (scaled down for N > 16, to bound the registers a program holds); with groups,
    one that divides the group size so no program straddles two."""
    block_d = max(1, block_d * 16 // max(bn, 16))
    if groups == 1:
        return min(block_d, triton.next_power_of_2(dim))
    per_group, bd = dim // groups, 1
    while bd * 2 <= block_d and per_group % (bd * 2) == 0:
        bd *= 2
    return bd


def _flags(cfg: TritonConfig, bd: int, bn: int, dtype: torch.dtype, D, z, delta_bias, softplus: bool) -> dict:
    # Triton's default layout gives the lanes to the channel axis first: one warp per 32 channels keeps
    # the state axis inside each warp (no reductions through shared memory)
    return dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus,
                BLOCK_D=bd, BLOCK_N=bn, CHUNK=cfg.chunk, SUB=cfg.sub_chunk, CT=_tl_compute_dtype(dtype),
                num_warps=cfg.num_warps or max(1, bd // 32))


class SelectiveScanTriton(torch.autograd.Function):
    """Autograd function over the forward and backward kernels; use :func:`selective_scan_triton`."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, cfg):
        batch, dim, L = u.shape
        N = A.shape[1]
        groups = B.shape[1]
        ct = torch.float64 if u.dtype == torch.float64 else torch.float32
        bn = triton.next_power_of_2(N)
        bd = _channels_per_program(dim, groups, cfg.block_d, bn)
        n_chunks = max(1, triton.cdiv(L, cfg.chunk))
        out = torch.empty_like(u)
        # A as (N, dim) and the checkpoints as (batch, n_chunks, N, dim): contiguous along the lane axis
        A_t = A.t().contiguous()
        alloc = torch.empty if L > 0 else torch.zeros  # the kernel writes every element
        ckpt = alloc((batch, n_chunks, N, dim), device=u.device, dtype=ct)
        if L > 0:
            _tile_fwd_kernel[(batch, triton.cdiv(dim, bd))](
                u, delta, A_t, B, C, u if D is None else D, u if z is None else z,
                u if delta_bias is None else delta_bias, out, ckpt,
                dim, L, N, dim // groups, groups, n_chunks,
                **_flags(cfg, bd, bn, u.dtype, D, z, delta_bias, bool(delta_softplus)),
            )
        ctx.save_for_backward(u, delta, A_t, B, C, D, z, delta_bias, ckpt)
        ctx.config = (bool(delta_softplus), cfg, A.dtype)
        ctx.set_materialize_grads(False)
        return out, ckpt[:, -1].transpose(1, 2).contiguous()

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A_t, B, C, D, z, delta_bias, ckpt = ctx.saved_tensors
        softplus, cfg, A_dtype = ctx.config
        batch, dim, L = u.shape
        n_chunks, N = ckpt.shape[1], ckpt.shape[2]
        groups = B.shape[1]
        ct = ckpt.dtype
        bn = triton.next_power_of_2(N)
        bd = _channels_per_program(dim, groups, cfg.block_d_bwd, bn)
        n_blocks = triton.cdiv(dim, bd)
        dev = u.device
        dout = torch.zeros_like(u) if dout is None else dout.contiguous()
        if dlast is not None:
            dlast = dlast.transpose(1, 2).contiguous()  # (batch, N, dim), like the checkpoints
        alloc = torch.empty if L > 0 else torch.zeros  # the kernel writes every element but the atomics' targets
        du = alloc(u.shape, device=dev, dtype=u.dtype)
        ddelta = alloc(delta.shape, device=dev, dtype=delta.dtype)
        dz = alloc(z.shape, device=dev, dtype=z.dtype) if z is not None else None
        dB = torch.zeros(batch, groups, N, L, device=dev, dtype=ct)  # summed over blocks by atomics
        dC = torch.zeros(batch, groups, N, L, device=dev, dtype=ct)
        dA_part = alloc(batch, N, dim, device=dev, dtype=ct)
        dD_part = alloc(batch, dim, device=dev, dtype=ct)
        dbias_part = alloc(batch, dim, device=dev, dtype=ct)
        scratch = torch.empty(batch * n_blocks * (cfg.chunk // cfg.sub_chunk) * bd * bn, device=dev, dtype=ct)
        if L > 0:
            _tile_bwd_kernel[(batch, n_blocks)](
                u, delta, A_t, B, C, u if D is None else D, u if z is None else z,
                u if delta_bias is None else delta_bias, dout, ckpt, u if dlast is None else dlast, scratch,
                du, ddelta, u if dz is None else dz, dB, dC, dA_part, dD_part, dbias_part,
                dim, L, N, dim // groups, groups, n_chunks, n_blocks,
                HAS_DLAST=dlast is not None, **_flags(cfg, bd, bn, u.dtype, D, z, delta_bias, softplus),
            )
        dA = dA_part.sum(0).t().to(A_dtype)
        dD = dD_part.sum(0).to(D.dtype) if D is not None else None
        dbias = dbias_part.sum(0).to(delta_bias.dtype) if delta_bias is not None else None
        return du, ddelta, dA, dB.to(B.dtype), dC.to(C.dtype), dD, dz, dbias, None, None


def selective_scan_triton(
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
    config: TritonConfig | None = None,
):
    """Fused Triton selective scan; same signature and results as ``selective_scan_reference``.

    Needs CUDA tensors, or CPU tensors with ``TRITON_INTERPRET=1`` set before triton was imported.
    ``config``: launch parameters (:class:`TritonConfig`; the default is the one measured fastest).
    """
    if not (u.is_cuda or interpreter_active()):
        raise RuntimeError(
            f"selective_scan backend 'triton' needs CUDA tensors (got {u.device}); use backend='torch' on CPU, "
            "or set TRITON_INTERPRET=1 before triton is imported to run the kernels in Triton's interpreter"
        )
    cfg = config or TritonConfig()
    B4 = B.unsqueeze(1) if B.dim() == 3 else B
    C4 = C.unsqueeze(1) if C.dim() == 3 else C
    if B4.shape[1] != C4.shape[1]:
        # the kernels read B and C through one group index: give them the same grouping
        groups = math.lcm(B4.shape[1], C4.shape[1])
        B4 = B4.repeat_interleave(groups // B4.shape[1], dim=1)
        C4 = C4.repeat_interleave(groups // C4.shape[1], dim=1)
    args = [t.contiguous() if t is not None else None for t in (u, delta, A, B4, C4, D, z, delta_bias)]
    with torch.cuda.device(u.device) if u.is_cuda else contextlib.nullcontext():
        out, last_state = SelectiveScanTriton.apply(*args, delta_softplus, cfg)
    return (out, last_state) if return_last_state else out
