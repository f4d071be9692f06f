"""The triton scan on the layouts and directions the Vim mixer uses, and with the sequence split in pieces.

Channels-contiguous inputs (views of (batch, L, dim) tensors, a gate that is a slice of a wider projection),
``reverse=True`` without flips, and a sequence cut into splits scanned in parallel (each from a zero state,
then combined): values and every gradient against the float64 reference on flipped / contiguous copies.
On CPU these run under Triton's interpreter in a subprocess (see test_selective_scan.py).
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from mmpretrain.ops.selective_scan import selective_scan, selective_scan_reference
from mmpretrain.ops.selective_scan.dispatch import triton_available
from tests.ops.interpreter import rerun_in_interpreter
from tests.ops.test_selective_scan import (
    ATOL,
    RTOL,
    _triton,
    assert_matches,
    make_inputs,
    reference_of,
    run_with_grads,
    triton_devices,
)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def channels_last(t: dict, gate_slice: bool) -> dict:
    """The same values as ``t``, laid out as the Vim mixer has them: u, delta, z channels-contiguous (z a slice
    of a twice-as-wide tensor when ``gate_slice``), B and C strided views of one (batch, L, 2N + 3) tensor."""
    out = dict(t)
    for k in ("u", "delta", "z"):
        v = t[k]
        if v is None:
            continue
        v = v.detach()
        if k == "z" and gate_slice:
            wide = torch.cat([torch.zeros_like(v), v], dim=1)  # (batch, 2 dim, L)
            view = wide.transpose(1, 2).contiguous().transpose(1, 2)[:, v.shape[1]:]
        else:
            view = v.transpose(1, 2).contiguous().transpose(1, 2)
        assert view.stride(1) == 1 and torch.equal(view, v)
        out[k] = view.requires_grad_(True)
    if t["B"].dim() == 3:
        batch, N, L = t["B"].shape
        packed = torch.cat([torch.zeros(batch, 3, L, dtype=t["B"].dtype, device=t["B"].device), t["B"].detach(),
                            t["C"].detach()], 1)
        packed = packed.transpose(1, 2).contiguous()  # (batch, L, 3 + 2N), like x_proj's output
        out["B"] = packed[:, :, 3:3 + N].transpose(1, 2).requires_grad_(True)
        out["C"] = packed[:, :, 3 + N:].transpose(1, 2).requires_grad_(True)
    return out


def reversed_reference(**kw):
    """The sequential reference scanned from the end: flip the sequence inputs, scan, flip the output back
    (flips inside autograd, so gradients come back in the original order)."""
    for k in ("u", "delta", "z", "B", "C"):
        if kw.get(k) is not None:
            kw[k] = kw[k].flip(-1)
    res = selective_scan_reference(**kw)
    return (res[0].flip(-1), res[1]) if isinstance(res, tuple) else res.flip(-1)


def expected_of(t: dict, flags: dict, reverse: bool) -> dict:
    """The float64 reference on the same (already rounded) inputs, forwards or backwards."""
    if not reverse:
        return reference_of(t, flags)
    ins64 = {k: (v.detach().double().requires_grad_(True) if v is not None else None) for k, v in t.items()}
    return run_with_grads(reversed_reference, ins64, flags)


@needs_triton
@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_triton_layouts_directions_splits(device, reverse, splits, layout):
    dtypes = [torch.float64] if device == "cpu" else [torch.float32, torch.bfloat16]
    fn = _triton(chunk=4, sub_chunk=2, splits=splits)
    for dtype in dtypes:
        # L 19 in chunks of 4: 5 chunks, 3 splits of 2 + 2 + 1 chunks, a partial last chunk
        t, flags = make_inputs(2, 6, 19, 5, 0, "full", dtype, "cpu", seed=21 + splits)
        if device != "cpu":
            t = {k: (v.detach().to(device).requires_grad_(True) if v is not None else None) for k, v in t.items()}
        ins = channels_last(t, gate_slice=True) if layout == "channels_last" else t
        got = run_with_grads(lambda **kw: fn(**kw, reverse=reverse), ins, flags)
        expected = expected_of(t, flags, reverse)
        assert_matches(got, expected, RTOL[dtype], f"triton {layout} reverse={reverse} splits={splits}", ATOL[dtype])
        if layout == "channels_last":  # outputs and input gradients keep the fast layout
            assert got["out"].stride(1) == 1 and got["du"].stride(1) == 1


@needs_triton
@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("bwd", [{}, {"sub_chunk_bwd": 1}, {"rows_bwd": 2, "sub_chunk_bwd": 2}, {"rows_bwd": 1}],
                         ids=["default", "sub1_bwd", "rows2_bwd", "rows1_bwd"])
def test_triton_splits_long_grouped(device, bwd):
    """Many splits over a long sequence with grouped B/C and no D or z: the carries chain through every split.
    Also the backward with tiles of a different length than the forward's (one step), and with its channels
    laid out as one or two rows per thread."""
    batch, dim, N = (1, 4, 4) if device == "cpu" else (2, 64, 16)
    dtype = torch.float64 if device == "cpu" else torch.float32
    t, flags = make_inputs(batch, dim, 301, N, 2, "z_bias_last", dtype, device, seed=23)
    got = run_with_grads(_triton(chunk=16, sub_chunk=4, splits=7, **bwd), t, flags)
    assert_matches(got, reference_of(t, flags), RTOL[dtype], f"triton 7 splits {bwd}", ATOL[dtype])


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_reverse_on_other_backends_flips(backend):
    t, flags = make_inputs(2, 3, 9, 4, 0, "full", torch.float64, "cpu", seed=25)
    got = run_with_grads(lambda **kw: selective_scan(**kw, backend=backend, reverse=True), t, flags)
    expected = expected_of(t, flags, True)
    assert_matches(got, expected, RTOL[torch.float64], f"{backend} reverse", ATOL[torch.float64])


@pytest.mark.skipif(INTERPRET or not triton_available(), reason="this is the parent of the interpreter run")
def test_triton_layouts_in_interpreter():
    """Rerun this file's triton tests on CPU under TRITON_INTERPRET=1 (which must be set before import)."""
    rerun_in_interpreter(__file__, "test_triton_layouts_directions or test_triton_splits")


