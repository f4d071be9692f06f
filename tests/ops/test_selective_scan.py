"""Selective scan: every backend's outputs and gradients against the sequential reference.

On CPU: the torch backend in float64 (tight tolerances); the Triton kernels in Triton's interpreter,
which needs TRITON_INTERPRET=1 before triton is imported, so ``test_triton_kernels_in_interpreter``
reruns this file's triton tests in a subprocess with that set. With a GPU the same tests also run on
CUDA in float32 and bfloat16 (tolerances suited to each); reference values are then computed in
float64 from the same (rounded) inputs.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from mmpretrain.ops.selective_scan import (
    resolve_backend,
    selective_scan,
    selective_scan_chunked,
    selective_scan_reference,
)
from mmpretrain.ops.selective_scan.chunked import auto_chunk_size, softplus
from mmpretrain.ops.selective_scan.dispatch import mamba_ssm_available, triton_available
from tests.ops.interpreter import rerun_in_interpreter

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])

# name -> (z, D, delta_bias, delta_softplus, return_last_state): all off, all on, and two mixes
CONFIGS = {
    "plain": (False, False, False, False, False),
    "full": (True, True, True, True, True),
    "z_bias_last": (True, False, True, False, True),
    "D_softplus": (False, True, False, True, False),
}
# relative error of each compared tensor, by the dtype the backend ran in
RTOL = {torch.float64: 1e-10, torch.float32: 2e-4, torch.bfloat16: 2.5e-2}
# absolute slack per sqrt(element), for tensors whose exact value is (near) zero, e.g. dA when L = 1
ATOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-4}


def make_inputs(batch, dim, L, N, groups, config, dtype, device, seed=0):
    """Random inputs in the usual regime (A < 0, small positive delta). groups=0: B, C are (batch, N, L)."""
    g = torch.Generator().manual_seed(seed)
    has_z, has_D, has_bias, softplus, last = CONFIGS[config]

    def randn(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(device)

    bc_shape = (batch, N, L) if groups == 0 else (batch, groups, N, L)
    t = {
        "u": randn(batch, dim, L).to(dtype),
        # raw delta: softplus makes it positive; without softplus keep it positive ourselves
        "delta": (randn(batch, dim, L, scale=0.5) if softplus else 0.5 * torch.rand(batch, dim, L, generator=g,
                  dtype=torch.float64).to(device)).to(dtype),
        "A": -torch.exp(randn(dim, N, scale=0.5)),  # parameters stay float32/float64, as in Mamba
        "B": randn(*bc_shape).to(dtype),
        "C": randn(*bc_shape).to(dtype),
        "D": randn(dim) if has_D else None,
        "z": randn(batch, dim, L).to(dtype) if has_z else None,
        # without softplus, delta + delta_bias must stay positive (a growing state overflows in float32)
        "delta_bias": (randn(dim, scale=0.5) if softplus else 0.1 * torch.rand(dim, generator=g,
                       dtype=torch.float64).to(device)) if has_bias else None,
    }
    if dtype != torch.float64:
        for k in ("A", "D", "delta_bias"):
            if t[k] is not None:
                t[k] = t[k].float()
    for v in t.values():
        if v is not None:
            v.requires_grad_(True)
    return t, dict(delta_softplus=softplus, return_last_state=last)


def run_with_grads(fn, inputs, flags, seed=1):
    """fn(**inputs, **flags) -> [out, last_state?, d/d each input] for a random linear loss."""
    res = fn(**inputs, **flags)
    out, last = res if flags["return_last_state"] else (res, None)
    g = torch.Generator().manual_seed(seed)
    loss = (out.double() * torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device)).sum()
    if last is not None:
        loss = loss + (last.double() * torch.randn(last.shape, generator=g, dtype=torch.float64).to(out.device)).sum()
    names = [k for k, v in inputs.items() if v is not None]
    grads = torch.autograd.grad(loss, [inputs[k] for k in names], allow_unused=False)
    result = {"out": out}
    if last is not None:
        result["last_state"] = last
    result.update({f"d{k}": gr for k, gr in zip(names, grads)})
    return result


def reference_of(inputs, flags):
    """The reference in float64 on the same (already rounded) inputs."""
    ins64 = {k: (v.detach().double().requires_grad_(True) if v is not None else None) for k, v in inputs.items()}
    return run_with_grads(selective_scan_reference, ins64, flags)


def assert_matches(result, expected, rtol, what, atol=1e-12):
    assert result.keys() == expected.keys()
    for k, exp in expected.items():
        got = result[k]
        assert got.shape == exp.shape, f"{what}: {k} has shape {tuple(got.shape)}, expected {tuple(exp.shape)}"
        assert torch.isfinite(got).all(), f"{what}: {k} has non-finite values"
        err = (got.double() - exp).norm().item()
        scale = exp.norm().item()
        assert err <= rtol * scale + atol * math.sqrt(exp.numel()), (
            f"{what}: {k} relative error {err / max(scale, 1e-300):.2e} > {rtol:.0e}")


def compute_dtypes(device):
    return [torch.float64] if device == "cpu" else [torch.float32, torch.bfloat16]


# --- the reference itself -------------------------------------------------------------------------


def test_reference_matches_scalar_loop():
    """The reference against a scalar Python loop over every (batch, channel, state, step)."""
    t, flags = make_inputs(1, 4, 5, 3, 2, "full", torch.float64, "cpu", seed=3)
    with torch.no_grad():
        out, last = selective_scan_reference(**t, **flags)
    u, dl, A, B, C, D, z, bias = (t[k].detach() for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"))
    dim, L, N = 4, 5, 3
    for d in range(dim):
        grp = d // (dim // 2)
        x = [0.0] * N
        for s in range(L):
            dt = math.log1p(math.exp(float(dl[0, d, s] + bias[d])))
            y = 0.0
            for n in range(N):
                x[n] = math.exp(dt * float(A[d, n])) * x[n] + dt * float(B[0, grp, n, s]) * float(u[0, d, s])
                y += float(C[0, grp, n, s]) * x[n]
            y += float(D[d]) * float(u[0, d, s])
            zz = float(z[0, d, s])
            y *= zz / (1 + math.exp(-zz))
            assert abs(y - float(out[0, d, s])) < 1e-12
        for n in range(N):
            assert abs(x[n] - float(last[0, d, n])) < 1e-12


# --- torch (chunked) backend -----------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("groups", [0, 2], ids=["shared_BC", "grouped_BC"])
@pytest.mark.parametrize("L", [1, 7, 197])
def test_torch_backend_matches_reference(device, config, groups, L):
    for dtype in compute_dtypes(device):
        t, flags = make_inputs(2, 6, L, 4, groups, config, dtype, device, seed=L)
        got = run_with_grads(lambda **kw: selective_scan(**kw, backend="torch"), t, flags)
        assert_matches(got, reference_of(t, flags), RTOL[dtype], f"torch {device} {dtype}", ATOL[dtype])


@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_torch_backend_chunk_sizes(chunk_size):
    t, flags = make_inputs(2, 4, 23, 3, 0, "full", torch.float64, "cpu", seed=5)
    got = run_with_grads(lambda **kw: selective_scan_chunked(**kw, chunk_size=chunk_size), t, flags)
    assert_matches(got, reference_of(t, flags), 1e-10, f"torch chunk_size={chunk_size}")


def test_torch_backend_long_sequence():
    t, flags = make_inputs(1, 2, 4097, 4, 0, "full", torch.float64, "cpu", seed=7)
    got = run_with_grads(lambda **kw: selective_scan(**kw, backend="torch"), t, flags)
    assert_matches(got, reference_of(t, flags), 1e-9, "torch L=4097")


def test_torch_backend_stable_for_strong_decay():
    """Large delta * |A| (exp underflows inside a chunk): no inf or NaN, same values as the reference."""
    t, flags = make_inputs(1, 3, 50, 4, 0, "plain", torch.float64, "cpu", seed=9)
    with torch.no_grad():
        t["delta"].mul_(400.0)
        t["A"].mul_(10.0)
    got = run_with_grads(lambda **kw: selective_scan(**kw, backend="torch"), t, flags)
    assert_matches(got, reference_of(t, flags), 1e-10, "torch strong decay")


def test_torch_backend_low_precision_inputs_on_cpu():
    t, flags = make_inputs(2, 4, 9, 3, 0, "full", torch.bfloat16, "cpu", seed=2)
    got = run_with_grads(lambda **kw: selective_scan(**kw, backend="torch"), t, flags)
    assert got["out"].dtype == torch.bfloat16 and got["last_state"].dtype == torch.float32
    assert_matches(got, reference_of(t, flags), RTOL[torch.bfloat16], "torch bf16 cpu")


@pytest.mark.parametrize("device", DEVICES)
def test_torch_backend_ignores_autocast(device):
    """Under bf16 autocast the backend's products over N (einsum) must still run in float32."""
    t, flags = make_inputs(2, 8, 33, 4, 2, "full", torch.float32, device, seed=4)
    plain = run_with_grads(lambda **kw: selective_scan(**kw, backend="torch"), t, flags)
    with torch.autocast(device, dtype=torch.bfloat16):
        cast = run_with_grads(lambda **kw: selective_scan(**kw, backend="torch"), t, flags)
    assert cast["out"].dtype == torch.float32
    assert_matches(cast, {k: v.double() for k, v in plain.items()}, 1e-6, "torch under autocast")


