"""Fused Triton forward and backward kernels for the selective scan (a custom ``torch.autograd.Function`` in
eager mode; custom ops, in :mod:`.custom_ops`, under ``torch.compile``).

One program per (batch row, block of BLOCK_D channels, split of the sequence), walking its steps in order.
Inputs may be bf16, fp16, fp32 or fp64; arithmetic is float32 (float64 for float64 inputs). u, delta, z and
the output are (batch, dim, L) and B, C (batch, groups, N, L), all read through their strides: with the
channels contiguous (the transposed (batch, L, dim) activations of a Mamba block) each step's load of a
block of channels is one coalesced read, and the outputs and gradients are written in that layout too.
``REVERSE`` walks the sequence from its last position (memory index L-1-s at scan step s): the backward
direction of a bidirectional model without flipped copies.

Splits: with few (batch row, channel block) programs -- a long sequence at a small batch -- the sequence
is cut into runs of whole chunks scanned in parallel. A first pass scans each split from a zero state and
keeps its end state h and its summed dt (the split's decay is exp(A sum dt)); a small kernel walks the
splits, carry = exp(A sum dt) carry + h, giving each split's true initial state; the second pass is the
ordinary scan from it. The backward splits its adjoint the same way, from the right.

Each program takes SUB steps at a time as a (SUB, N, BLOCK_D) tile: Triton's default layout puts the
last axis on the lanes, so every thread owns whole channels and the step and state axes live in its
registers. Within the tile the recurrence x_t = a_t x_{t-1} + b_t (a_t = exp(dt_t A), b_t = dt_t B_t u_t)
runs step by step in each thread's registers (:func:`_recur`: one multiply and one add per state-step),
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

Inside a tile both recurrences run step by step in registers, forwards for x_t and a_t x_{t-1}
(:func:`_recur`; a_t x_{t-1} is kept, not formed as x_t - b_t, which cancels to rounding noise when the
decay is strong) and backwards for g (:func:`_adjoint`). dB and dC are summed over a program's channels (in
registers, then across lanes by a shuffle reduce-scatter on a GPU, :func:`_add_channel_sums`) and over programs
with atomic adds into (batch, groups, L, N) float32; dA, dD and d(delta_bias) over a program's steps in registers
and over programs with atomic adds too. The
backward's tiles are (SUB, ROWS, N, LANES_D): each thread holds ROWS channels, so the sums over channels
first add in registers and cross fewer lanes (see :func:`_bwd_kernel`).

Under ``TRITON_INTERPRET=1`` (set before triton is imported) the same kernels run on CPU tensors
through Triton's interpreter; that is how CI tests them without a GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings

import torch
import triton
import triton.language as tl

from .._runtime import interpreter_active, on_device
from .._tiles import step_of as _step_of

# the decay factors exp(dt A) are computed as exp2((dt log2 e) A): the scaling is per (step, channel), not per
# state, and Triton's exp2 is one special-function instruction (its exp adds a multiply and a subnormal range check)
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _sigmoid(x):
    """1 / (1 + e^-x) through exp2 (``tl.exp`` adds a multiply and a range check around it)."""
    return 1.0 / (1.0 + tl.exp2(-x * LOG2E))


@triton.jit
def _softplus(x, FAST_LOG: tl.constexpr):
    """log(1 + e^x) (x itself above 20) through exp2 and log2. FAST_LOG: log2 as the special-function unit's
    approximation (one instruction, relative error ~2^-22; float32 on a GPU): Triton's log and log2 are accurate
    polynomials of about 25 instructions, which made the softplus a tenth of the forward kernel's work."""
    e = 1.0 + tl.exp2(x * LOG2E)
    if FAST_LOG:
        lg = tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [e], dtype=tl.float32, is_pure=True, pack=1)
    else:
        lg = tl.log2(e)
    return tl.where(x <= 20.0, lg * LN2, x)


@triton.jit
def _recur(a, b, x, steps, SUB: tl.constexpr):
    """x_t = a_t x_{t-1} + b_t along a tile's steps, from the state ``x`` (the tile's shape with one step):
    the tile of states and the tile of a_t x_{t-1}. One multiply and one add per state-step, in order (an
    associative scan's combines cost about twice that); picking and placing the steps is free (see
    :func:`_step_of`)."""
    xs = b
    ax = b
    for k in tl.static_range(SUB):
        axk = _step_of(a, steps, k) * x
        x = axk + _step_of(b, steps, k)
        ax = tl.where(steps == k, axk, ax)
        xs = tl.where(steps == k, x, xs)
    return xs, ax


@triton.jit
def _recur_last(a, b, x, steps, SUB: tl.constexpr):
    """The state after a tile's last step, from ``x`` (:func:`_recur` without the tiles)."""
    for k in tl.static_range(SUB):
        x = _step_of(a, steps, k) * x + _step_of(b, steps, k)
    return x


@triton.jit
def _adjoint(a, cy, h, steps, SUB: tl.constexpr):
    """g_t = cy_t + a_{t+1} g_{t+1} backwards along a tile's steps, with ``h`` = a_{t+1} g_{t+1} entering after the
    last step (the tile's shape with one step): the tile of g, and a_first g_first, which enters the tile before."""
    g = cy
    for k in tl.static_range(SUB - 1, -1, -1):
        gk = _step_of(cy, steps, k) + h
        g = tl.where(steps == k, gk, g)
        h = _step_of(a, steps, k) * gk
    return g, h


@triton.jit
def _step_positions(s0, offs_s, end, REVERSE: tl.constexpr, L):
    """The tile of scan steps s0 + offs_s: their positions in memory (L - 1 - s when REVERSE) and which come
    before ``end``."""
    s = s0 + offs_s
    if REVERSE:
        return L - 1 - s, s < end
    return s, s < end


@triton.jit
def _tile_steps(s0, offs_s, end, mask_d, mask_n, REVERSE: tl.constexpr, L):
    """:func:`_step_positions` and the masks over (SUB, BD) and (SUB, BN)."""
    tm, mask_t = _step_positions(s0, offs_s, end, REVERSE, L)
    return tm, mask_t[:, None] & mask_d[None, :], mask_t[:, None] & mask_n[None, :]


@triton.jit
def _dt_of(raw, m_td, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, FAST_LOG: tl.constexpr):
    """(delta + bias, dt) from loaded delta (``bias`` broadcast to it): dt is its softplus when SOFTPLUS, zero at
    masked steps."""
    if HAS_BIAS:
        raw = raw + bias
    if SOFTPLUS:
        dt = _softplus(raw, FAST_LOG)
    else:
        dt = raw
    return raw, tl.where(m_td, dt, 0.0)


