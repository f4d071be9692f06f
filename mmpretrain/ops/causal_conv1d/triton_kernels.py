"""Fused Triton kernels for the depthwise causal convolution with SiLU, on channels-contiguous sequences.

x is (batch, dim, L) read through its strides (fastest when channels are contiguous, i.e. a transposed
(batch, L, dim) activation, where each step's load of a block of channels is one coalesced read); the output
and dx are written channels-contiguous.

Forward, one program per (batch row, block of steps, block of channels): pre_t = bias + sum_j w_j
x_{t + S (j - (K-1))} (S = 1 causal, S = -1 for ``reverse``), out = silu(pre).
Backward, one program per (batch row, run of steps, block of channels), see :func:`_conv_bwd_kernel`: it
recomputes pre once per step, dpre = dout silu'(pre), dx_s = sum_j w_j dpre_{s + S ((K-1) - j)} one tile later
and dw_j and dbias over its run (added atomically into zeroed outputs), all in registers: each thread holds a
tile's steps for two channels, so the K shifted inputs and dpres are register moves.

Both directions of one x (a bidirectional Mamba block's two convolutions, :func:`causal_conv1d_bidirectional_triton`):
one forward kernel computes both outputs from the same loads; the backward runs the kernel once per direction, the
second adding its dx to the first's (``ACCUMULATE``), so no separate kernel adds the two.

Earlier backwards (Vim-Ti's training shapes, batch 256, L 197, dim 384): one program per (batch row, block of
channels) walking all the steps (0.48 ms a call on an H200: 23 ms of a 150 ms step); one pass that recomputed
pre at the K positions each dx_s needs, K times the exp, division and loads (0.223 ms on an H100); two kernels,
dpre then dx (0.120 + 0.052 ms on an H100; 0.083 + 0.050 ms on an H200 once dpre walked runs of tiles); one
pass writing dpre (float32) to a scratch buffer and reading it back at the K shifts a tile later (0.096 ms
one direction, 0.222 ms both, on an H200).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .._runtime import OPS_SOURCE_KEY, interpreter_active, on_device
from .._tiles import step_of

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _sigmoid(x, CT: tl.constexpr):
    """1 / (1 + e^-x) through exp2 and, in float32, the approximate reciprocal (a rounding error of about
    2^-22): Triton's exp and IEEE division expand to range checks and a Newton refinement, most of the
    backward kernel's instructions. Float64 keeps exp2 and the exact division."""
    e = 1.0 + tl.exp2(-x * LOG2E)
    if CT == tl.float32:  # noqa: SIM300 (CT is the compute dtype, a compile-time argument)
        return tl.fdiv(1.0, e, ieee_rounding=False)
    return 1.0 / e


@triton.jit
def _pre_activation(x_ptr, x_row, t, mask_d, L, s_l, w_ptrs, bias, K: tl.constexpr, SIGN: tl.constexpr,
                    CT: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """bias + sum_j w_j x_{t + SIGN (j - (K-1))} for a (BLOCK_L, BLOCK_D) tile of steps t."""
    acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=CT) + bias[None, :]
    for j in tl.static_range(K):
        ts = t + SIGN * (j - (K - 1))
        m = ((ts >= 0) & (ts < L))[:, None] & mask_d[None, :]
        xv = tl.load(x_ptr + x_row[None, :] + ts[:, None] * s_l, mask=m, other=0.0).to(CT)
        acc += xv * tl.load(w_ptrs + j).to(CT)[None, :]
    return acc


@triton.jit
def _channel_params(w_ptr, b_ptr, offs_d, mask_d, K: tl.constexpr, HAS_BIAS: tl.constexpr, CT: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    """A block of channels' bias (zeros without one) and pointers to their weight rows (weight (dim, K); masked
    channels point at row 0)."""
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_d, mask=mask_d, other=0.0).to(CT)
    else:
        bias = tl.zeros((BLOCK_D,), dtype=CT)
    return bias, tl.where(mask_d, w_ptr + offs_d * K, w_ptr)


