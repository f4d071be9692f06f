"""The Triton selective scan as two PyTorch custom ops, so that ``torch.compile`` can trace a model around it.

``mmpretrain::selective_scan_fwd`` runs the forward kernels and returns ``(out, ckpt, dts)`` (the per-chunk
state checkpoints and the per-split summed dt the backward needs; ``dts`` is empty when the sequence is not
split); ``mmpretrain::selective_scan_bwd`` runs the backward kernels and returns the gradients they sum by
atomic adds (dB, dC, dA, dD, d(delta_bias)) as one flat float32 buffer, which the autograd rule views and casts.
The forward op's autograd rule calls the backward op, so the compiled graph holds both as opaque calls and
Inductor fuses the elementwise work, casts and layout changes around them (and CUDA graphs can capture them:
nothing in either op synchronises with the host). The final state, when asked for, is ``ckpt[:, -1]`` read outside the op, and its gradient reaches the
backward as the gradient of ``ckpt``'s last entry.

Eager mode does not use these ops: :class:`.triton_kernels.SelectiveScanTriton` (a ``torch.autograd.Function``)
costs about a quarter of a custom op's dispatch on the host (5 against 22 us a forward call, 44 against 100 us
with the backward, measured on CPU with a trivial body), and an eager Vim-Ti step makes 96 of these calls.
:func:`.triton_kernels.selective_scan_triton` picks between the two with ``torch.compiler.is_compiling()``.

The fake (meta) implementations give the real outputs' shapes, dtypes and strides (u's channels-contiguous
layout), which ``torch.library.opcheck`` checks in the tests.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._runtime import OPS_SOURCE_KEY, on_device
from .triton_kernels import (
    TritonConfig,
    _accumulator_sizes,
    _backward_flat,
    _compute_dtype,
    _empty_in_layout,
    _forward,
    _plan,
    accumulated_gradients,
)


@torch.library.custom_op("mmpretrain::selective_scan_fwd", mutates_args=())
def selective_scan_fwd(u: Tensor, delta: Tensor, A_t: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                       z: Tensor | None, delta_bias: Tensor | None, delta_softplus: bool, reverse: bool,
                       config: list[int], out_add: Tensor | None, out_scale: float,
                       source_key: int) -> tuple[Tensor, Tensor, Tensor]:
    """Forward kernels: A_t is A transposed, (N, dim) contiguous; B, C (batch, groups, N, L); ``config`` from
    :meth:`TritonConfig.to_ints`; the output is ``out_scale`` times the scan plus ``out_add``. ``source_key``:
    :data:`.._runtime.OPS_SOURCE_KEY` (unused here; it keys compiled graphs to the ops' code)."""
    cfg = TritonConfig.from_ints(tuple(config))
    with on_device(u):
        out, ckpt, dts = _forward(u, delta, A_t, B, C, D, z, delta_bias, delta_softplus, reverse, cfg, out_add,
                                  out_scale)
    return out, ckpt, dts if dts is not None else ckpt.new_empty(0)


@selective_scan_fwd.register_fake
def _(u, delta, A_t, B, C, D, z, delta_bias, delta_softplus, reverse, config, out_add, out_scale, source_key):
    batch, dim, L = u.shape
    N = A_t.shape[0]
    ct = _compute_dtype(u)
    _, n_chunks, n_splits, _ = _plan(TritonConfig.from_ints(tuple(config)), u, N, B.shape[1])
    ckpt = u.new_empty((batch, n_chunks, N, dim), dtype=ct)
    dts = u.new_empty((batch, n_splits, dim) if n_splits > 1 else (0,), dtype=ct)
    return _empty_in_layout(u, u.dtype), ckpt, dts


@torch.library.custom_op("mmpretrain::selective_scan_bwd", mutates_args=())
def selective_scan_bwd(dout: Tensor, dlast: Tensor | None, u: Tensor, delta: Tensor, A_t: Tensor, B: Tensor,
                       C: Tensor, D: Tensor | None, z: Tensor | None, delta_bias: Tensor | None, ckpt: Tensor,
                       dts: Tensor, delta_softplus: bool, reverse: bool, config: list[int], out_scale: float,
                       source_key: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward kernels: ``(du, ddelta, dz, acc)``, dz empty without z; ``acc`` is the flat float32 (float64)
    buffer of the gradients summed by atomic adds (dB, dC, dA_t, dD, d(delta_bias); ``accumulated_gradients`` views
    it), so that their casts happen in the traced graph, where Inductor fuses them into their readers. ``dlast``:
    the gradient of the final state as (batch, N, dim), or None."""
    cfg = TritonConfig.from_ints(tuple(config))
    with on_device(u):
        du, ddelta, dz, acc = _backward_flat(dout, dlast, u, delta, A_t, B, C, D, z, delta_bias, ckpt,
                                             dts if dts.numel() else None, delta_softplus, reverse, cfg, out_scale)
    return du, ddelta, dz if dz is not None else u.new_empty(0), acc


@selective_scan_bwd.register_fake
def _(dout, dlast, u, delta, A_t, B, C, D, z, delta_bias, ckpt, dts, delta_softplus, reverse, config, out_scale,
      source_key):
    batch, dim, L = u.shape
    N, groups = A_t.shape[0], B.shape[1]
    n_acc = sum(_accumulator_sizes(batch, groups, L, N, dim, D is not None, delta_bias is not None))
    return (
        _empty_in_layout(u, u.dtype),
        _empty_in_layout(u, delta.dtype),
        _empty_in_layout(u, z.dtype) if z is not None else u.new_empty(0),
        u.new_empty((n_acc,), dtype=_compute_dtype(u)),
    )


def _setup_context(ctx, inputs, output):
    u, delta, A_t, B, C, D, z, delta_bias, delta_softplus, reverse, config, out_add, out_scale, source_key = inputs
    _, ckpt, dts = output
    ctx.save_for_backward(u, delta, A_t, B, C, D, z, delta_bias, ckpt, dts)
    ctx.flags = (delta_softplus, reverse, config, out_scale, out_add is not None, source_key)
    ctx.set_materialize_grads(False)


def _backward_rule(ctx, dout, dckpt, _ddts):
    u, delta, A_t, B, C, D, z, delta_bias, ckpt, dts = ctx.saved_tensors
    softplus, reverse, config, out_scale, has_add, source_key = ctx.flags
    dadd = dout if has_add else None  # out_add's gradient is the output's
    if dout is None:
        dout = torch.zeros_like(u)
    dlast = dckpt[:, -1].contiguous() if dckpt is not None else None  # only the final state is read outside
    du, ddelta, dz, acc = selective_scan_bwd(dout, dlast, u, delta, A_t, B, C, D, z, delta_bias, ckpt, dts, softplus,
                                             reverse, config, out_scale, source_key)
    dA_t, dB, dC, dD, dbias = accumulated_gradients(acc, u, A_t, B, C, D, delta_bias)
    return (du, ddelta, dA_t, dB, dC, dD, dz if z is not None else None, dbias, None, None, None, dadd, None, None)


selective_scan_fwd.register_autograd(_backward_rule, setup_context=_setup_context)


def selective_scan_compiled(u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, reverse: bool,
                            cfg: TritonConfig, with_last: bool, out_add=None, out_scale: float = 1.0):
    """``(out, last_state or None)`` through the custom ops (the arguments as :class:`SelectiveScanTriton` takes
    them)."""
    # A transposed in the traced graph: autograd keeps it for the backward op and transposes dA_t back
    out, ckpt, _ = selective_scan_fwd(u, delta, A.t().contiguous(), B, C, D, z, delta_bias, bool(delta_softplus),
                                      bool(reverse), cfg.to_ints(), out_add, float(out_scale), OPS_SOURCE_KEY)
    return out, (ckpt[:, -1].transpose(1, 2).contiguous() if with_last else None)