@needs_triton
def test_automatic_splits_only_when_the_gpu_would_idle(monkeypatch):
    """Splits cost a second pass over the inputs: none while batch x channel blocks fill the multiprocessors
    (Vim-Ti at batch 128: two splits doubled the forward kernel), enough for the set programs per
    multiprocessor when they do not (a long sequence at a small batch), and never so many that the backward's
    state scratch (splits x chunk / sub_chunk_bwd states per channel) passes an eighth of the full state."""
    from mmpretrain.ops.selective_scan.triton_kernels import TritonConfig, _splits

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=132))
    gpu = torch.device("cuda")
    cfg = TritonConfig()
    assert _splits(cfg, 128 * 12, 4, gpu) == (1, 4)  # batch 128, 12 blocks of 32 channels, L 197 in chunks of 64
    n_splits, per = _splits(cfg, 16 * 12, 96, gpu)  # batch 16, L 6085
    assert n_splits > 1 and n_splits * per >= 96 and (n_splits - 1) * per < 96
    assert n_splits * cfg.chunk / cfg.bwd_sub_chunk <= 96 * cfg.chunk / 8  # scratch under an eighth of the state
    assert _splits(cfg, 2 * 16, 64, gpu)[0] <= 64 * cfg.bwd_sub_chunk // 8  # few programs, capped by the scratch
    assert _splits(TritonConfig(splits=3), 128 * 12, 4, gpu) == (2, 2)  # asked for: 4 chunks in runs of 2