@triton.jit
def _fwd_kernel(
    u_ptr, delta_ptr, At_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, add_ptr, ckpt_ptr, init_ptr, local_ptr,
    dts_ptr, dim, L, N, channels_per_group, n_chunks, chunks_per_split, n_splits, out_scale,
    su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sz_b, sz_d, sz_l, so_b, so_d, so_l, sa_b, sa_d, sa_l,
    sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    REVERSE: tl.constexpr, LOCAL: tl.constexpr, HAS_INIT: tl.constexpr, FAST_LOG: tl.constexpr,
    HAS_ADD: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, SUB: tl.constexpr,
    CT: tl.constexpr,
):
    """One program: batch row x block of channels x split of the sequence (a run of whole chunks).

    LOCAL: scan the split from a zero state and store only its end state and its summed dt (the split's
    decay is exp(A * sum dt)); the host combines splits. Otherwise scan from the split's true initial state
    (``init``, or zero), store the output and the state at every chunk end into ``ckpt``. The output stored is
    ``out_scale * y``, plus ``add`` (strides ``sa_*``) with HAS_ADD."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
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
    else:
        bias = tl.zeros((BLOCK_D,), dtype=CT)
    u_row = pid_b * su_b + offs_d * su_d  # (BD,)
    dt_row = pid_b * sdt_b + offs_d * sdt_d
    z_row = pid_b * sz_b + offs_d * sz_d
    o_row = pid_b * so_b + offs_d * so_d
    a_row = pid_b * sa_b + offs_d * sa_d
    B_row = pid_b * sB_b + group * sB_g + offs_n * sB_n  # (BN,)
    C_row = pid_b * sC_b + group * sC_g + offs_n * sC_n
    state_nd = offs_n[:, None] * dim + offs_d[None, :]  # within a (N, dim) state
    split_off = (pid_b * n_splits + pid_s) * N * dim
    if HAS_INIT:
        x = tl.load(init_ptr + split_off + state_nd, mask=mask_nd, other=0.0).to(CT)
    else:
        x = tl.zeros((BLOCK_N, BLOCK_D), dtype=CT)
    dt_sum = tl.zeros((BLOCK_D,), dtype=CT)
    c_begin = pid_s * chunks_per_split
    c_end = tl.minimum(c_begin + chunks_per_split, n_chunks)
    t_begin = c_begin * CHUNK
    t_end = tl.minimum(c_end * CHUNK, L)
    # one loop over the split's tiles, each tile's loads issued one tile ahead (their latency hides behind
    # the previous tile's arithmetic); a tile never straddles two chunks (SUB divides CHUNK)
    tm, m_td, m_tn = _tile_steps(t_begin, offs_s, t_end, mask_d, mask_n, REVERSE, L)
    u_n = tl.load(u_ptr + u_row[None, :] + tm[:, None] * su_l, mask=m_td, other=0.0).to(CT)
    dt_n = tl.load(delta_ptr + dt_row[None, :] + tm[:, None] * sdt_l, mask=m_td, other=0.0).to(CT)
    B_n = tl.load(B_ptr + B_row[None, :] + tm[:, None] * sB_l, mask=m_tn, other=0.0).to(CT)
    C_n = tl.zeros((SUB, BLOCK_N), dtype=CT)
    z_n = tl.zeros((SUB, BLOCK_D), dtype=CT)
    add_n = tl.zeros((SUB, BLOCK_D), dtype=CT)
    if not LOCAL:
        C_n = tl.load(C_ptr + C_row[None, :] + tm[:, None] * sC_l, mask=m_tn, other=0.0).to(CT)
        if HAS_Z:
            z_n = tl.load(z_ptr + z_row[None, :] + tm[:, None] * sz_l, mask=m_td, other=0.0).to(CT)
        if HAS_ADD:
            add_n = tl.load(add_ptr + a_row[None, :] + tm[:, None] * sa_l, mask=m_td, other=0.0).to(CT)
    for i in range(tl.cdiv(t_end - t_begin, SUB)):
        t0 = t_begin + i * SUB
        u, dt_in, Bt, Ct, zt, add_t = u_n, dt_n, B_n, C_n, z_n, add_n
        tm, m_td, m_tn = _tile_steps(t0, offs_s, t_end, mask_d, mask_n, REVERSE, L)
        tn, n_td, n_tn = _tile_steps(t0 + SUB, offs_s, t_end, mask_d, mask_n, REVERSE, L)
        u_n = tl.load(u_ptr + u_row[None, :] + tn[:, None] * su_l, mask=n_td, other=0.0).to(CT)
        dt_n = tl.load(delta_ptr + dt_row[None, :] + tn[:, None] * sdt_l, mask=n_td, other=0.0).to(CT)
        B_n = tl.load(B_ptr + B_row[None, :] + tn[:, None] * sB_l, mask=n_tn, other=0.0).to(CT)
        if not LOCAL:
            C_n = tl.load(C_ptr + C_row[None, :] + tn[:, None] * sC_l, mask=n_tn, other=0.0).to(CT)
            if HAS_Z:
                z_n = tl.load(z_ptr + z_row[None, :] + tn[:, None] * sz_l, mask=n_td, other=0.0).to(CT)
            if HAS_ADD:
                add_n = tl.load(add_ptr + a_row[None, :] + tn[:, None] * sa_l, mask=n_td, other=0.0).to(CT)
        dt_raw, dt = _dt_of(dt_in, m_td, bias[None, :], HAS_BIAS, SOFTPLUS, FAST_LOG)
        a = tl.exp2((dt * LOG2E)[:, None, :] * A[None, :, :])  # (SUB, BN, BD)
        bx = (dt * u)[:, None, :] * Bt[:, :, None]
        if LOCAL:
            x = tl.sum(_recur_last(a, bx, x[None], offs_s[:, None, None], SUB), axis=0)
            dt_sum += tl.sum(dt, axis=0)
        else:
            xs, _ = _recur(a, bx, x[None], offs_s[:, None, None], SUB)
            y = tl.sum(xs * Ct[:, :, None], axis=1)  # (SUB, BD)
            if HAS_D:
                y = y + Dv[None, :] * u
            if HAS_Z:
                y = y * zt * _sigmoid(zt)
            y = y * out_scale
            if HAS_ADD:
                y += add_t
            tl.store(out_ptr + o_row[None, :] + tm[:, None] * so_l, y.to(out_ptr.dtype.element_ty), mask=m_td)
        if not LOCAL:
            x = tl.sum(_step_of(xs, offs_s[:, None, None], SUB - 1), axis=0)
            t_next = t0 + SUB
            if (t_next % CHUNK == 0) | (t_next >= t_end):  # the end of a chunk: checkpoint the state
                c = (t_next - 1) // CHUNK
                tl.store(ckpt_ptr + (pid_b * n_chunks + c) * N * dim + state_nd, x, mask=mask_nd)
    if LOCAL:
        tl.store(local_ptr + split_off + state_nd, x, mask=mask_nd)
        tl.store(dts_ptr + (pid_b * n_splits + pid_s) * dim + offs_d, dt_sum, mask=mask_d)


@triton.jit
def _combine_kernel(
    h_ptr, dts_ptr, At_ptr, first_ptr, carry_ptr, dim, N, n_splits,
    REVERSE: tl.constexpr, HAS_FIRST: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    CT: tl.constexpr,
):
    """The carry entering each split, from each split's local result h (computed from a zero carry) and decay
    exp(A * sum dt): carry_next = exp(A * dts) * carry + h, walked forward (states) or backward (adjoints).
    ``first`` (batch, N, dim) enters the first split walked (the initial state, or dL/d last state)."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < dim
    mask_nd = (offs_n < N)[:, None] & mask_d[None, :]
    state_nd = offs_n[:, None] * dim + offs_d[None, :]
    A = tl.load(At_ptr + state_nd, mask=mask_nd, other=0.0).to(CT)
    if HAS_FIRST:
        carry = tl.load(first_ptr + pid_b * N * dim + state_nd, mask=mask_nd, other=0.0).to(CT)
    else:
        carry = tl.zeros((BLOCK_N, BLOCK_D), dtype=CT)
    for i in range(n_splits):
        if REVERSE:
            s = n_splits - 1 - i
        else:
            s = i
        off = (pid_b * n_splits + s) * N * dim + state_nd
        tl.store(carry_ptr + off, carry, mask=mask_nd)
        dts = tl.load(dts_ptr + (pid_b * n_splits + s) * dim + offs_d, mask=mask_d, other=0.0).to(CT)
        carry = tl.exp(A * dts[None, :]) * carry + tl.load(h_ptr + off, mask=mask_nd, other=0.0).to(CT)


