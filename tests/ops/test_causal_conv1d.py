"""The depthwise causal convolution: the reference against a plain loop, the triton kernels against the reference
(values and gradients of x, weight and bias; causal and reverse; contiguous and channels-contiguous inputs).
On CPU the triton tests run under Triton's interpreter in a subprocess."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from mmpretrain.ops.causal_conv1d import causal_conv1d, causal_conv1d_bidirectional, causal_conv1d_reference
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


def _strided_like_mixer(x: torch.Tensor) -> torch.Tensor:
    """x as a channels-contiguous slice of a wider (batch, L, 2 dim) activation, as the mixer has it."""
    wide = torch.cat([x.transpose(1, 2), torch.zeros_like(x).transpose(1, 2)], dim=2)
    return wide[:, :, :x.shape[1]].transpose(1, 2)


def triton_device():
    if INTERPRET:
        return "cpu"
    return "cuda" if HAS_CUDA else None


@pytest.mark.skipif(not HAS_TRITON or triton_device() is None,
                    reason="no GPU: run under TRITON_INTERPRET=1 by test_triton_conv_in_interpreter")
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
# 300 steps: several programs along the sequence in the backward (runs of 256 steps, 128 on a GPU at this small
# batch); K 5 and 7: wider than Mamba's 4 (7: the backward's tiles grow to 8 steps, as shifts reach one tile back)
@pytest.mark.parametrize("L,K,bias", [(1, 4, True), (37, 4, True), (20, 3, False), (300, 4, True), (11, 5, True),
                                      (23, 7, False)])
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
        if layout == "channels_last":
            xd = _strided_like_mixer(xd)
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
        torch.library.opcheck(causal_conv1d_fwd, (x, w, b, True, reverse, 1))
        dout = torch.randn(2, 5, 9, generator=g).to(device)
        torch.library.opcheck(causal_conv1d_bwd, (dout, x.detach(), w.detach(), b.detach() if bias else None,
                                                  True, reverse, 1))

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


@pytest.mark.skipif(not HAS_TRITON or triton_device() is None,
                    reason="no GPU: run under TRITON_INTERPRET=1 by test_triton_conv_in_interpreter")
# 300 steps: runs of 256 with a tile before and after each; K 5: the wide-kernel path
@pytest.mark.parametrize("L,K,bias", [(1, 4, True), (37, 4, True), (20, 3, False), (300, 4, True), (11, 5, True)])
@pytest.mark.parametrize("used", ["both", "forward only", "reverse only"])
def test_triton_bidirectional_conv_matches_reference(L, K, bias, used):
    """Both directions in one kernel each way: outputs, dx (the sum of both directions') and each direction's
    weight and bias gradients against two reference convolutions; an output the loss does not use gets a zero
    gradient (None from autograd)."""
    device = triton_device()
    for dtype in [torch.float64] if device == "cpu" else [torch.float32, torch.bfloat16]:
        g = torch.Generator().manual_seed(L + K)
        dim = 70
        ws = [torch.randn(dim, K, generator=g, dtype=torch.float64) * 0.5 for _ in range(2)]
        bs = [torch.randn(dim, generator=g, dtype=torch.float64) if bias else None for _ in range(2)]
        x = torch.randn(2, dim, L, generator=g, dtype=torch.float64)
        douts = [torch.randn(2, dim, L, generator=g, dtype=torch.float64) for _ in range(2)]
        weights = {"both": (1.0, 1.0), "forward only": (1.0, 0.0), "reverse only": (0.0, 1.0)}[used]

        def loss(outs, douts=douts, weights=weights):
            return sum((o.double() * d.to(o.device)).sum() for o, d, keep in zip(outs, douts, weights) if keep)

        def grad(outs, inputs):  # zeros for the weights of an unused output
            return torch.autograd.grad(loss(outs), inputs, allow_unused=True, materialize_grads=True)

        xd = _strided_like_mixer(x.to(device, dtype)).detach().requires_grad_(True)
        pdt = torch.float32 if dtype != torch.float64 else dtype
        params = [t.to(device, pdt).requires_grad_(True) if t is not None else None for t in (ws[0], bs[0], ws[1],
                                                                                              bs[1])]
        outs = causal_conv1d_bidirectional(xd, *params, "silu", backend="triton")
        assert all(o.stride(1) == 1 for o in outs)
        inputs = [t for t in (xd, *params) if t is not None]
        grads = grad(outs, inputs)
        xr = x.clone().requires_grad_(True)
        ref_params = [t.clone().requires_grad_(True) if t is not None else None for t in (ws[0], bs[0], ws[1],
                                                                                         bs[1])]
        refs = (causal_conv1d_reference(xr, ref_params[0], ref_params[1], "silu"),
                causal_conv1d_reference(xr, ref_params[2], ref_params[3], "silu", reverse=True))
        ref_grads = grad(refs, [t for t in (xr, *ref_params) if t is not None])
        names = ["out", "out_b", "dx", "dw", "db", "dw_b", "db_b"] if bias else ["out", "out_b", "dx", "dw", "dw_b"]
        tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2}[dtype]
        for name, got, exp in zip(names, [*outs, *grads], [*refs, *ref_grads], strict=True):
            err = (got.double().cpu() - exp).norm() / exp.norm().clamp_min(1e-12)
            assert err < tol if exp.norm() > 0 else got.abs().max() == 0, f"{dtype} {used}: {name} error {err:.2e}"


@pytest.mark.skipif(not HAS_TRITON or triton_device() is None,
                    reason="no GPU: run under TRITON_INTERPRET=1 by test_triton_conv_in_interpreter")
@pytest.mark.parametrize("bias", [True, False])
def test_triton_bidirectional_conv_custom_ops(bias):
    """The custom ops torch.compile sees for both directions pass opcheck, and a compiled call gives the eager
    kernels' values and gradients."""
    from mmpretrain.ops.causal_conv1d.triton_kernels import causal_conv1d_bidir_bwd, causal_conv1d_bidir_fwd

    device = triton_device()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 9, 5, generator=g).transpose(1, 2).to(device).requires_grad_(True)
    params = [torch.randn(5, 4, generator=g), torch.randn(5, generator=g) if bias else None,
              torch.randn(5, 4, generator=g), torch.randn(5, generator=g) if bias else None]
    params = [t.to(device).requires_grad_(True) if t is not None else None for t in params]
    plain = [t.detach() if t is not None else None for t in params]
    torch.library.opcheck(causal_conv1d_bidir_fwd, (x, *params, True, 1))
    douts = [torch.randn(2, 5, 9, generator=g).to(device) for _ in range(2)]
    torch.library.opcheck(causal_conv1d_bidir_bwd, (*douts, x.detach(), *plain, True, 1))

    def conv(x, w, b, w2, b2):
        return causal_conv1d_bidirectional(x, w, b, w2, b2, "silu", backend="triton")

    inputs = [t for t in (x, *params) if t is not None]

    def run(fn):
        outs = fn(x, *params)
        return [*outs, *torch.autograd.grad(sum((o * d).sum() for o, d in zip(outs, douts)), inputs)]

    eager = run(conv)
    torch._dynamo.reset()
    compiled = run(torch.compile(conv, backend="inductor" if device == "cuda" else "aot_eager", fullgraph=True))
    for i, (got, exp) in enumerate(zip(compiled, eager, strict=True)):
        torch.testing.assert_close(got, exp, rtol=1e-6, atol=1e-6, msg=f"result {i}")


def test_bidirectional_conv_falls_back_per_direction():
    """The reference backend, and one bias without the other, give the two single convolutions."""
    g = torch.Generator().manual_seed(5)
    x, w, w_b, b = torch.randn(2, 3, 7, generator=g), torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g), \
        torch.randn(3, generator=g)
    for bias, bias_b in [(b, b * 2), (b, None), (None, None)]:
        out, out_b = causal_conv1d_bidirectional(x, w, bias, w_b.unsqueeze(1), bias_b, backend="reference")
        torch.testing.assert_close(out, causal_conv1d_reference(x, w, bias))
        torch.testing.assert_close(out_b, causal_conv1d_reference(x, w_b, bias_b, reverse=True))
    with pytest.raises(ValueError, match="weight"):
        causal_conv1d_bidirectional(x, w, None, torch.zeros(4, 4), None)


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
    rerun_in_interpreter(__file__, "test_triton_conv_matches or test_triton_conv_custom_ops or "
                                   "test_triton_bidirectional")