@pytest.mark.parametrize("groups_B,groups_C", [(0, 2), (2, 0), (2, 3)], ids=["B_shared", "C_shared", "2_and_3"])
def test_torch_backend_B_and_C_with_different_groups(groups_B, groups_C):
    """B and C laid out independently (shared or grouped, even 2 and 3 groups over 6 channels)."""
    t, flags = make_inputs(2, 6, 13, 4, groups_C, "full", torch.float64, "cpu", seed=14)
    other, _ = make_inputs(2, 6, 13, 4, groups_B, "full", torch.float64, "cpu", seed=15)
    t["B"] = other["B"]
    got = run_with_grads(lambda **kw: selective_scan(**kw, backend="torch"), t, flags)
    assert_matches(got, reference_of(t, flags), 1e-10, f"torch B groups {groups_B}, C groups {groups_C}")


def test_torch_backend_gpu_contractions_on_cpu(monkeypatch):
    """The product-and-sum contractions that GPUs use (no TF32), run here on CPU against the reference."""
    from mmpretrain.ops.selective_scan import chunked

    monkeypatch.setattr(chunked, "_MATMUL_DEVICES", ())
    t, flags = make_inputs(2, 6, 23, 4, 2, "full", torch.float64, "cpu", seed=12)
    got = run_with_grads(lambda **kw: selective_scan_chunked(**kw, chunk_size=5), t, flags)
    assert_matches(got, reference_of(t, flags), 1e-10, "torch, GPU contractions")