@triton.jit
def _conv_out_tile(x_ptr, x_row, t, offs_d, mask_d, L, sx_l, w_ptr, b_ptr, out_ptr, o_ptrs, m, HAS_BIAS: tl.constexpr,
                   SILU: tl.constexpr, K: tl.constexpr, SIGN: tl.constexpr, CT: tl.constexpr, BLOCK_L: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    """One direction's output for a (BLOCK_L, BLOCK_D) tile: act(bias + sum_j w_j x_{t + S (j - (K-1))}), stored."""
    bias, w_ptrs = _channel_params(w_ptr, b_ptr, offs_d, mask_d, K, HAS_BIAS, CT, BLOCK_D)
    pre = _pre_activation(x_ptr, x_row, t, mask_d, L, sx_l, w_ptrs, bias, K, SIGN, CT, BLOCK_L, BLOCK_D)
    if SILU:
        pre = pre * _sigmoid(pre, CT)
    tl.store(out_ptr + o_ptrs, pre.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, b_ptr, out_ptr, w2_ptr, b2_ptr, out2_ptr, dim, L, sx_b, sx_d, sx_l, so_b, so_d,
                     so_l, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, K: tl.constexpr, SIGN: tl.constexpr,
                     BOTH: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, CT: tl.constexpr):
    """Forward, one direction (S = SIGN) or, with BOTH, also the opposite one (weight ``w2``, bias ``b2``, into
    ``out2``, which has out's strides) from the same loaded x (the shifted loads overlap: cache hits)."""
    pid_b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    x_row = pid_b * sx_b + offs_d * sx_d
    o_ptrs = pid_b * so_b + offs_d[None, :] * so_d + t[:, None] * so_l
    m = (t < L)[:, None] & mask_d[None, :]
    _conv_out_tile(x_ptr, x_row, t, offs_d, mask_d, L, sx_l, w_ptr, b_ptr, out_ptr, o_ptrs, m, HAS_BIAS, SILU, K, SIGN,
                   CT, BLOCK_L, BLOCK_D)
    if BOTH:
        _conv_out_tile(x_ptr, x_row, t, offs_d, mask_d, L, sx_l, w2_ptr, b2_ptr, out2_ptr, o_ptrs, m, HAS_BIAS, SILU,
                       K, -SIGN, CT, BLOCK_L, BLOCK_D)


@triton.jit
def _memory_position(p, L, SIGN: tl.constexpr):
    """Scan position p's memory position: p, or L - 1 - p for the reversed convolution (S = -1)."""
    if SIGN == 1:
        return p
    return L - 1 - p


@triton.jit
def _dpre(g, pre, m_t, SILU: tl.constexpr, CT: tl.constexpr):
    """dout silu'(pre) (dout itself without the activation), zero outside the tile's mask."""
    if SILU:
        sig = _sigmoid(pre, CT)
        g = g * sig * (1.0 + pre * (1.0 - sig))
    return tl.where(m_t, g, 0.0)


@triton.jit
def _shifted(lo, hi, steps, k: tl.constexpr, BLOCK_L: tl.constexpr, INTERPRETED: tl.constexpr):
    """The tile whose step s is step s + k of ``lo`` followed by ``hi`` (0 <= k <= BLOCK_L). On a GPU the steps
    live in each thread's registers, so this is register moves the compiler folds away (:func:`step_of`). Triton's
    interpreter runs each of those selects as an array operation; there (INTERPRETED) one gather does the same."""
    if INTERPRETED:
        both = tl.reshape(tl.permute(tl.join(lo, hi), (2, 0, 1)), (2 * BLOCK_L, lo.shape[1]))
        out = tl.gather(both, (steps + k) + tl.zeros(lo.shape, dtype=tl.int32), 0)
    else:
        out = lo
        for s in tl.static_range(BLOCK_L):
            if s + k < BLOCK_L:
                v = step_of(lo, steps, s + k)
            else:
                v = step_of(hi, steps, s + k - BLOCK_L)
            out = tl.where(steps == s, v, out)
    return out


@triton.jit
def _tile_load(ptr, row, p, mask_d, L, s_l, SIGN: tl.constexpr):
    """The (BLOCK_L, BLOCK_D) tile at scan positions p (memory positions p, or L - 1 - p when S = -1), as stored;
    zeros outside [0, L)."""
    m = ((p >= 0) & (p < L))[:, None] & mask_d[None, :]
    return tl.load(ptr + row[None, :] + _memory_position(p, L, SIGN)[:, None] * s_l, mask=m, other=0.0)


@triton.jit
def _dpre_in_registers(x_prev, x_cur, g, p, mask_d, L, w_ptrs, bias, steps, K: tl.constexpr, SILU: tl.constexpr,
                       CT: tl.constexpr, BLOCK_L: tl.constexpr, INTERPRETED: tl.constexpr):
    """dpre = dout silu'(pre) for the tile at scan positions p, pre_s = bias + sum_j w_j x_{s - (K-1) + j}, the
    shifted inputs taken from this tile's and the previous tile's x in registers; zero outside [0, L)."""
    pre = tl.zeros_like(x_cur) + bias[None, :]
    for j in tl.static_range(K):
        w_j = tl.load(w_ptrs + j).to(CT)[None, :]
        pre += _shifted(x_prev, x_cur, steps, BLOCK_L - (K - 1) + j, BLOCK_L, INTERPRETED) * w_j
    m_t = ((p >= 0) & (p < L))[:, None] & mask_d[None, :]
    return _dpre(g, pre, m_t, SILU, CT)


@triton.jit
def _conv_bwd_kernel(x_ptr, w_ptr, b_ptr, dout_ptr, dx_ptr, dw_ptr, db_ptr, dim, L, tiles,
                     sx_b, sx_d, sx_l, sg_b, sg_d, sg_l, so_b, so_d, so_l,
                     HAS_BIAS: tl.constexpr, SILU: tl.constexpr, K: tl.constexpr, SIGN: tl.constexpr,
                     ACCUMULATE: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_K: tl.constexpr, VEC: tl.constexpr, INTERPRETED: tl.constexpr, CT: tl.constexpr):
    """Backward. One program per (batch row, run of ``tiles`` blocks of BLOCK_L steps, block of channels), its
    tiles taken in scan order (memory position t = p, or L - 1 - p when S = -1, at scan position p), everything in
    registers:

    - dpre_p = dout_p silu'(pre_p), pre recomputed from this tile's x and the last K - 1 steps of the previous
      tile's, still in registers;
    - dx_p = sum_i w_{K-1-i} dpre_{p+i}, one tile behind: from the tile's dpre and the next tile's (computed past
      the run's end too, for the K - 1 steps that dx needs);
    - dw_j = sum_p dpre_p x_{p-(K-1)+j} and dbias = sum_p dpre_p, summed over each tile's steps in registers and
      over the run, then added atomically into zeroed ``dw`` (dim, K) and ``db`` (dim,) of the compute dtype.

    The steps are shifted between registers, not through memory: each thread holds VEC channels (VEC contiguous
    channels give the tiles one layout, channels on the lanes and steps in registers; the hint keeps Triton from
    vectorising the loads across steps' lanes instead). Each tile's loads (x, dout and, with ACCUMULATE, the dx it
    adds to) are issued one iteration before they are used. Needs K - 1 <= BLOCK_L.

    ACCUMULATE: add dx to what ``dx`` holds (the other direction's dx, for a bidirectional block's two
    convolutions of one x) instead of overwriting it."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_l = tl.program_id(1)
    offs_d = tl.max_contiguous(tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D), VEC)
    mask_d = offs_d < dim
    bias, w_ptrs = _channel_params(w_ptr, b_ptr, offs_d, mask_d, K, HAS_BIAS, CT, BLOCK_D)
    x_row = pid_b * sx_b + offs_d * sx_d
    g_row = pid_b * sg_b + offs_d * sg_d
    o_row = pid_b * so_b + offs_d * so_d
    steps = tl.arange(0, BLOCK_L)[:, None]
    offs_k = tl.arange(0, BLOCK_K)
    dw = tl.zeros((BLOCK_K, BLOCK_D), dtype=CT)
    db = tl.zeros((BLOCK_D,), dtype=CT)
    p0 = pid_l * tiles * BLOCK_L
    p = p0 + tl.arange(0, BLOCK_L)
    # the tile before the run (for pre's shifted inputs), the run's first tile, and the second's raw loads
    x_prev = _tile_load(x_ptr, x_row, p - BLOCK_L, mask_d, L, sx_l, SIGN).to(CT)
    x_cur = _tile_load(x_ptr, x_row, p, mask_d, L, sx_l, SIGN).to(CT)
    g = _tile_load(dout_ptr, g_row, p, mask_d, L, sg_l, SIGN).to(CT)
    x_n = _tile_load(x_ptr, x_row, p + BLOCK_L, mask_d, L, sx_l, SIGN)
    g_n = _tile_load(dout_ptr, g_row, p + BLOCK_L, mask_d, L, sg_l, SIGN)
    acc_n = tl.zeros((BLOCK_L, BLOCK_D), dtype=dx_ptr.dtype.element_ty)
    if ACCUMULATE:
        acc_n = _tile_load(dx_ptr, o_row, p, mask_d, L, so_l, SIGN)
    dpre = _dpre_in_registers(x_prev, x_cur, g, p, mask_d, L, w_ptrs, bias, steps, K, SILU, CT, BLOCK_L,
                              INTERPRETED)
    for i in range(tiles):
        p = p0 + i * BLOCK_L + tl.arange(0, BLOCK_L)
        # this tile's weight and bias gradients, summed over its steps in registers
        db += tl.sum(dpre, axis=0)
        for j in tl.static_range(K):
            x_j = _shifted(x_prev, x_cur, steps, BLOCK_L - (K - 1) + j, BLOCK_L, INTERPRETED)
            dw += tl.where((offs_k == j)[:, None], tl.sum(dpre * x_j, axis=0)[None, :], 0.0)
        # the next tile's dpre (from the loads issued last iteration), and the loads for the one after it
        x_next, g_next, acc = x_n.to(CT), g_n.to(CT), acc_n
        x_n = _tile_load(x_ptr, x_row, p + 2 * BLOCK_L, mask_d, L, sx_l, SIGN)
        g_n = _tile_load(dout_ptr, g_row, p + 2 * BLOCK_L, mask_d, L, sg_l, SIGN)
        if ACCUMULATE:
            acc_n = _tile_load(dx_ptr, o_row, p + BLOCK_L, mask_d, L, so_l, SIGN)
        dpre_next = _dpre_in_registers(x_cur, x_next, g_next, p + BLOCK_L, mask_d, L, w_ptrs, bias, steps, K, SILU,
                                       CT, BLOCK_L, INTERPRETED)
        # this tile's dx from its dpre and the next one's
        dx = tl.zeros_like(dpre)
        for k in tl.static_range(K):
            w_k = tl.load(w_ptrs + (K - 1 - k)).to(CT)[None, :]
            dx += _shifted(dpre, dpre_next, steps, k, BLOCK_L, INTERPRETED) * w_k
        if ACCUMULATE:
            dx += acc.to(CT)
        m = ((p >= 0) & (p < L))[:, None] & mask_d[None, :]
        tl.store(dx_ptr + o_row[None, :] + _memory_position(p, L, SIGN)[:, None] * so_l,
                 dx.to(dx_ptr.dtype.element_ty), mask=m)
        x_prev, x_cur, dpre = x_cur, x_next, dpre_next
    if HAS_BIAS:
        tl.atomic_add(db_ptr + offs_d, db, mask=mask_d, sem="relaxed")
    tl.atomic_add(dw_ptr + offs_d[None, :] * K + offs_k[:, None], dw, mask=(offs_k < K)[:, None] & mask_d[None, :],
                  sem="relaxed")


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # Triton's interpreter
    return torch.cuda.get_device_properties(device).multi_processor_count


def _ct(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _empty_channels_last(batch: int, dim: int, L: int, like: torch.Tensor) -> torch.Tensor:
    return torch.empty(batch, L, dim, device=like.device, dtype=like.dtype).transpose(1, 2)


# (steps, channels, warps) per program. Forward: the fastest of those benchmarks/causal_conv1d.py tried on an
# H200 (2026-11-21; Vim-Ti at 224, batch 256, dim 384, L 197: 0.046 ms, 16:64:4 took 0.096; floor 0.019).
# Backward (tile steps, channels, warps) and steps per program: the fastest of 8:64:1, 8:128:1, 8:128:2, 4:64:1,
# 4:128:2 and 16:64:1 with runs of 128, 256 and 512 steps (H200, profiler kernel times of both directions of a
# bidirectional mixer's backward, Vim-Ti, 2026-11-22, eleventh session): 4:64:1 with runs of 256 steps at 224
# (batch 256, L 197: 0.124 ms; 8:64:1 0.138, 8:128:2 0.147 with runs of 128) and of 128 steps at 1248 (batch 16,
# L 6085: 0.258 ms; 256 steps 0.300, 8:128:2 0.247); the kernel with the dpre scratch took 0.222 and 0.438 ms. Two
# channels per thread (32-bit loads) matter: with one (8:32:1, 16-bit loads) the kernel took 0.93 ms.
FWD_BLOCKS = (64, 64, 4)
BWD_BLOCKS = (4, 64, 1)
BWD_STEPS = 256
# runs half as long when batch x channel blocks leave fewer programs than this per multiprocessor
BWD_PROGRAMS_PER_SM = 4
# Both directions of one x in one forward kernel (a bidirectional mixer's two convolutions): the fastest of 7 shapes
# on an H200 (2026-11-22, Vim-Ti, triton.testing.do_bench): 0.060 ms at 224 and 0.099 ms at 1248, against 0.086 and
# 0.128 ms for two single-direction calls (at 224 a repeat gave 0.098 against 0.086: do_bench there is mostly host
# time). Profiler kernel time in the graphed training step at 224: 0.056 ms a layer, against 2 x 0.040 ms before.
BIDIR_FWD_BLOCKS = (16, 64, 2)


def _conv_forward(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, silu: bool, reverse: bool,
                  w2: torch.Tensor | None = None, bias2: torch.Tensor | None = None):
    """The forward kernel: x (batch, dim, L), w (dim, K) contiguous -> out, channels-contiguous. With ``w2``:
    ``(out, out2)``, out2 the opposite direction's convolution (weight w2, bias bias2, which must be given
    exactly when ``bias`` is) of the same x, from one kernel."""
    batch, dim, L = x.shape
    both = w2 is not None
    out = _empty_channels_last(batch, dim, L, x)
    out2 = _empty_channels_last(batch, dim, L, x) if both else out
    block_l, block_d, warps = BIDIR_FWD_BLOCKS if both else FWD_BLOCKS
    grid = (batch, triton.cdiv(L, block_l), triton.cdiv(dim, block_d))
    b = w if bias is None else bias
    _conv_fwd_kernel[grid](x, w, b, out, w2 if both else w, b if bias2 is None else bias2, out2, dim, L,
                           *x.stride(), *out.stride(), HAS_BIAS=bias is not None, SILU=silu, K=w.shape[1],
                           SIGN=-1 if reverse else 1, BOTH=both, BLOCK_L=block_l, BLOCK_D=block_d, CT=_ct(x.dtype),
                           num_warps=warps)
    return (out, out2) if both else out


def _conv_backward(dout: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, silu: bool,
                   reverse: bool, dx: torch.Tensor | None = None):
    """The backward kernel: ``(dx, dw, dbias or None)``; dx channels-contiguous, dw (dim, K). With ``dx`` given
    (channels-contiguous, x's shape and dtype), this dx is added to it, in place."""
    batch, dim, L = x.shape
    K = w.shape[1]
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    accumulate = dx is not None
    if dx is None:
        dx = _empty_channels_last(batch, dim, L, x)
    block_l, block_d, warps = BWD_BLOCKS
    block_l = max(block_l, triton.next_power_of_2(K - 1))  # a tile's shifts reach into one neighbouring tile only
    if interpreter_active():
        block_l = max(block_l, 16)  # the interpreter's cost is per tile, not per element: fewer, larger tiles
    steps = BWD_STEPS
    if batch * triton.cdiv(dim, block_d) < BWD_PROGRAMS_PER_SM * _multiprocessors(x.device):
        steps //= 2  # a long sequence at a small batch: more, shorter runs keep the GPU busy
    tiles = max(1, min(triton.cdiv(L, block_l), steps // block_l))
    grid = (batch, triton.cdiv(L, block_l * tiles), triton.cdiv(dim, block_d))
    dw = torch.zeros(dim, K, device=x.device, dtype=ct)  # summed over programs by atomic adds
    db = torch.zeros(dim, device=x.device, dtype=ct) if bias is not None else dw
    _conv_bwd_kernel[grid](x, w, w if bias is None else bias, dout, dx, dw, db, dim, L, tiles,
                           *x.stride(), *dout.stride(), *dx.stride(), HAS_BIAS=bias is not None, SILU=silu, K=K,
                           SIGN=-1 if reverse else 1, ACCUMULATE=accumulate, BLOCK_L=block_l, BLOCK_D=block_d,
                           BLOCK_K=triton.next_power_of_2(K), VEC=max(1, block_d // (32 * warps)),
                           INTERPRETED=interpreter_active(), CT=_ct(x.dtype),
                           num_warps=warps)
    return dx, dw.to(w.dtype), (db.to(bias.dtype) if bias is not None else None)


def _conv_backward_both(dout: torch.Tensor, dout2: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                        bias: torch.Tensor | None, w2: torch.Tensor, bias2: torch.Tensor | None, silu: bool):
    """The backward of :func:`_conv_forward` with ``w2``: ``(dx, dw, dbias, dw2, dbias2)``, dx the sum of both
    directions'. Two backward kernels, the second adding its dx to the first's. One kernel for both directions
    (each tile's dpre for both, dx from both, a halo tile on each side; tried with the dpre scratch, before the
    backward kept its tiles in registers) was no faster than two kernels and the add
    of their dx (H200, 2026-11-22, Vim-Ti shapes, triton.testing.do_bench, the fastest of 7 block shapes: 0.268
    against 0.265 ms at batch 256, L 197; 0.541 against 0.500 ms at batch 16, L 6085); this removes the add."""
    dx, dw, db = _conv_backward(dout, x, w, bias, silu, False)
    return (dx, dw, db, *_conv_backward(dout2, x, w2, bias2, silu, True, dx)[1:])


class CausalConv1dTriton(torch.autograd.Function):
    """Autograd function over the kernels, for eager mode (under ``torch.compile``: the custom ops below)."""

    @staticmethod
    def forward(ctx, x, weight, bias, silu, reverse):
        w = weight.contiguous()
        ctx.save_for_backward(x, w, bias)
        ctx.flags = (silu, reverse)
        return _conv_forward(x, w, bias, silu, reverse)

    @staticmethod
    def backward(ctx, dout):
        x, w, bias = ctx.saved_tensors
        return (*_conv_backward(dout, x, w, bias, *ctx.flags), None, None)


class CausalConv1dBidirTriton(torch.autograd.Function):
    """Both directions of one x (causal with ``weight``, anti-causal with ``weight2``): one forward kernel, two
    backward kernels writing one dx; for eager mode (under ``torch.compile``: the custom ops for both directions
    below)."""

    @staticmethod
    def forward(ctx, x, weight, bias, weight2, bias2, silu):
        w, w2 = weight.contiguous(), weight2.contiguous()
        ctx.save_for_backward(x, w, bias, w2, bias2)
        ctx.silu = silu
        return _conv_forward(x, w, bias, silu, False, w2, bias2)

    @staticmethod
    def backward(ctx, dout, dout2):
        x, w, bias, w2, bias2 = ctx.saved_tensors  # (unused outputs' gradients come as zeros: materialised)
        return (*_conv_backward_both(dout, dout2, x, w, bias, w2, bias2, ctx.silu), None)


# Under torch.compile the kernels run as custom ops, so that a compiled model traces around them (Inductor
# fuses the work between them; CUDA graphs can capture them). Eager mode keeps the autograd functions above: a
# custom op's dispatch costs the host several times more per call (see selective_scan/custom_ops.py).
@torch.library.custom_op("mmpretrain::causal_conv1d_fwd", mutates_args=())
def causal_conv1d_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool,
                      reverse: bool, source_key: int) -> torch.Tensor:
    """``source_key``: :data:`.._runtime.OPS_SOURCE_KEY` (unused here; it keys compiled graphs to the ops' code)."""
    with on_device(x):
        return _conv_forward(x, weight.contiguous(), bias, silu, reverse)


@causal_conv1d_fwd.register_fake
def _(x, weight, bias, silu, reverse, source_key):
    return _empty_channels_last(*x.shape, x)


def _grad_or_empty(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A custom op returns tensors only: an absent bias's gradient crosses it as an empty tensor."""
    return grad if grad is not None else like.new_empty(0)


@torch.library.custom_op("mmpretrain::causal_conv1d_bwd", mutates_args=())
def causal_conv1d_bwd(dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      silu: bool, reverse: bool, source_key: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dweight, dbias)``; dbias is empty without a bias."""
    with on_device(x):
        dx, dw, db = _conv_backward(dout, x, weight.contiguous(), bias, silu, reverse)
    return dx, dw, _grad_or_empty(db, x)


def _fake_weight_grads(x, weight, bias):
    return weight.new_empty(weight.shape), (bias.new_empty(bias.shape) if bias is not None else x.new_empty(0))


@causal_conv1d_bwd.register_fake
def _(dout, x, weight, bias, silu, reverse, source_key):
    return _empty_channels_last(*x.shape, x), *_fake_weight_grads(x, weight, bias)


def _conv_setup_context(ctx, inputs, output):
    x, weight, bias, silu, reverse, source_key = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.flags = (silu, reverse, source_key)


def _conv_backward_rule(ctx, dout):
    x, weight, bias = ctx.saved_tensors
    dx, dw, db = causal_conv1d_bwd(dout, x, weight, bias, *ctx.flags)
    return dx, dw, (db if bias is not None else None), None, None, None


causal_conv1d_fwd.register_autograd(_conv_backward_rule, setup_context=_conv_setup_context)


@torch.library.custom_op("mmpretrain::causal_conv1d_bidir_fwd", mutates_args=())
def causal_conv1d_bidir_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, weight2: torch.Tensor,
                            bias2: torch.Tensor | None, silu: bool, source_key: int) -> tuple[torch.Tensor, torch.Tensor]:
    with on_device(x):
        return _conv_forward(x, weight.contiguous(), bias, silu, False, weight2.contiguous(), bias2)


@causal_conv1d_bidir_fwd.register_fake
def _(x, weight, bias, weight2, bias2, silu, source_key):
    return _empty_channels_last(*x.shape, x), _empty_channels_last(*x.shape, x)


@torch.library.custom_op("mmpretrain::causal_conv1d_bidir_bwd", mutates_args=())
def causal_conv1d_bidir_bwd(dout: torch.Tensor, dout2: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                            bias: torch.Tensor | None, weight2: torch.Tensor, bias2: torch.Tensor | None,
                            silu: bool, source_key: int
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dweight, dbias, dweight2, dbias2)``; a bias's gradient is empty without it."""
    with on_device(x):
        dx, dw, db, dw2, db2 = _conv_backward_both(dout, dout2, x, weight.contiguous(), bias, weight2.contiguous(),
                                                   bias2, silu)
    return dx, dw, _grad_or_empty(db, x), dw2, _grad_or_empty(db2, x)


@causal_conv1d_bidir_bwd.register_fake
def _(dout, dout2, x, weight, bias, weight2, bias2, silu, source_key):
    return _empty_channels_last(*x.shape, x), *_fake_weight_grads(x, weight, bias), *_fake_weight_grads(x, weight2,
                                                                                                           bias2)


def _bidir_setup_context(ctx, inputs, output):
    x, weight, bias, weight2, bias2, silu, source_key = inputs
    ctx.save_for_backward(x, weight, bias, weight2, bias2)
    ctx.flags = (silu, source_key)


def _bidir_backward_rule(ctx, dout, dout2):
    x, weight, bias, weight2, bias2 = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(dout2)
    if dout2 is None:
        dout2 = torch.zeros_like(dout)
    dx, dw, db, dw2, db2 = causal_conv1d_bidir_bwd(dout, dout2, x, weight, bias, weight2, bias2, *ctx.flags)
    return dx, dw, (db if bias is not None else None), dw2, (db2 if bias2 is not None else None), None, None


causal_conv1d_bidir_fwd.register_autograd(_bidir_backward_rule, setup_context=_bidir_setup_context)


def _check_activation(activation: str | None) -> None:
    if activation not in ("silu", None):
        raise ValueError(f"causal_conv1d: activation must be 'silu' or None, got {activation!r}")


def causal_conv1d_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                         activation: str | None = "silu", reverse: bool = False) -> torch.Tensor:
    """Fused Triton depthwise causal convolution (+ SiLU); same results as ``causal_conv1d_reference``.
    The output is (batch, dim, L), channels-contiguous in memory. Under ``torch.compile``: the custom ops."""
    _check_activation(activation)
    if torch.compiler.is_compiling():
        return causal_conv1d_fwd(x, weight, bias, activation == "silu", bool(reverse), OPS_SOURCE_KEY)
    return CausalConv1dTriton.apply(x, weight, bias, activation == "silu", bool(reverse))


def causal_conv1d_bidirectional_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                       weight_b: torch.Tensor, bias_b: torch.Tensor | None,
                                       activation: str | None = "silu") -> tuple[torch.Tensor, torch.Tensor]:
    """Both directions of :func:`causal_conv1d_triton` over one x: ``(causal with weight, bias; reverse with
    weight_b, bias_b)``. The forward is one kernel reading x once for both; the backward's second kernel adds its
    dx to the first's (no separate add). Biases: both or neither."""
    _check_activation(activation)
    if (bias is None) != (bias_b is None):
        raise ValueError("causal_conv1d_bidirectional: give both biases or neither (bias and bias_b)")
    if torch.compiler.is_compiling():
        return causal_conv1d_bidir_fwd(x, weight, bias, weight_b, bias_b, activation == "silu", OPS_SOURCE_KEY)
    return CausalConv1dBidirTriton.apply(x, weight, bias, weight_b, bias_b, activation == "silu")
