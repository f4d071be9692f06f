"""Fused Triton kernels for the depthwise causal convolution with SiLU, on channels-contiguous sequences.

x is (batch, dim, L) read through its strides (fastest when channels are contiguous, i.e. a transposed
(batch, L, dim) activation, where each step's load of a block of channels is one coalesced read); the output
and dx are written channels-contiguous. One program per (batch row, block of steps, block of channels).

Forward: pre_t = bias + sum_j w_j x_{t + S (j - (K-1))} (S = 1 causal, S = -1 for ``reverse``), out = silu(pre).
Backward, one kernel over the same grid: pre is recomputed at the K positions each dx_s needs (the shifted
loads hit the cache), dpre = dout silu'(pre), dx_s = sum_j w_j dpre_{s + S ((K-1) - j)}; dw_j and dbias are
summed over the program's steps and stored per (batch row, block of steps), then summed on the host (no
atomics: thousands of programs adding into dim x K numbers serialise on them).

An earlier backward gave each (batch row, block of channels) one program that walked all the steps: at Vim-Ti's
training shapes (batch 256, L 197, dim 384) it took 0.48 ms a call on an H200, 23 ms of a 150 ms step (48 calls),
against a floor of about 0.03 ms (x and dout read, dx written).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


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
def _conv_fwd_kernel(x_ptr, w_ptr, b_ptr, out_ptr, dim, L, sx_b, sx_d, sx_l, so_b, so_d, so_l,
                     HAS_BIAS: tl.constexpr, SILU: tl.constexpr, K: tl.constexpr, SIGN: tl.constexpr,
                     BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, CT: tl.constexpr):
    pid_b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    bias, w_ptrs = _channel_params(w_ptr, b_ptr, offs_d, mask_d, K, HAS_BIAS, CT, BLOCK_D)
    x_row = pid_b * sx_b + offs_d * sx_d
    pre = _pre_activation(x_ptr, x_row, t, mask_d, L, sx_l, w_ptrs, bias, K, SIGN, CT, BLOCK_L, BLOCK_D)
    if SILU:
        pre = pre / (1.0 + tl.exp(-pre))
    m = (t < L)[:, None] & mask_d[None, :]
    tl.store(out_ptr + pid_b * so_b + offs_d[None, :] * so_d + t[:, None] * so_l, pre.to(out_ptr.dtype.element_ty),
             mask=m)


@triton.jit
def _conv_bwd_kernel(x_ptr, w_ptr, b_ptr, dout_ptr, dx_ptr, dw_ptr, db_ptr, dim, L,
                     sx_b, sx_d, sx_l, sg_b, sg_d, sg_l, so_b, so_d, so_l,
                     HAS_BIAS: tl.constexpr, SILU: tl.constexpr, K: tl.constexpr, SIGN: tl.constexpr,
                     BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, CT: tl.constexpr):
    """One program per (batch row, block of steps, block of channels): dx of its steps, and the weight and
    bias gradients summed over its steps, stored per (batch row, block of steps) for the host to sum."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_l = tl.program_id(1)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    bias, w_ptrs = _channel_params(w_ptr, b_ptr, offs_d, mask_d, K, HAS_BIAS, CT, BLOCK_D)
    x_row = pid_b * sx_b + offs_d * sx_d
    g_row = pid_b * sg_b + offs_d * sg_d
    s = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_k = tl.arange(0, BLOCK_K)
    dw = tl.zeros((BLOCK_K, BLOCK_D), dtype=CT)  # row j: d loss / d weight[:, j]
    db = tl.zeros((BLOCK_D,), dtype=CT)
    dx = tl.zeros((BLOCK_L, BLOCK_D), dtype=CT)
    for i in tl.static_range(K):
        # the output step t = s + SIGN i reads x_s through weight j = K-1-i
        t = s + SIGN * i
        m_t = ((t >= 0) & (t < L))[:, None] & mask_d[None, :]
        pre = _pre_activation(x_ptr, x_row, t, mask_d, L, sx_l, w_ptrs, bias, K, SIGN, CT, BLOCK_L, BLOCK_D)
        dpre = tl.load(dout_ptr + g_row[None, :] + t[:, None] * sg_l, mask=m_t, other=0.0).to(CT)
        if SILU:
            sig = 1.0 / (1.0 + tl.exp(-pre))
            dpre = dpre * sig * (1.0 + pre * (1.0 - sig))
        dpre = tl.where(m_t, dpre, 0.0)
        dx += dpre * tl.load(w_ptrs + (K - 1 - i)).to(CT)[None, :]
        if i == 0:  # each of the program's output steps once: their weight and bias gradients
            for j in tl.static_range(K):
                ts = s + SIGN * (j - (K - 1))
                m = ((ts >= 0) & (ts < L))[:, None] & mask_d[None, :]
                xv = tl.load(x_ptr + x_row[None, :] + ts[:, None] * sx_l, mask=m, other=0.0).to(CT)
                dw += tl.where((offs_k == j)[:, None], tl.sum(dpre * xv, axis=0)[None, :], 0.0)
            db = tl.sum(dpre, axis=0)
    m = (s < L)[:, None] & mask_d[None, :]
    tl.store(dx_ptr + pid_b * so_b + offs_d[None, :] * so_d + s[:, None] * so_l, dx.to(dx_ptr.dtype.element_ty),
             mask=m)
    part = pid_b * tl.num_programs(1) + pid_l
    tl.store(db_ptr + part * dim + offs_d, db, mask=mask_d)
    tl.store(dw_ptr + (part * dim + offs_d[None, :]) * K + offs_k[:, None], dw,
             mask=(offs_k < K)[:, None] & mask_d[None, :])