@pytest.mark.skipif(not HAS_CUDA, reason="TF32 is a CUDA matmul setting")
def test_torch_backend_stays_float32_under_tf32():
    """The CLI sets float32 matmul precision "high" (TF32 on GPUs); the backend's products must not use it."""
    t, flags = make_inputs(2, 64, 65, 16, 0, "full", torch.float32, "cuda", seed=8)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        got = run_with_grads(lambda **kw: selective_scan(**kw, backend="torch"), t, flags)
    finally:
        torch.set_float32_matmul_precision(before)
    assert_matches(got, reference_of(t, flags), RTOL[torch.float32], "torch under TF32", ATOL[torch.float32])


def test_torch_backend_saves_a_fraction_of_the_full_state():
    """What autograd keeps for the backward: inputs and one state per chunk, far below (batch, dim, L, N)."""
    batch, dim, L, N, T = 2, 32, 512, 16, 8
    t, flags = make_inputs(batch, dim, L, N, 0, "full", torch.float32, "cpu", seed=6)
    saved = []

    def pack(x):
        saved.append(x.numel() * x.element_size())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out, _ = selective_scan_chunked(**t, **flags, chunk_size=T)
    full_state = batch * dim * L * N * 4
    # u, delta, z, B, C (and their float32 copies) are O(batch * dim * L); the chunk states full_state / T
    assert full_state / T <= sum(saved) < full_state / T + 12 * batch * dim * L * 4, sum(saved)
    out.sum().backward()  # and the saved tensors suffice for the backward
    assert torch.isfinite(t["A"].grad).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_backend_softplus_matches_functional(dtype):
    """The CPU softplus (log1p from exp and log) against F.softplus across its range, threshold included."""
    x = torch.cat([torch.linspace(-120, 120, 24001, dtype=torch.float64), torch.tensor([-1e-30, 0.0, 20.0])])
    x = torch.cat([x, torch.nextafter(torch.tensor([20.0], dtype=torch.float64), torch.tensor(30.0, dtype=torch.float64))])
    x = x.to(dtype)
    exp = torch.nn.functional.softplus(x.double()).to(dtype)  # of the same inputs, in float64, rounded once
    got = softplus(x)
    assert got.dtype == dtype
    info = torch.finfo(dtype)
    torch.testing.assert_close(got, exp, rtol=4 * info.eps, atol=info.tiny)  # atol: float32 subnormals (x < -87)
    assert torch.equal(got[x > 20], x[x > 20])


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_torch_backend_auto_chunk_size(device):
    """Chunks fill the per-device budget (1M elements per buffer on CPU, 16M on GPUs), within 1..64 and L."""
    assert auto_chunk_size(32, 384, 16, 197, device) == (5 if device == "cpu" else 64)
    assert auto_chunk_size(64, 384, 16, 197, device) == (2 if device == "cpu" else 42)
    assert auto_chunk_size(1, 8, 4, 7, device) == 7  # never longer than the sequence
    assert auto_chunk_size(512, 4096, 64, 100, device) == 1


