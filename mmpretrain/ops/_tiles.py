"""Triton helpers for tiles whose first axis lives in each thread's registers (the selective scan's steps, the
convolution backward's steps): picking one step of such a tile costs no instructions."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def step_of(tile, steps, k: tl.constexpr):
    """Step k of a tile whose first axis is the steps, keeping that axis (of size 1); ``steps`` holds the axis's
    indices, broadcastable to the tile. The axis lives in each thread's registers, so the compiler resolves the
    select per register and folds the sum away: no instructions. The sum runs on the bits as integers, because
    a float sum's additions of -0.0 do not fold when denormals flush to zero (one add per element, as the
    forward and backward kernels paid before). The kept axis leaves the step in the tile's own layout, so
    arithmetic between the steps and a state needs no layout conversions."""
    if tile.dtype.primitive_bitwidth == 64:
        bits = tile.to(tl.int64, bitcast=True)
    else:
        bits = tile.to(tl.int32, bitcast=True)
    return tl.sum(tl.where(steps == k, bits, 0), axis=0, keep_dims=True).to(tile.dtype, bitcast=True)