def _ct(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _empty_channels_last(batch: int, dim: int, L: int, like: torch.Tensor) -> torch.Tensor:
    return torch.empty(batch, L, dim, device=like.device, dtype=like.dtype).transpose(1, 2)


# (steps, channels, warps) per program, forward and backward: the fastest of those benchmarks/causal_conv1d.py
# tried on an H200 (2026-11-21). Vim-Ti at 224 (batch 256, dim 384, L 197): forward 0.046 ms (16:64:4 took 0.096;
# floor 0.019), backward 0.245 ms (32:64:4 took 0.40); at 1248 (batch 16, L 6085): 0.068 and 0.41 ms.
FWD_BLOCKS = (64, 64, 4)
BWD_BLOCKS = (32, 32, 2)


class CausalConv1dTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, silu, reverse):
        batch, dim, L = x.shape
        K = weight.shape[1]
        w = weight.contiguous()
        out = _empty_channels_last(batch, dim, L, x)
        block_l, block_d, warps = FWD_BLOCKS
        grid = (batch, triton.cdiv(L, block_l), triton.cdiv(dim, block_d))
        _conv_fwd_kernel[grid](x, w, w if bias is None else bias, out, dim, L, *x.stride(), *out.stride(),
                               HAS_BIAS=bias is not None, SILU=silu, K=K, SIGN=-1 if reverse else 1,
                               BLOCK_L=block_l, BLOCK_D=block_d, CT=_ct(x.dtype), num_warps=warps)
        ctx.save_for_backward(x, w, bias)
        ctx.flags = (silu, reverse)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, w, bias = ctx.saved_tensors
        silu, reverse = ctx.flags
        batch, dim, L = x.shape
        K = w.shape[1]
        ct = torch.float64 if x.dtype == torch.float64 else torch.float32
        dx = _empty_channels_last(batch, dim, L, x)
        block_l, block_d, warps = BWD_BLOCKS
        grid = (batch, triton.cdiv(L, block_l), triton.cdiv(dim, block_d))
        parts = batch * grid[1]  # per (batch row, block of steps), summed below
        dw = torch.empty(parts, dim, K, device=x.device, dtype=ct)
        db = torch.empty(parts, dim, device=x.device, dtype=ct)
        _conv_bwd_kernel[grid](x, w, w if bias is None else bias, dout, dx, dw, db, dim, L,
                               *x.stride(), *dout.stride(), *dx.stride(),
                               HAS_BIAS=bias is not None, SILU=silu, K=K, SIGN=-1 if reverse else 1,
                               BLOCK_L=block_l, BLOCK_D=block_d, BLOCK_K=triton.next_power_of_2(K), CT=_ct(x.dtype),
                               num_warps=warps)
        return dx, dw.sum(0).to(w.dtype), (db.sum(0).to(bias.dtype) if bias is not None else None), None, None


def causal_conv1d_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                         activation: str | None = "silu", reverse: bool = False) -> torch.Tensor:
    """Fused Triton depthwise causal convolution (+ SiLU); same results as ``causal_conv1d_reference``.
    The output is (batch, dim, L), channels-contiguous in memory."""
    if activation not in ("silu", None):
        raise ValueError(f"causal_conv1d: activation must be 'silu' or None, got {activation!r}")
    return CausalConv1dTriton.apply(x, weight, bias, activation == "silu", bool(reverse))