# --- triton backend --------------------------------------------------------------------------------

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def triton_devices():
    """CUDA when present; CPU only inside the interpreter subprocess."""
    devices = []
    if INTERPRET:
        devices.append("cpu")
    if HAS_CUDA and not INTERPRET:
        devices.append("cuda")
    return devices or [pytest.param("cpu", marks=pytest.mark.skip(
        reason="no GPU: run under TRITON_INTERPRET=1 by test_triton_kernels_in_interpreter"))]


def triton_dtypes(device):
    # the interpreter runs numpy: float64 checks the algebra tightly, float32 the default path
    return [torch.float64, torch.float32] if device == "cpu" else [torch.float32, torch.bfloat16]


def _triton(**overrides):
    """selective_scan_triton with the default launch parameters, some overridden."""
    from mmpretrain.ops.selective_scan.triton_kernels import TritonConfig, selective_scan_triton

    cfg = TritonConfig(**overrides)
    return lambda **inputs: selective_scan_triton(**inputs, config=cfg)


@needs_triton
@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("groups", [0, 2], ids=["shared_BC", "grouped_BC"])
@pytest.mark.parametrize("L", [1, 7])
def test_triton_backend_short(device, config, groups, L):
    for dtype in triton_dtypes(device):
        # dim 6: a masked block for shared B/C, one-channel blocks for 2 groups of 3; N 5 is padded to 8
        t, flags = make_inputs(2, 6, L, 5, groups, config, dtype, device, seed=L)
        # chunk 4 (sub-chunk 2): L=7 crosses checkpoint boundaries and ends in a partial chunk
        got = run_with_grads(_triton(chunk=4, sub_chunk=2), t, flags)
        assert_matches(got, reference_of(t, flags), RTOL[dtype], f"triton {device} {dtype}", ATOL[dtype])