@triton.jit
def _rows_tile(s0, offs_s, end, mask_d, mask_n, REVERSE: tl.constexpr, L):
    """:func:`_step_positions` and the masks over the backward's (SUB, ROWS, LANES_D) and (SUB, BN)."""
    tm, mask_t = _step_positions(s0, offs_s, end, REVERSE, L)
    return tm, mask_t[:, None, None] & mask_d[None, :, :], mask_t[:, None] & mask_n[None, :]


@triton.jit
def _shfl_xor(x, OFF: tl.constexpr):
    """Each lane's x from the lane whose index differs by the bits of OFF (a butterfly shuffle; float32, every lane
    of the warp taking part). Inline PTX: Triton has no shuffle, only reductions that leave the sum on every lane."""
    return tl.inline_asm_elementwise("shfl.sync.bfly.b32 $0, $1, $2, 0x1f, -1;", "=r,r,r",
                                     [x, tl.full(x.shape, OFF, tl.int32)], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _add_channel_sums(ptr, part, row, s0, offs_n, mask_n, REVERSE: tl.constexpr, L, N, LANES_D: tl.constexpr):
    """Atomically adds ``part`` (4 steps, BN, LANES_D) summed over its LANES_D lanes into ptr[row + t * N] (dB or
    dC of the 4-step tile starting at scan step s0; ``row`` (1, BN, 1) points at each state's entry for position
    0), as a reduce-scatter. In each of the first two shuffle rounds a lane sends its partner the half of its
    steps that the partner keeps and adds the partner's half of its own: after them each lane holds one step's
    sums over 4 lanes (12 shuffles per thread with 8 channel lanes, against 2 x 16 for butterflies); butterflies
    sum the remaining lanes, which then split the atomic adds between them. ``tl.sum`` shuffles every value in
    every round (3 x 16 per thread over 8 lanes) and leaves every sum on every lane.

    The shuffles pair lanes by index, so this relies on the layout Triton gives the backward's tiles: one warp, the
    channel lanes on the lane index's low bits, each thread one element of the lane axis (the default blocked
    layout; ``test_triton_backend_channel_sums`` checks it on a GPU at 4 to 32 channel lanes, and
    :func:`lane_sums_verified` at run time, once per kernel specialisation)."""
    HALF: tl.constexpr = LANES_D // 2
    QUARTER: tl.constexpr = LANES_D // 4
    steps = tl.arange(0, 4)[:, None, None]
    lanes = tl.arange(0, LANES_D)[None, None, :]
    hi = (lanes & HALF) != 0  # this lane keeps steps 2, 3 and gives steps 0, 1 away; its partner the converse
    p0, p1 = _step_of(part, steps, 0), _step_of(part, steps, 1)
    p2, p3 = _step_of(part, steps, 2), _step_of(part, steps, 3)
    q0 = tl.where(hi, p2, p0) + _shfl_xor(tl.where(hi, p0, p2), HALF)
    q1 = tl.where(hi, p3, p1) + _shfl_xor(tl.where(hi, p1, p3), HALF)
    mid = (lanes & QUARTER) != 0
    r = tl.where(mid, q1, q0) + _shfl_xor(tl.where(mid, q0, q1), QUARTER)  # step 2 hi + mid
    if QUARTER >= 8:
        r += _shfl_xor(r, 4)
    if QUARTER >= 4:
        r += _shfl_xor(r, 2)
    if QUARTER >= 2:
        r += _shfl_xor(r, 1)
    t, valid = _step_positions(s0 + 2 * hi.to(tl.int32) + mid.to(tl.int32), 0, L, REVERSE, L)
    # the QUARTER lanes that now hold the same sums split the states between them (a state's register index
    # n // (32 // LANES_D) picks the lane)
    n = offs_n[None, :, None]
    mine = (n // (32 // LANES_D)) % QUARTER == lanes % QUARTER
    tl.atomic_add(ptr + row + t * N, r, mask=valid & mask_n[None, :, None] & mine, sem="relaxed")


@triton.jit
def _bwd_kernel(
    u_ptr, delta_ptr, At_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, ckpt_ptr, carry_ptr, scratch_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr,
    dim, L, N, channels_per_group, n_groups, n_chunks, chunks_per_split, n_splits, n_blocks, out_scale,
    su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sz_b, sz_d, sz_l, sg_b, sg_d, sg_l, so_b, so_d, so_l,
    sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    REVERSE: tl.constexpr, LOCAL: tl.constexpr, HAS_CARRY: tl.constexpr, FAST_LOG: tl.constexpr,
    LANE_SUMS: tl.constexpr, ROWS: tl.constexpr, LANES_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
    SUB: tl.constexpr, CT: tl.constexpr,
):
    """One program: batch row x block of ROWS * LANES_D channels x split, walking the split's chunks from the last.

    Tiles are (SUB, ROWS, BLOCK_N, LANES_D), channel ``r * LANES_D + l`` of the block at row r, lane l: Triton's
    default layout puts LANES_D lanes on the last axis and the warp's other lanes on the states, and keeps the
    steps and the rows in each thread's registers. The sums of dB and dC over the channels add a thread's rows
    first and only then cross the lanes, so ROWS channels per thread divide their shuffles by ROWS (those sums
    were a third of the kernel's instructions with one channel per thread).

    LOCAL: only the adjoint, from a zero carry, storing the carry the split passes on to the one before it
    (a_first g_first) in ``carry_ptr``'s place for this split -- the host combines splits. Otherwise the full
    backward from the split's carry (``carry``: (batch, n_splits, N, dim), or zero). ``out_scale``: the forward's
    (dout is scaled by it as it is read). ``sg_*``: dout's strides;
    ``so_*``: the strides of du, ddelta and dz; dB, dC are float32 (batch, groups, N, L)."""
    BLOCK_D: tl.constexpr = ROWS * LANES_D
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_c = tl.arange(0, ROWS)[:, None] * LANES_D + tl.arange(0, LANES_D)[None, :]  # (ROWS, LANES_D)
    offs_d = pid_d * BLOCK_D + offs_c
    offs_n = tl.arange(0, BLOCK_N)
    offs_s = tl.arange(0, SUB)
    mask_d = offs_d < dim
    mask_n = offs_n < N
    state_nd = offs_n[None, :, None] * dim + offs_d[:, None, :]  # (ROWS, BN, LANES_D) within a (N, dim) state
    mask_nd = mask_n[None, :, None] & mask_d[:, None, :]
    group = (pid_d * BLOCK_D) // channels_per_group
    A = tl.load(At_ptr + state_nd, mask=mask_nd, other=0.0).to(CT)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(CT)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(CT)
    else:
        bias = tl.zeros((ROWS, LANES_D), dtype=CT)
    u_row = pid_b * su_b + offs_d * su_d  # (ROWS, LANES_D)
    dt_row = pid_b * sdt_b + offs_d * sdt_d
    z_row = pid_b * sz_b + offs_d * sz_d
    g_row = pid_b * sg_b + offs_d * sg_d
    o_row = pid_b * so_b + offs_d * so_d
    B_row = pid_b * sB_b + group * sB_g + offs_n * sB_n
    C_row = pid_b * sC_b + group * sC_g + offs_n * sC_n
    dBC_row = (pid_b * n_groups + group) * L * N + offs_n  # dB, dC: float32 (batch, groups, L, N)
    split_off = (pid_b * n_splits + pid_s) * N * dim
    scratch = (scratch_ptr + ((pid_b * n_blocks + pid_d) * n_splits + pid_s) * (CHUNK // SUB) * (BLOCK_N * BLOCK_D)
               + (tl.arange(0, ROWS)[:, None, None] * BLOCK_N + offs_n[None, :, None]) * LANES_D
               + tl.arange(0, LANES_D)[None, None, :])
    steps = offs_s[:, None, None, None]

    if HAS_CARRY:
        # loaded as (ROWS, BN, LANES_D) and then given the step axis, so that the walk carries h in the tiles'
        # layout: loaded as 4-D, the loop kept the load's layout and converted h at every step (shuffles)
        h = tl.load(carry_ptr + split_off + state_nd, mask=mask_nd, other=0.0).to(CT)[None]
    else:
        h = tl.zeros((1, ROWS, BLOCK_N, LANES_D), dtype=CT)  # a_{t+1} g_{t+1}, one step of a tile
    dA_acc = tl.zeros((ROWS, BLOCK_N, LANES_D), dtype=CT)
    dD_acc = tl.zeros((ROWS, LANES_D), dtype=CT)
    dbias_acc = tl.zeros((ROWS, LANES_D), dtype=CT)

    c_begin = pid_s * chunks_per_split
    c_end = tl.minimum(c_begin + chunks_per_split, n_chunks)
    for cc in range(c_end - c_begin):
        c = c_end - 1 - cc
        t0 = c * CHUNK
        n_sub = tl.cdiv(tl.minimum(L - t0, CHUNK), SUB)
        if not LOCAL:
            # states at the start of each SUB-step tile of the chunk, from the previous chunk's checkpoint
            x = tl.load(ckpt_ptr + (pid_b * n_chunks + c - 1) * N * dim + state_nd, mask=mask_nd & (c > 0),
                        other=0.0).to(CT)
            tl.debug_barrier()  # the previous chunk's reverse walk has read its scratch
            # each tile's loads are issued one tile ahead (the last iteration reloads its own tile, unused)
            tm, m_td, m_tn = _rows_tile(t0, offs_s, L, mask_d, mask_n, REVERSE, L)
            u_n = tl.load(u_ptr + u_row[None] + tm[:, None, None] * su_l, mask=m_td, other=0.0).to(CT)
            dt_n = tl.load(delta_ptr + dt_row[None] + tm[:, None, None] * sdt_l, mask=m_td, other=0.0).to(CT)
            B_n = tl.load(B_ptr + B_row[None, :] + tm[:, None] * sB_l, mask=m_tn, other=0.0).to(CT)
            for j in range(n_sub):
                u, dt_in, Bt = u_n, dt_n, B_n
                tm, m_td, m_tn = _rows_tile(t0 + j * SUB, offs_s, L, mask_d, mask_n, REVERSE, L)
                tn, n_td, n_tn = _rows_tile(t0 + tl.minimum(j + 1, n_sub - 1) * SUB, offs_s, L, mask_d, mask_n,
                                            REVERSE, L)
                u_n = tl.load(u_ptr + u_row[None] + tn[:, None, None] * su_l, mask=n_td, other=0.0).to(CT)
                dt_n = tl.load(delta_ptr + dt_row[None] + tn[:, None, None] * sdt_l, mask=n_td, other=0.0).to(CT)
                B_n = tl.load(B_ptr + B_row[None, :] + tn[:, None] * sB_l, mask=n_tn, other=0.0).to(CT)
                dt_raw, dt = _dt_of(dt_in, m_td, bias[None], HAS_BIAS, SOFTPLUS, FAST_LOG)
                tl.store(scratch + j * (BLOCK_N * BLOCK_D), x)  # state before tile j
                a = tl.exp2((dt * LOG2E)[:, :, None, :] * A[None])  # (SUB, ROWS, BN, LANES_D)
                bx = (dt * u)[:, :, None, :] * Bt[:, None, :, None]
                x = tl.sum(_recur_last(a, bx, x[None], steps, SUB), axis=0)
            tl.debug_barrier()  # the states are in the scratch before they are read back
        # the reverse walk, its loads one tile ahead too
        tm, m_td, m_tn = _rows_tile(t0 + (n_sub - 1) * SUB, offs_s, L, mask_d, mask_n, REVERSE, L)
        dt_n = tl.load(delta_ptr + dt_row[None] + tm[:, None, None] * sdt_l, mask=m_td, other=0.0).to(CT)
        C_n = tl.load(C_ptr + C_row[None, :] + tm[:, None] * sC_l, mask=m_tn, other=0.0).to(CT)
        dy_n = tl.load(dout_ptr + g_row[None] + tm[:, None, None] * sg_l, mask=m_td, other=0.0).to(CT)
        z_n = tl.zeros((SUB, ROWS, LANES_D), dtype=CT)
        if HAS_Z:
            z_n = tl.load(z_ptr + z_row[None] + tm[:, None, None] * sz_l, mask=m_td, other=0.0).to(CT)
        u_n = tl.zeros((SUB, ROWS, LANES_D), dtype=CT)
        B_n = tl.zeros((SUB, BLOCK_N), dtype=CT)
        x_n = tl.zeros((ROWS, BLOCK_N, LANES_D), dtype=CT)
        if not LOCAL:
            u_n = tl.load(u_ptr + u_row[None] + tm[:, None, None] * su_l, mask=m_td, other=0.0).to(CT)
            B_n = tl.load(B_ptr + B_row[None, :] + tm[:, None] * sB_l, mask=m_tn, other=0.0).to(CT)
            x_n = tl.load(scratch + (n_sub - 1) * (BLOCK_N * BLOCK_D))
        for jj in range(n_sub):
            j = n_sub - 1 - jj
            dt_in, Ct, dy, zt, u, Bt, x_in = dt_n, C_n, dy_n * out_scale, z_n, u_n, B_n, x_n
            tm, m_td, m_tn = _rows_tile(t0 + j * SUB, offs_s, L, mask_d, mask_n, REVERSE, L)
            jn = tl.maximum(j - 1, 0)
            tn, n_td, n_tn = _rows_tile(t0 + jn * SUB, offs_s, L, mask_d, mask_n, REVERSE, L)
            dt_n = tl.load(delta_ptr + dt_row[None] + tn[:, None, None] * sdt_l, mask=n_td, other=0.0).to(CT)
            C_n = tl.load(C_ptr + C_row[None, :] + tn[:, None] * sC_l, mask=n_tn, other=0.0).to(CT)
            dy_n = tl.load(dout_ptr + g_row[None] + tn[:, None, None] * sg_l, mask=n_td, other=0.0).to(CT)
            if HAS_Z:
                z_n = tl.load(z_ptr + z_row[None] + tn[:, None, None] * sz_l, mask=n_td, other=0.0).to(CT)
            if not LOCAL:
                u_n = tl.load(u_ptr + u_row[None] + tn[:, None, None] * su_l, mask=n_td, other=0.0).to(CT)
                B_n = tl.load(B_ptr + B_row[None, :] + tn[:, None] * sB_l, mask=n_tn, other=0.0).to(CT)
                x_n = tl.load(scratch + jn * (BLOCK_N * BLOCK_D))
            dt_raw, dt = _dt_of(dt_in, m_td, bias[None], HAS_BIAS, SOFTPLUS, FAST_LOG)
            a = tl.exp2((dt * LOG2E)[:, :, None, :] * A[None])  # (SUB, ROWS, BN, LANES_D)
            C4 = Ct[:, None, :, None]
            if LOCAL:
                if HAS_Z:
                    dy = dy * zt * _sigmoid(zt)
                g, h = _adjoint(a, dy[:, :, None, :] * C4, h, steps, SUB)
            else:
                dtu = dt * u
                B4 = Bt[:, None, :, None]
                bx = dtu[:, :, None, :] * B4
                xs, ax = _recur(a, bx, x_in[None], steps, SUB)  # x_t and a_t x_{t-1}
                if HAS_Z:
                    y = tl.sum(xs * C4, axis=2)  # (SUB, ROWS, LANES_D)
                    if HAS_D:
                        y = y + Dv[None] * u
                    sig_z = _sigmoid(zt)
                    dz = dy * y * sig_z * (1.0 + zt * (1.0 - sig_z))
                    tl.store(dz_ptr + o_row[None] + tm[:, None, None] * so_l, dz.to(dz_ptr.dtype.element_ty),
                             mask=m_td)
                    dy = dy * zt * sig_z
                g, h = _adjoint(a, dy[:, :, None, :] * C4, h, steps, SUB)
                # sums over the channels: a thread's rows in registers first, then across the lanes
                dC_part = tl.sum(dy[:, :, None, :] * xs, axis=1)  # (SUB, BN, LANES_D)
                dB_part = tl.sum(g * dtu[:, :, None, :], axis=1)
                gB = tl.sum(g * B4, axis=2)  # (SUB, ROWS, LANES_D)
                du = dt * gB
                if HAS_D:
                    du = du + dy * Dv[None]
                    dD_acc += tl.sum(dy * u, axis=0)
                gax = g * ax  # shared by ddt and dA: ddt = u sum_n g B + sum_n A g a x_{t-1}
                ddt = u * gB + tl.sum(A[None] * gax, axis=2)
                dA_acc += tl.sum(gax * dt[:, :, None, :], axis=0)
                if SOFTPLUS:
                    ddt = ddt * _sigmoid(dt_raw)
                ddt = tl.where(m_td, ddt, 0.0)
                dbias_acc += tl.sum(ddt, axis=0)
                tl.store(du_ptr + o_row[None] + tm[:, None, None] * so_l, du.to(du_ptr.dtype.element_ty), mask=m_td)
                tl.store(ddelta_ptr + o_row[None] + tm[:, None, None] * so_l, ddt.to(ddelta_ptr.dtype.element_ty),
                         mask=m_td)
                # summed over the channels of the group: per block here, across blocks by atomics (a tile's
                # (SUB, N) sums are contiguous)
                if LANE_SUMS:
                    s0 = t0 + j * SUB
                    _add_channel_sums(dB_ptr, dB_part, dBC_row[None, :, None], s0, offs_n, mask_n, REVERSE, L, N,
                                      LANES_D)
                    _add_channel_sums(dC_ptr, dC_part, dBC_row[None, :, None], s0, offs_n, mask_n, REVERSE, L, N,
                                      LANES_D)
                else:
                    tl.atomic_add(dB_ptr + dBC_row[None, :] + tm[:, None] * N, tl.sum(dB_part, axis=2), mask=m_tn,
                                  sem="relaxed")
                    tl.atomic_add(dC_ptr + dBC_row[None, :] + tm[:, None] * N, tl.sum(dC_part, axis=2), mask=m_tn,
                                  sem="relaxed")

    if LOCAL:
        tl.store(carry_ptr + split_off + state_nd[None], h, mask=mask_nd[None])
    else:
        # summed over batch rows and splits by atomic adds into zeroed (N, dim) and (dim,) buffers of the compute
        # dtype (a small reduction kernel each, on the host, cost more than these adds)
        tl.atomic_add(dA_ptr + state_nd, dA_acc, mask=mask_nd, sem="relaxed")
        if HAS_D:
            tl.atomic_add(dD_ptr + offs_d, dD_acc, mask=mask_d, sem="relaxed")
        if HAS_BIAS:
            tl.atomic_add(dbias_ptr + offs_d, dbias_acc, mask=mask_d, sem="relaxed")


def _tl_compute_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@dataclasses.dataclass(frozen=True)
class TritonConfig:
    """Launch parameters. ``block_d`` / ``block_d_bwd``: channels per program in the forward / backward kernel
    (upper bounds: scaled down for N > 16, and a program stays inside one group); ``sub_chunk``: steps each
    program scans at a time in registers (``sub_chunk_bwd``: in the backward; None for 4, or the largest power
    of two dividing ``chunk`` if smaller: on an H100, with one row, the backward took 1.101 ms with 4 against 1.138 ms
    with 2 at batch 256, L 197, and 2.367 against 2.481 ms at batch 16, L 6085); ``chunk``: steps between state
    checkpoints (a multiple of both); ``num_warps`` / ``num_warps_bwd``: None gives one warp
    per 32 channels; ``splits``: pieces the sequence is cut into and scanned in parallel (a run of whole chunks
    each). None: 1 when batch x channel blocks give at least ``split_below`` programs per multiprocessor, else
    enough for ``programs_per_sm``. A split costs a second, partial pass over its inputs, so it pays only when
    the GPU would otherwise idle: on an H200 at batch 128, L 197, dim 384 (11.6 programs per multiprocessor),
    two splits made the forward kernel 0.089 -> 0.172 ms and the backward 0.81 -> 1.15 ms; at batch 16,
    L 6085 (1.5 per multiprocessor), 22 splits made the forward 1.80 -> 0.62 ms and the backward 5.3 -> 4.2 ms.
    ``rows_bwd``: channels each thread of the backward holds (its ``block_d_bwd`` channels are ``rows_bwd`` rows
    of lanes; capped at the program's channels). On an H100 (bf16, Vim-Ti shapes, 4-step tiles) the backward
    kernel took 0.905 ms with 16 channels in 2 rows against 1.104 ms in 1 row (16 lanes on channels) at batch
    256, L 197, and 1.937 against 2.348 ms at batch 16, L 6085; 4 rows took 1.026 and 2.178 ms."""

    block_d: int = 32
    block_d_bwd: int = 16
    sub_chunk: int = 2
    sub_chunk_bwd: int | None = None
    chunk: int = 64
    num_warps: int | None = None
    num_warps_bwd: int | None = None
    splits: int | None = None
    programs_per_sm: int = 32
    split_below: int = 8
    rows_bwd: int = 2

    @property
    def bwd_sub_chunk(self) -> int:
        """Steps per tile in the backward kernel."""
        return self.sub_chunk_bwd or math.gcd(4, self.chunk)

    def __post_init__(self):
        for sub in (self.sub_chunk, self.bwd_sub_chunk):
            if sub & (sub - 1) or self.chunk % sub:
                raise ValueError(f"selective_scan_triton: sub_chunk and sub_chunk_bwd ({sub}) must be powers of "
                                 f"two dividing chunk ({self.chunk})")
        if self.rows_bwd < 1 or self.rows_bwd & (self.rows_bwd - 1):
            raise ValueError(f"selective_scan_triton: rows_bwd must be a power of two, got {self.rows_bwd}")
        if self.splits is not None and self.splits < 1:
            raise ValueError(f"selective_scan_triton: splits must be >= 1 or None, got {self.splits}")

    def to_ints(self) -> list[int]:
        """The fields in order, None as 0 (no field takes 0): how the config crosses a custom op's schema."""
        return [self.block_d, self.block_d_bwd, self.sub_chunk, self.sub_chunk_bwd or 0, self.chunk,
                self.num_warps or 0, self.num_warps_bwd or 0, self.splits or 0, self.programs_per_sm,
                self.split_below, self.rows_bwd]

    @staticmethod
    @functools.lru_cache(maxsize=64)
    def from_ints(values: tuple[int, ...]) -> TritonConfig:
        """The inverse of :meth:`to_ints` (given as a tuple)."""
        names = [f.name for f in dataclasses.fields(TritonConfig)]
        optional = {"sub_chunk_bwd", "num_warps", "num_warps_bwd", "splits"}
        return TritonConfig(**{n: (v or None) if n in optional else v for n, v in zip(names, values, strict=True)})


DEFAULT_CONFIG = TritonConfig()


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


def _splits(cfg: TritonConfig, programs: int, n_chunks: int, device: torch.device) -> tuple[int, int]:
    """(number of splits, chunks per split): the sequence in runs of whole chunks, scanned in parallel when
    batch x channel blocks alone leave the GPU idle (a long sequence, a small batch).

    The backward keeps, for each split, the states at the start of every tile of the chunk it is walking: a
    scratch of (splits x chunk / sub_chunk_bwd) states per channel, against L for the full state. Automatic
    splits stay under an eighth of the full state (splits <= n_chunks * sub_chunk_bwd / 8)."""
    wanted = cfg.splits
    if wanted is None:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        if programs >= sms * cfg.split_below:
            return 1, n_chunks
        wanted = -(-sms * cfg.programs_per_sm // max(programs, 1))
        wanted = min(wanted, max(1, n_chunks * cfg.bwd_sub_chunk // 8))
    per = -(-n_chunks // max(1, min(wanted, n_chunks)))
    return -(-n_chunks // per), per


def _flags(cfg: TritonConfig, lanes: int, bn: int, dtype: torch.dtype, D, z, delta_bias, softplus: bool,
           reverse: bool, num_warps: int | None, sub: int) -> dict:
    """The flags both kernels take; ``lanes``: channels across a program's lanes (its channel block goes with it:
    BLOCK_D for the forward, ROWS and LANES_D for the backward)."""
    # Triton's default layout gives the lanes to the channel axis first: one warp per 32 channels keeps
    # the state axis inside each warp (no reductions through shared memory)
    return dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus,
                REVERSE=reverse, FAST_LOG=dtype != torch.float64 and not interpreter_active(), BLOCK_N=bn,
                CHUNK=cfg.chunk, SUB=sub, CT=_tl_compute_dtype(dtype), num_warps=num_warps or max(1, lanes // 32))


def lane_sums(lanes: int, sub: int, num_warps: int, dtype: torch.dtype, bn: int) -> bool:
    """Whether the backward sums dB and dC over its lanes by :func:`_add_channel_sums` (shuffles in inline PTX:
    on a GPU, in float32, for 4-step tiles in one warp with 4 to 32 channel lanes and the states filling the
    rest of the warp) rather than ``tl.sum``. Triton's interpreter runs no PTX: it always takes ``tl.sum``."""
    return (not interpreter_active() and dtype != torch.float64 and sub == 4 and num_warps == 1
            and lanes in (4, 8, 16, 32) and bn >= 32 // lanes)


_LANE_SUMS_VERIFIED: dict[tuple, bool] = {}


def lane_sums_verified(key: tuple, channel_sums) -> bool:
    """Whether the shuffle reduce-scatter (:func:`_add_channel_sums`) may sum dB and dC for the kernel
    specialisation ``key``: checked once per key against ``tl.sum`` on the call's own inputs. ``channel_sums(on)``
    runs the backward with the shuffles on or off and returns its (dB, dC).

    Why: the shuffles pair lanes by index, so they are right only for the layout Triton gives the backward's tiles
    today (the channel lanes on the lane index's low bits). A Triton that laid them out differently would give
    wrong dB and dC on a GPU and nowhere else (CI runs the interpreter, which takes ``tl.sum``). A mismatch
    (relative difference over 1e-3; different summation orders agree to about 1e-6) warns and falls back to
    ``tl.sum`` for that key. While a CUDA graph is being captured nothing is checked: a key not yet checked takes
    ``tl.sum`` for that call."""
    ok = _LANE_SUMS_VERIFIED.get(key)
    if ok is not None:
        return ok
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return False
    shuffled, summed = channel_sums(True), channel_sums(False)
    errors = [float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) if b.numel() else 0.0
              for a, b in zip(shuffled, summed, strict=True)]
    ok = max(errors) <= 1e-3
    if not ok:
        warnings.warn(
            "selective_scan_triton: the backward's shuffle sums of dB and dC disagree with tl.sum on this GPU and "
            f"Triton {triton.__version__} (relative differences {errors[0]:.1e} and {errors[1]:.1e}): this Triton lays "
            "the backward's tiles out differently; falling back to tl.sum (slower, correct). Please report it.",
            RuntimeWarning, stacklevel=3)
    _LANE_SUMS_VERIFIED[key] = ok
    return ok


def _bwd_channel_sums(launch, lane_sums_on: bool, grads: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs ``launch`` (the backward's kernels) into scratch copies of ``grads`` (the accumulated ones zeroed) and
    returns its dB and dC."""
    scratch = [torch.zeros_like(g) for g in grads]
    launch(lane_sums_on, scratch)
    return scratch[3], scratch[4]


def _empty_in_layout(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An empty (batch, dim, L) tensor, channels-contiguous ((batch, L, dim) in memory) when ``like`` is, so that
    the kernels' reads and writes of a step stay coalesced; else contiguous."""
    batch, dim, L = like.shape
    if like.stride(1) == 1 and dim > 1:
        return torch.empty(batch, L, dim, device=like.device, dtype=dtype).transpose(1, 2)
    return torch.empty(batch, dim, L, device=like.device, dtype=dtype)


def _strides(t: torch.Tensor | None, n: int) -> tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0,) * n


def _combine(h, dts, A_t, first, reverse: bool, ct: torch.dtype) -> torch.Tensor:
    batch, n_splits, N, dim = h.shape
    carry = torch.empty_like(h)
    bd, bn = min(32, triton.next_power_of_2(dim)), triton.next_power_of_2(N)
    _combine_kernel[(batch, triton.cdiv(dim, bd))](
        h, dts, A_t, h if first is None else first, carry, dim, N, n_splits,
        REVERSE=reverse, HAS_FIRST=first is not None, BLOCK_D=bd, BLOCK_N=bn, CT=_tl_compute_dtype(ct),
    )
    return carry


def _plan(cfg: TritonConfig, u: torch.Tensor, N: int, groups: int) -> tuple[int, int, int, int]:
    """(forward channel block, number of chunks, number of splits, chunks per split) for a call."""
    batch, dim, L = u.shape
    bd = _channels_per_program(dim, groups, cfg.block_d, triton.next_power_of_2(N))
    n_chunks = max(1, triton.cdiv(L, cfg.chunk))
    n_splits, per_split = _splits(cfg, batch * triton.cdiv(dim, bd), n_chunks, u.device)
    return bd, n_chunks, n_splits, per_split


def _compute_dtype(u: torch.Tensor) -> torch.dtype:
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _forward(u, delta, A_t, B, C, D, z, delta_bias, softplus: bool, reverse: bool, cfg: TritonConfig,
             out_add: torch.Tensor | None = None, out_scale: float = 1.0):
    """The forward kernels: ``(out, ckpt, dts)``; ``ckpt`` (batch, n_chunks, N, dim) holds the state after every
    chunk (the last entry is the final state), ``dts`` (batch, n_splits, dim) each split's summed dt, or None
    when the sequence is not split. ``A_t`` is A transposed, (N, dim) contiguous (the states' layout: contiguous
    along the lane axis); B, C are (batch, groups, N, L). ``out`` is ``out_scale`` times the scan, plus
    ``out_add`` (u's shape) when given."""
    batch, dim, L = u.shape
    N = A_t.shape[0]
    ct = _compute_dtype(u)
    bn = triton.next_power_of_2(N)
    bd, n_chunks, n_splits, per_split = _plan(cfg, u, N, B.shape[1])
    n_blocks = triton.cdiv(dim, bd)
    out = _empty_in_layout(u, u.dtype)
    alloc = torch.empty if L > 0 else torch.zeros  # the kernel writes every element
    ckpt = alloc((batch, n_chunks, N, dim), device=u.device, dtype=ct)
    dts = None
    if L > 0:
        flags = dict(_flags(cfg, bd, bn, u.dtype, D, z, delta_bias, softplus, reverse, cfg.num_warps,
                            cfg.sub_chunk), BLOCK_D=bd)
        args = [u, delta, A_t, B, C, u if D is None else D, u if z is None else z,
                u if delta_bias is None else delta_bias, out, out if out_add is None else out_add, ckpt]
        sizes = [dim, L, N, dim // B.shape[1], n_chunks, per_split, n_splits, float(out_scale), *u.stride(),
                 *delta.stride(), *_strides(z, 3), *out.stride(), *_strides(out_add, 3), *B.stride(), *C.stride()]
        flags["HAS_ADD"] = out_add is not None
        init = None
        if n_splits > 1:  # each split from zero, then the true state entering each split
            local = torch.empty(batch, n_splits, N, dim, device=u.device, dtype=ct)
            dts = torch.empty(batch, n_splits, dim, device=u.device, dtype=ct)
            _fwd_kernel[(batch, n_blocks, n_splits)](*args, ckpt, local, dts, *sizes, LOCAL=True,
                                                     HAS_INIT=False, **flags)
            init = _combine(local, dts, A_t, None, False, ct)
        _fwd_kernel[(batch, n_blocks, n_splits)](*args, ckpt if init is None else init, ckpt, ckpt, *sizes,
                                                 LOCAL=False, HAS_INIT=init is not None, **flags)
    return out, ckpt, dts


def _accumulator_sizes(batch: int, groups: int, L: int, N: int, dim: int, has_D: bool, has_bias: bool) -> list[int]:
    """Elements of dB, dC, dA_t, dD and d(delta_bias) in the backward's flat accumulator, each rounded up to a
    multiple of 4 (16 bytes of float32, so every part starts aligned for the kernels' vector atomics)."""
    n_bc = batch * groups * L * N
    return [-(-n // 4) * 4 for n in (n_bc, n_bc, N * dim, dim if has_D else 0, dim if has_bias else 0)]


def split_accumulators(acc: torch.Tensor, batch: int, groups: int, L: int, N: int, dim: int, has_D: bool,
                       has_bias: bool):
    """Views of the backward's flat accumulator (see :func:`_backward_flat`): dB and dC as (batch, groups, L, N),
    dA_t (N, dim), dD and d(delta_bias) (dim,) or None, all in the compute dtype."""
    dB, dC, dA_t, dD, dbias = torch.split(acc, _accumulator_sizes(batch, groups, L, N, dim, has_D, has_bias))
    n_bc = batch * groups * L * N
    return (dB[:n_bc].view(batch, groups, L, N), dC[:n_bc].view(batch, groups, L, N), dA_t[:N * dim].view(N, dim),
            dD[:dim] if has_D else None, dbias[:dim] if has_bias else None)


def _backward(dout, dlast, u, delta, A_t, B, C, D, z, delta_bias, ckpt, dts, softplus: bool, reverse: bool,
              cfg: TritonConfig, out_scale: float = 1.0):
    """The backward kernels: ``(du, ddelta, dA_t, dB, dC, dD, dz, d_delta_bias)``, None for absent arguments
    (``dA_t`` (N, dim), like ``A_t``). ``dlast``: the gradient of the final state as (batch, N, dim), or None;
    ``ckpt``, ``dts``: from :func:`_forward`; ``out_scale``: the forward's (``dout`` is the output's gradient)."""
    du, ddelta, dz, acc = _backward_flat(dout, dlast, u, delta, A_t, B, C, D, z, delta_bias, ckpt, dts, softplus,
                                         reverse, cfg, out_scale)
    dA_t, dB, dC, dD, dbias = accumulated_gradients(acc, u, A_t, B, C, D, delta_bias)
    return du, ddelta, dA_t, dB, dC, dD, dz, dbias


def accumulated_gradients(acc: torch.Tensor, u, A_t, B, C, D, delta_bias):
    """``(dA_t, dB, dC, dD, d_delta_bias)`` from the backward's flat accumulator, each in its argument's dtype (None
    for an absent argument); dB and dC as B's and C's (batch, groups, N, L), transposed views of (batch, groups, L,
    N). Under ``torch.compile`` this runs in the traced graph, so the casts fuse into the gradients' readers."""
    batch, dim, L = u.shape
    dB, dC, dA_t, dD, dbias = split_accumulators(acc, batch, B.shape[1], L, A_t.shape[0], dim, D is not None,
                                                 delta_bias is not None)
    return (dA_t.to(A_t.dtype), dB.transpose(2, 3).to(B.dtype), dC.transpose(2, 3).to(C.dtype),
            dD.to(D.dtype) if D is not None else None,
            dbias.to(delta_bias.dtype) if delta_bias is not None else None)


def _backward_flat(dout, dlast, u, delta, A_t, B, C, D, z, delta_bias, ckpt, dts, softplus: bool, reverse: bool,
                   cfg: TritonConfig, out_scale: float = 1.0):
    """The backward kernels (arguments as :func:`_backward`): ``(du, ddelta, dz or None, acc)``, where ``acc`` is
    one flat buffer of the compute dtype holding everything summed over programs by atomic adds (dB, dC, dA_t, dD,
    d(delta_bias); :func:`split_accumulators` views it): one zero fill a call instead of five, and under
    ``torch.compile`` dB's and dC's casts to B's dtype fuse into the kernels that read them."""
    batch, dim, L = u.shape
    N = A_t.shape[0]
    groups = B.shape[1]
    ct = _compute_dtype(u)
    _, n_chunks, n_splits, per_split = _plan(cfg, u, N, groups)
    bn = triton.next_power_of_2(N)
    bd = _channels_per_program(dim, groups, cfg.block_d_bwd, bn)
    n_blocks = triton.cdiv(dim, bd)
    dev = u.device
    if dout is None:
        dout = torch.zeros_like(u)

    def grad_like(dtype):  # in u's layout; the kernel writes every element when L > 0
        g = _empty_in_layout(u, dtype)
        return g if L > 0 else g.zero_()

    du, ddelta = grad_like(u.dtype), grad_like(delta.dtype)
    dz = grad_like(z.dtype) if z is not None else None
    # summed over programs by atomic adds, in one zeroed buffer
    acc = torch.zeros(sum(_accumulator_sizes(batch, groups, L, N, dim, D is not None, delta_bias is not None)),
                      device=dev, dtype=ct)
    dB, dC, dA_t, dD, dbias = split_accumulators(acc, batch, groups, L, N, dim, D is not None,
                                                 delta_bias is not None)
    if L > 0:
        sub = cfg.bwd_sub_chunk
        rows = min(cfg.rows_bwd, bd)  # the program's bd channels as rows of lanes
        flags = _flags(cfg, bd // rows, bn, u.dtype, D, z, delta_bias, softplus, reverse, cfg.num_warps_bwd, sub)
        flags.update(ROWS=rows, LANES_D=bd // rows,
                     LANE_SUMS=lane_sums(bd // rows, sub, flags["num_warps"], u.dtype, bn))
        scratch = torch.empty(batch * n_blocks * n_splits * (cfg.chunk // sub) * bd * bn, device=dev, dtype=ct)
        grads = [du, ddelta, du if dz is None else dz, dB, dC, dA_t, dA_t if dD is None else dD,
                 dA_t if dbias is None else dbias]
        sizes = [dim, L, N, dim // groups, groups, n_chunks, per_split, n_splits, n_blocks, float(out_scale),
                 *u.stride(), *delta.stride(), *_strides(z, 3), *dout.stride(), *du.stride(),
                 *B.stride(), *C.stride()]
        head = [u, delta, A_t, B, C, u if D is None else D, u if z is None else z,
                u if delta_bias is None else delta_bias, dout, ckpt]
        first = dlast.unsqueeze(1) if dlast is not None else None

        def launch(lane_sums_on: bool, grads: list) -> None:
            run_flags = dict(flags, LANE_SUMS=lane_sums_on)
            carry = first
            if n_splits > 1:  # each split's adjoint from zero, then the true carry entering each split
                local = torch.empty(batch, n_splits, N, dim, device=dev, dtype=ct)
                _bwd_kernel[(batch, n_blocks, n_splits)](*head, local, scratch, *grads, *sizes, LOCAL=True,
                                                         HAS_CARRY=False, **run_flags)
                carry = _combine(local, dts, A_t, dlast, True, ct)
            _bwd_kernel[(batch, n_blocks, n_splits)](*head, ckpt if carry is None else carry, scratch, *grads,
                                                     *sizes, LOCAL=False, HAS_CARRY=carry is not None, **run_flags)

        shuffle = flags["LANE_SUMS"]
        if shuffle:  # checked once per kernel specialisation (Triton's: flags, dtypes, sizes that are 1 or 16k)
            key = (dev.index, tuple(sorted(flags.items())), n_splits > 1, dlast is not None,
                   tuple(str(t.dtype) for t in head), tuple((s == 1, s % 16 == 0) for s in sizes if isinstance(s, int)))
            shuffle = lane_sums_verified(key, lambda on: _bwd_channel_sums(launch, on, grads))
        launch(shuffle, grads)
    return du, ddelta, dz, acc


class SelectiveScanTriton(torch.autograd.Function):
    """Autograd function over the forward and backward kernels, for eager mode (under ``torch.compile`` the
    same kernels run as the custom ops of :mod:`.custom_ops`); use :func:`selective_scan_triton`."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, cfg, with_last, out_add,
                out_scale):
        A_t = A.t().contiguous()
        out, ckpt, dts = _forward(u, delta, A_t, B, C, D, z, delta_bias, bool(delta_softplus), bool(reverse), cfg,
                                  out_add, out_scale)
        ctx.save_for_backward(u, delta, A_t, B, C, D, z, delta_bias, ckpt, dts)
        ctx.config = (bool(delta_softplus), bool(reverse), cfg, float(out_scale))
        ctx.set_materialize_grads(False)
        # the final state, (batch, dim, N), only when asked for (a copy per call otherwise thrown away)
        return out, (ckpt[:, -1].transpose(1, 2).contiguous() if with_last else None)

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A_t, B, C, D, z, delta_bias, ckpt, dts = ctx.saved_tensors
        softplus, reverse, cfg, out_scale = ctx.config
        if dlast is not None:
            dlast = dlast.transpose(1, 2).contiguous()  # (batch, N, dim), like the checkpoints
        du, ddelta, dA_t, *rest = _backward(dout, dlast, u, delta, A_t, B, C, D, z, delta_bias, ckpt, dts, softplus,
                                            reverse, cfg, out_scale)
        # out_add's gradient is the output's
        return (du, ddelta, dA_t.t(), *rest, None, None, None, None, dout if ctx.needs_input_grad[12] else None, None)


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
    reverse: bool = False,
    config: TritonConfig | None = None,
    out_scale: float = 1.0,
    out_add: torch.Tensor | None = None,
):
    """Fused Triton selective scan; same signature and results as ``selective_scan_reference``, and the output's
    epilogue of :func:`~mmpretrain.ops.selective_scan.selective_scan` (``out_scale``, ``out_add``) in the kernel.

    Needs CUDA tensors, or CPU tensors with ``TRITON_INTERPRET=1`` set before triton was imported. u, delta, z,
    B and C are read through their strides, copied never: a (batch, L, dim) tensor transposed to (batch, dim, L)
    (channels contiguous, as a linear layer leaves them) is the fastest layout, and the outputs and
    gradients then take it too. ``reverse``: scan from the last position to the first (the result equals
    flipping every sequence input, scanning, and flipping the output back), without any flip.
    ``config``: launch parameters (:class:`TritonConfig`; the default is the one measured fastest).
    Under ``torch.compile`` the kernels run as custom ops (:mod:`.custom_ops`), so a compiled model keeps them.
    """
    if not (u.is_cuda or interpreter_active()):
        raise RuntimeError(
            f"selective_scan backend 'triton' needs CUDA tensors (got {u.device}); use backend='torch' on CPU, "
            "or set TRITON_INTERPRET=1 before triton is imported to run the kernels in Triton's interpreter"
        )
    cfg = config or DEFAULT_CONFIG
    B4 = B.unsqueeze(1) if B.dim() == 3 else B
    C4 = C.unsqueeze(1) if C.dim() == 3 else C
    if B4.shape[1] != C4.shape[1]:
        # the kernels read B and C through one group index: give them the same grouping
        groups = math.lcm(B4.shape[1], C4.shape[1])
        B4 = B4.repeat_interleave(groups // B4.shape[1], dim=1)
        C4 = C4.repeat_interleave(groups // C4.shape[1], dim=1)
    params = [t.contiguous() if t is not None else None for t in (A, D, delta_bias)]
    args = (u, delta, params[0], B4, C4, params[1], z, params[2], bool(delta_softplus), bool(reverse), cfg,
            bool(return_last_state), out_add, float(out_scale))
    if torch.compiler.is_compiling():  # traced by torch.compile: the custom ops (they set the device themselves)
        from .custom_ops import selective_scan_compiled

        out, last_state = selective_scan_compiled(*args)
    else:
        with on_device(u):
            out, last_state = SelectiveScanTriton.apply(*args)
    return (out, last_state) if return_last_state else out
