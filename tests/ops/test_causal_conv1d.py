"""The depthwise causal convolution: the reference against a plain loop, the triton kernels against the reference
(values and gradients of x, weight and bias; causal and reverse; contiguous and channels-contiguous inputs).
On CPU the triton tests run under Triton's interpreter in a subprocess."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from mmpretrain.ops.causal_conv1d import causal_conv1d, causal_conv1d_reference
from tests.ops.interpreter import rerun_in_interpreter

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()


def loop_conv(x, w, b, silu, reverse):
    batch, dim, L = x.shape
    K = w.shape[1]
    out = torch.zeros_like(x)
    for t in range(L):
        for k in range(K):
            src = t - (K - 1) + k if not reverse else t + (K - 1) - k
            if 0 <= src < L:
                out[:, :, t] += w[:, k] * x[:, :, src]
    out = out + (b[:, None] if b is not None else 0)
    return F.silu(out) if silu else out


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("silu", [True, False])
def test_reference_matches_loop(reverse, silu):
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(2, 3, 9, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g,
               dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64))
    got = causal_conv1d_reference(x, w, b, "silu" if silu else None, reverse)
    torch.testing.assert_close(got, loop_conv(x, w, b, silu, reverse))


def triton_device():
    if INTERPRET:
        return "cpu"
    return "cuda" if HAS_CUDA else None


@pytest.mark.skipif(not HAS_TRITON or triton_device() is None,
                    reason="no GPU: run under TRITON_INTERPRET=1 by test_triton_conv_in_interpreter")
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
# 300 steps: two programs along the sequence in the first backward pass (256 steps each); K 5: its wide-kernel path
@pytest.mark.parametrize("L,K,bias", [(1, 4, True), (37, 4, True), (20, 3, False), (300, 4, True), (11, 5, True)])
def test_triton_conv_matches_reference(reverse, layout, L, K, bias):
    device = triton_device()
    dtypes = [torch.float64] if device == "cpu" else [torch.float32, torch.bfloat16]
    for dtype in dtypes:
        g = torch.Generator().manual_seed(L + K)
        dim = 70  # two channel blocks, the second masked
        x = torch.randn(2, dim, L, generator=g, dtype=torch.float64)
        w = torch.randn(dim, K, generator=g, dtype=torch.float64) * 0.5
        b = torch.randn(dim, generator=g, dtype=torch.float64) if bias else None
        dout = torch.randn(2, dim, L, generator=g, dtype=torch.float64)
        xd = x.to(device, dtype)
        if layout == "channels_last":  # a slice of a wider (batch, L, 2 dim) activation, as the mixer has it
            wide = torch.cat([xd.transpose(1, 2), torch.zeros_like(xd).transpose(1, 2)], dim=2)
            xd = wide[:, :, :dim].transpose(1, 2)
            assert xd.stride(1) == 1
        xd = xd.detach().requires_grad_(True)
        wd = w.to(device, torch.float32 if dtype != torch.float64 else dtype).requires_grad_(True)
        bd = b.to(device, wd.dtype).requires_grad_(True) if bias else None
        out = causal_conv1d(xd, wd, bd, "silu", reverse, backend="triton")
        assert out.stride(1) == 1  # written channels-contiguous
        grads = torch.autograd.grad((out.double() * dout.to(device)).sum(), [t for t in (xd, wd, bd) if t is not None])
        xr = xd.detach().double().cpu().requires_grad_(True)
        wr, br = w.clone().requires_grad_(True), (b.clone().requires_grad_(True) if bias else None)
        ref = causal_conv1d_reference(xr, wr, br, "silu", reverse)
        ref_grads = torch.autograd.grad((ref * dout).sum(), [t for t in (xr, wr, br) if t is not None])
        tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2}[dtype]
        for name, got, exp in zip(["out", "dx", "dw", "db"], [out, *grads], [ref, *ref_grads]):
            err = (got.double().cpu() - exp).norm() / exp.norm().clamp_min(1e-12)
            assert err < tol, f"{dtype} {layout} reverse={reverse}: {name} relative error {err:.2e}"


@pytest.mark.skipif(not HAS_TRITON or triton_device() is None,
                    reason="no GPU: run under TRITON_INTERPRET=1 by test_triton_conv_in_interpreter")
@pytest.mark.parametrize("bias", [True, False])
def test_triton_conv_custom_ops(bias):
    """What torch.compile sees: the two custom ops pass torch.library.opcheck (schema, fake tensors with the real
    strides, autograd registration, AOT dispatch), and a fullgraph-compiled convolution gives the eager kernels'
    values and gradients (Inductor on the GPU, aot_eager in the interpreter)."""
    from mmpretrain.ops.causal_conv1d.triton_kernels import causal_conv1d_bwd, causal_conv1d_fwd

    device = triton_device()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 9, 5, generator=g).transpose(1, 2).to(device).requires_grad_(True)  # channels-contiguous
    w = torch.randn(5, 4, generator=g).to(device).requires_grad_(True)
    b = torch.randn(5, generator=g).to(device).requires_grad_(True) if bias else None
    for reverse in (False, True):
        torch.library.opcheck(causal_conv1d_fwd, (x, w, b, True, reverse))
        dout = torch.randn(2, 5, 9, generator=g).to(device)
        torch.library.opcheck(causal_conv1d_bwd, (dout, x.detach(), w.detach(), b.detach() if bias else None,
                                                  True, reverse))

        def conv(x, w, b, reverse=reverse):
            return causal_conv1d(x, w, b, "silu", reverse, backend="triton")

        inputs = [t for t in (x, w, b) if t is not None]
        eager = [conv(x, w, b)]
        eager += torch.autograd.grad((eager[0] * dout).sum(), inputs)
        torch._dynamo.reset()
        compiled_conv = torch.compile(conv, backend="inductor" if device == "cuda" else "aot_eager", fullgraph=True)
        compiled = [compiled_conv(x, w, b)]
        compiled += torch.autograd.grad((compiled[0] * dout).sum(), inputs)
        for name, got, exp in zip(["out", "dx", "dw", "db"], compiled, eager):
            torch.testing.assert_close(got, exp, rtol=1e-6, atol=1e-6, msg=f"reverse={reverse}: {name}")


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="weight"):
        causal_conv1d(torch.zeros(1, 3, 5), torch.zeros(4, 4))
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(torch.zeros(1, 3, 5), torch.zeros(3, 4), activation="relu")
    with pytest.raises(ValueError, match="unknown backend"):
        causal_conv1d(torch.zeros(1, 3, 5), torch.zeros(3, 4), backend="cuda")


@pytest.mark.skipif(INTERPRET or not HAS_TRITON, reason="this is the parent of the interpreter run")
def test_triton_conv_in_interpreter():
    """Rerun this file's triton tests on CPU under TRITON_INTERPRET=1 (which must be set before import)."""
    rerun_in_interpreter(__file__, "test_triton_conv_matches or test_triton_conv_custom_ops")