@needs_triton
@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("config,groups", [("full", 0), ("z_bias_last", 2)])
def test_triton_backend_long(device, config, groups):
    if device == "cpu":
        # the interpreter is slow: one dtype per case, one batch row, few channels and states
        dtypes, batch, dim, N = [torch.float32 if config == "full" else torch.float64], 1, 4, 4
    else:
        dtypes, batch, dim, N = triton_dtypes(device), 4, 64, 16
    for dtype in dtypes:
        t, flags = make_inputs(batch, dim, 197, N, groups, config, dtype, device, seed=11)
        got = run_with_grads(_triton(), t, flags)
        assert_matches(got, reference_of(t, flags), RTOL[dtype], f"triton L=197 {device} {dtype}", ATOL[dtype])


@needs_triton
@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("block_d_bwd", [8, 16, 32, 64])
def test_triton_backend_channel_sums(device, block_d_bwd):
    """The backward's sums of dB and dC over each program's channels at 4, 8, 16 and 32 channel lanes (two rows per
    thread): on a GPU the shuffle reduce-scatter (``lane_sums``), whose lanes must line up with Triton's layout; in
    the interpreter tl.sum. 16 states, a partial last tile (L 23), grouped B and C (two groups of 64 channels);
    the reverse direction's positions are checked by test_selective_scan_layouts.py."""
    from mmpretrain.ops.selective_scan.triton_kernels import lane_sums

    lanes = block_d_bwd // 2
    dtype = torch.float32 if device == "cuda" else torch.float64
    assert lane_sums(lanes, 4, 1, torch.float32, 16) or INTERPRET
    t, flags = make_inputs(2, 128, 23, 16, 2, "full", dtype, device, seed=lanes)
    got = run_with_grads(_triton(block_d_bwd=block_d_bwd, chunk=8), t, flags)
    assert_matches(got, reference_of(t, flags), RTOL[dtype], f"triton lanes {lanes}", ATOL[dtype])


@needs_triton
@pytest.mark.parametrize("has_D, has_bias", [(True, True), (False, False), (True, False)])
def test_backward_accumulators_split_into_disjoint_aligned_views(has_D, has_bias):
    """The backward's one zeroed buffer for its atomic sums: dB, dC, dA_t, dD and d(delta_bias) are disjoint views
    of it with the right shapes, each starting on 16 bytes (odd sizes: batch 3, L 7, N 3, dim 5)."""
    from mmpretrain.ops.selective_scan.triton_kernels import _accumulator_sizes, split_accumulators

    batch, groups, L, N, dim = 3, 1, 7, 3, 5
    acc = torch.zeros(sum(_accumulator_sizes(batch, groups, L, N, dim, has_D, has_bias)))
    dB, dC, dA_t, dD, dbias = split_accumulators(acc, batch, groups, L, N, dim, has_D, has_bias)
    assert dB.shape == dC.shape == (batch, groups, L, N) and dA_t.shape == (N, dim)
    assert (dD is not None) == has_D and (dbias is not None) == has_bias
    parts = [t for t in (dB, dC, dA_t, dD, dbias) if t is not None]
    for i, t in enumerate(parts):
        assert t.untyped_storage().data_ptr() == acc.untyped_storage().data_ptr() and t.storage_offset() % 4 == 0
        t.fill_(i + 1)
    assert all(bool((t == i + 1).all()) for i, t in enumerate(parts))  # no part overwrote another


@needs_triton
def test_lane_sums_verified_once_per_key_and_falls_back(monkeypatch):
    """The shuffle sums of dB and dC are checked once per kernel specialisation against tl.sum, on the call's own
    inputs: a disagreement (a Triton that lays the backward's tiles out differently) warns and falls back to tl.sum,
    summation-order noise does not, and each key's answer is kept."""
    from mmpretrain.ops.selective_scan import triton_kernels as tk

    monkeypatch.setattr(tk, "_LANE_SUMS_VERIFIED", {})
    calls = []

    def channel_sums(wrong_by):
        def run(on):
            calls.append(on)
            dB = torch.arange(1.0, 7.0).reshape(2, 3)
            return dB + wrong_by * on, -dB * (1 + 1e-6 * on)

        return run

    assert tk.lane_sums_verified(("good",), channel_sums(1e-6))
    assert calls == [True, False]
    with pytest.warns(RuntimeWarning, match="disagree with tl.sum"):
        assert not tk.lane_sums_verified(("bad",), channel_sums(0.5))
    calls.clear()
    assert tk.lane_sums_verified(("good",), channel_sums(1e-6))
    assert not tk.lane_sums_verified(("bad",), channel_sums(0.5))
    assert calls == []


@needs_triton
@pytest.mark.parametrize("device", triton_devices())
def test_triton_backend_strong_decay_and_mixed_groups(device):
    """Underflowing decays (a_t x_{t-1} must not come from x_t - dt B u), and B shared while C is grouped."""
    t, flags = make_inputs(2, 4, 12, 4, 2, "full", torch.float32, device, seed=13)
    with torch.no_grad():
        t["A"].mul_(30.0)
    t["B"] = t["B"].detach()[:, 0].clone().requires_grad_(True)
    got = run_with_grads(_triton(chunk=8), t, flags)
    assert_matches(got, reference_of(t, flags), RTOL[torch.float32], "triton strong decay", ATOL[torch.float32])


def compile_backend(device):
    """Inductor on the GPU; on CPU (the interpreter) aot_eager: Dynamo and AOTAutograd trace the custom ops through
    their fake implementations and autograd rule, with no C++ code generation."""
    return "inductor" if device == "cuda" else "aot_eager"


@needs_triton
@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("config,groups,splits", [("full", 0, 1), ("z_bias_last", 2, 2)])
def test_triton_backend_custom_ops_opcheck(device, config, groups, splits):
    """The custom ops torch.compile sees: schema, fake tensors (shapes, dtypes and strides of every output), the
    autograd registration and AOT dispatch with dynamic shapes (torch.library.opcheck), forward and backward."""
    from mmpretrain.ops.selective_scan.custom_ops import selective_scan_bwd, selective_scan_fwd
    from mmpretrain.ops.selective_scan.triton_kernels import TritonConfig

    t, flags = make_inputs(1, 4, 9, 4, groups, config, torch.float32, device, seed=5)
    # channels-contiguous u, delta and z, as the mixer passes them
    for k in ("u", "delta", "z"):
        if t[k] is not None:
            t[k] = t[k].detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)
    B4, C4 = (t[k] if groups else t[k].detach().unsqueeze(1).requires_grad_(True) for k in ("B", "C"))
    cfg = TritonConfig(chunk=4, sub_chunk=2, splits=splits).to_ints()
    A_t = t["A"].detach().t().contiguous().requires_grad_(True)  # the ops take A as (N, dim)
    args = (t["u"], t["delta"], A_t, B4, C4, t["D"], t["z"], t["delta_bias"], flags["delta_softplus"], False, cfg,
            None, 1.0, 1)
    torch.library.opcheck(selective_scan_fwd, (*args[:9], splits > 1, cfg, None, 1.0, 1))  # reverse with the splits
    # the output's epilogue: scaled, plus a tensor laid out like u
    add = torch.randn_like(t["u"]).requires_grad_(True)
    torch.library.opcheck(selective_scan_fwd, (*args[:11], add, 0.5, 1))
    with torch.no_grad():
        out, ckpt, dts = selective_scan_fwd(*args)
    assert tuple(dts.shape) == ((1, splits, 4) if splits > 1 else (0,))  # 3 chunks of 4 steps in 2 splits
    with torch.no_grad():
        dout = torch.randn_like(out)
        dlast = torch.randn_like(ckpt[:, -1])
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args[:8]]
    for dl, scale in ((None, 1.0), (dlast, 0.5)):
        torch.library.opcheck(selective_scan_bwd, (dout, dl, *detached, ckpt, dts, *args[8:11], scale, 1))


@needs_triton
@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("config,groups", [("full", 0), ("D_softplus", 2)])
def test_triton_backend_under_torch_compile(device, config, groups):
    """torch.compile(fullgraph=True) traces the triton backend (as its custom ops) in one graph and gives the
    eager kernels' outputs and gradients, the final state's included, forward and reverse. The traced graph holds
    the hash of the ops' sources (so Inductor's caches never hand back a graph compiled around other ops)."""
    from mmpretrain.ops._runtime import OPS_SOURCE_KEY

    t, flags = make_inputs(2, 6, 13, 4, groups, config, torch.float32, device, seed=7)
    graphs = []

    def capturing(gm, example_inputs):
        graphs.append(gm.code)
        return torch._dynamo.lookup_backend(compile_backend(device))(gm, example_inputs)

    for reverse in (False, True):
        def scan(reverse=reverse, **kw):
            return _triton(chunk=4, sub_chunk=2)(**kw, reverse=reverse)

        eager = run_with_grads(scan, t, flags)
        torch._dynamo.reset()
        compiled = run_with_grads(torch.compile(scan, backend=capturing, fullgraph=True), t, flags)
        assert_matches(compiled, {k: v.double() for k, v in eager.items()}, 1e-6, f"compiled reverse={reverse}",
                       1e-7)
        assert "selective_scan_fwd" in graphs[-1] and str(OPS_SOURCE_KEY) in graphs[-1]


def _with_epilogue(scan, scale):
    """scan with the output epilogue as separate operations (the reference for out_scale and out_add)."""
    def fn(out_add, **kw):
        res = scan(**kw)
        if isinstance(res, tuple):
            return res[0] * scale + out_add, res[1]
        return res * scale + out_add
    return fn


def _epilogue_inputs(device, dtype, reverse, seed):
    t, flags = make_inputs(2, 6, 13, 4, 2, "full", dtype, device, seed=seed)
    # out_add laid out like the scan's output on the mixer's path (channels-contiguous)
    g = torch.Generator().manual_seed(seed + 1)
    add = torch.randn(2, 13, 6, generator=g, dtype=torch.float64).to(device, dtype).transpose(1, 2)
    t["out_add"] = add.requires_grad_(True)
    return t, dict(flags, reverse=reverse)


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("reverse", [False, True])
def test_output_epilogue_matches_separate_operations(backend, reverse):
    """out_scale and out_add (the output is out_scale * y + out_add): outputs, the final state and every gradient
    (out_add's too) equal the scan followed by the two operations, in both directions."""
    t, flags = _epilogue_inputs("cpu", torch.float64, reverse, seed=21)
    got = run_with_grads(lambda **kw: selective_scan(**kw, out_scale=0.5, backend=backend), t, flags)
    ins64 = {k: v.detach().double().requires_grad_(True) for k, v in t.items() if v is not None}
    expected = run_with_grads(_with_epilogue(lambda **kw: selective_scan(**kw, backend="reference"), 0.5), ins64,
                              flags)
    assert_matches(got, expected, RTOL[torch.float64], f"{backend} epilogue", ATOL[torch.float64])
    with pytest.raises(ValueError, match="out_add"):
        selective_scan(**{k: v for k, v in t.items() if k != "out_add"}, out_add=t["out_add"][:, :, 1:],
                       backend=backend)


@needs_triton
@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("reverse,splits", [(False, 1), (True, 2)])
def test_triton_backend_output_epilogue(device, reverse, splits):
    """The triton kernels' output epilogue (the forward kernel scales y and adds out_add as it stores the output,
    the backward kernels scale the output's gradient as they read it; split sequences too): outputs and gradients
    equal the reference followed by the two operations, eager and under torch.compile."""
    dtype = triton_dtypes(device)[0]
    t, flags = _epilogue_inputs(device, dtype, reverse, seed=23)
    scan = _triton(chunk=4, sub_chunk=2, splits=splits)

    def halved(**kw):
        return scan(**kw, out_scale=0.5)

    got = run_with_grads(halved, t, flags)
    ins64 = {k: v.detach().double().requires_grad_(True) for k, v in t.items() if v is not None}
    expected = run_with_grads(_with_epilogue(lambda **kw: selective_scan(**kw, backend="reference"), 0.5), ins64,
                              flags)
    assert_matches(got, expected, RTOL[dtype], f"triton epilogue {device} {dtype}", ATOL[dtype])
    torch._dynamo.reset()
    compiled = torch.compile(halved, backend=compile_backend(device), fullgraph=True)
    assert_matches(run_with_grads(compiled, t, flags), {k: v.double() for k, v in got.items()}, 1e-6,
                   "compiled epilogue", 1e-7)


@pytest.mark.skipif(INTERPRET or not triton_available(), reason="this is the parent of the interpreter run")
def test_triton_kernels_in_interpreter():
    """Rerun this file's triton tests on CPU under TRITON_INTERPRET=1 (which must be set before import)."""
    rerun_in_interpreter(__file__, "test_triton_backend")


# --- dispatch, errors, optional mamba_ssm ---------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_auto_backend(device):
    u = torch.zeros(1, 1, 1, device=device)
    expected = "triton" if device == "cuda" and triton_available() else "torch"
    assert resolve_backend("auto", u) == expected
    with pytest.raises(ValueError, match="unknown backend"):
        resolve_backend("cuda", u)


def test_errors_name_the_argument():
    t, flags = make_inputs(2, 6, 5, 4, 0, "full", torch.float64, "cpu")
    bad = dict(t, B=t["B"][:, :3])
    with pytest.raises(ValueError, match=r"^selective_scan: B must be"):
        selective_scan(**bad, **flags)
    bad = dict(t, C=t["C"].detach().reshape(2, 1, 4, 5).expand(2, 4, 4, 5))  # 4 groups do not divide dim 6
    with pytest.raises(ValueError, match=r"^selective_scan: C must be"):
        selective_scan(**bad, **flags)
    with pytest.raises(ValueError, match=r"^selective_scan: D must be"):
        selective_scan(**dict(t, D=t["D"][:3]), **flags)


@pytest.mark.skipif(not (HAS_CUDA and mamba_ssm_available()), reason="mamba_ssm and a GPU are optional")
def test_mamba_ssm_backend():
    t, flags = make_inputs(2, 64, 197, 16, 0, "full", torch.float32, "cuda", seed=17)
    got = run_with_grads(lambda **kw: selective_scan(**kw, backend="mamba_ssm"), t, flags)
    assert_matches(got, reference_of(t, flags), RTOL[torch.float32], "mamba_ssm")


# --- memory: nothing of size (batch, dim, L, N) -----------------------------------------------------


@pytest.mark.skipif(not HAS_CUDA, reason="measures CUDA memory")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_memory_stays_below_the_full_state(backend):
    batch, dim, L, N = 2, 128, 4096, 64
    t, flags = make_inputs(batch, dim, L, N, 0, "full", torch.bfloat16, "cuda", seed=19)
    kwargs = dict(chunk_size=8) if backend == "torch" else {}
    fn = selective_scan_chunked if backend == "torch" else _triton()
    run_with_grads(lambda **kw: fn(**kw, **kwargs), t, flags)  # warm-up (compilation)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run_with_grads(lambda **kw: fn(**kw, **kwargs), t, flags)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    full_state = batch * dim * L * N * 4
    assert extra < full_state / 2, f"{backend}: peak {extra / 2**20:.0f} MiB vs full state {full_state / 2**20:.0f} MiB"
