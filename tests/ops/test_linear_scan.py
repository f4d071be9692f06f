"""Linear scan: the chunked torch backend's values and gradients against the sequential reference.

lam is parametrised as in the LRU, lam = exp(-exp(nu_log) + i exp(theta_log)), and gradients are checked
with respect to nu_log and theta_log (real), x and h0, in both argument forms (complex tensors and
real pairs). On CPU in float64 with tight tolerances; with a GPU the torch backend also runs on CUDA in
float32 against the float64 reference.
"""

from __future__ import annotations

import math

import pytest
import torch

from mmpretrain.ops.linear_scan import (
    auto_chunk_size,
    linear_scan,
    linear_scan_reference,
    resolve_backend,
)

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def make_inputs(batch, L, N, dtype=torch.float64, device="cpu", seed=0, r_min=0.3, r_max=0.999, h0=True):
    """Real leaves: nu_log, theta_log (N,), x (batch, L, N, 2), h0 (batch, N, 2); |lam| on [r_min, r_max]."""
    g = torch.Generator().manual_seed(seed)
    mod = r_min + (r_max - r_min) * torch.rand(N, generator=g, dtype=torch.float64)
    theta = 2 * math.pi * torch.rand(N, generator=g, dtype=torch.float64) + 1e-3
    leaves = {
        "nu_log": torch.log(-torch.log(mod)),
        "theta_log": torch.log(theta),
        "x": torch.randn(batch, L, N, 2, generator=g, dtype=torch.float64),
        "h0": torch.randn(batch, N, 2, generator=g, dtype=torch.float64) if h0 else None,
    }
    return {k: (v.to(device=device, dtype=dtype).requires_grad_(True) if v is not None else None)
            for k, v in leaves.items()}


def lam_pair(nu_log, theta_log):
    """lam = exp(-exp(nu_log) + i exp(theta_log)) as a real pair (N, 2)."""
    mod, phase = torch.exp(-torch.exp(nu_log)), torch.exp(theta_log)
    return torch.stack((mod * torch.cos(phase), mod * torch.sin(phase)), dim=-1)


def run_with_grads(fn, leaves, form, reverse, seed=1):
    """fn(lam, x, h0, reverse=, return_last_state=True) in the given form; returns values and leaf gradients.

    Forms: "complex", "pairs" (batch, L, N, 2), "channels_first" pairs (N, 2, batch, L); values are
    returned as pairs (batch, L, N, 2) whatever the form.
    """
    lam, x, h0 = lam_pair(leaves["nu_log"], leaves["theta_log"]), leaves["x"], leaves["h0"]
    kwargs = {}
    if form == "complex":
        lam, x = torch.view_as_complex(lam), torch.view_as_complex(x)
        h0 = torch.view_as_complex(h0) if h0 is not None else None
    elif form == "channels_first":
        x, h0, kwargs = x.permute(2, 3, 0, 1), (h0.permute(1, 2, 0) if h0 is not None else None), {"channels_first": True}
    h, last = fn(lam, x, h0, reverse=reverse, return_last_state=True, **kwargs)
    assert h.is_complex() == (form == "complex") and last.is_complex() == (form == "complex")
    if form == "complex":
        h, last = torch.view_as_real(h), torch.view_as_real(last)
    elif form == "channels_first":
        assert h.shape == x.shape and h.is_contiguous()
        h, last = h.permute(2, 3, 0, 1), last.permute(2, 0, 1)
    g = torch.Generator().manual_seed(seed)
    wh = torch.randn(h.shape, generator=g, dtype=torch.float64).to(h.device)
    wl = torch.randn(last.shape, generator=g, dtype=torch.float64).to(h.device)
    loss = (h.double() * wh).sum() + (last.double() * wl).sum()
    names = [k for k, v in leaves.items() if v is not None]
    grads = torch.autograd.grad(loss, [leaves[k] for k in names])
    return {"h": h, "last": last, **{f"d{k}": gr for k, gr in zip(names, grads)}}


def reference_of(leaves, form, reverse):
    """The reference in float64 on the same (possibly rounded) leaves (channels first: in the usual layout)."""
    leaves64 = {k: (v.detach().double().cpu().requires_grad_(True) if v is not None else None)
                for k, v in leaves.items()}
    return run_with_grads(linear_scan_reference, leaves64, "pairs" if form == "channels_first" else form, reverse)


def assert_matches(got, expected, rtol, what):
    assert got.keys() == expected.keys()
    for k, exp in expected.items():
        val = got[k]
        assert val.shape == exp.shape, f"{what}: {k} has shape {tuple(val.shape)}, expected {tuple(exp.shape)}"
        assert torch.isfinite(val).all(), f"{what}: {k} has non-finite values"
        err = (val.double().cpu() - exp).norm().item()
        scale = exp.norm().item()
        assert err <= rtol * scale + 1e-13, f"{what}: {k} relative error {err / max(scale, 1e-300):.2e} > {rtol:.0e}"


def torch_backend(chunk_size=None):
    return lambda *a, **kw: linear_scan(*a, **kw, backend="torch", chunk_size=chunk_size)


# --- the reference itself -------------------------------------------------------------------------


def test_reference_channels_first():
    t = make_inputs(2, 5, 3, seed=2)
    lam, x, h0 = lam_pair(t["nu_log"], t["theta_log"]), t["x"], t["h0"]
    for reverse in (False, True):
        h, last = linear_scan_reference(lam, x, h0, reverse=reverse, return_last_state=True)
        hc, lastc = linear_scan_reference(lam, x.permute(2, 3, 0, 1), h0.permute(1, 2, 0), reverse=reverse,
                                          return_last_state=True, channels_first=True)
        assert torch.equal(hc, h.permute(2, 3, 0, 1)) and torch.equal(lastc, last.permute(1, 2, 0))


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_reference_matches_scalar_loop(reverse):
    """The reference against Python complex numbers, one channel at a time."""
    t = make_inputs(2, 6, 3, seed=3)
    lam = torch.view_as_complex(lam_pair(t["nu_log"], t["theta_log"])).detach()
    x, h0 = torch.view_as_complex(t["x"].detach()), torch.view_as_complex(t["h0"].detach())
    h, last = linear_scan_reference(lam, x, h0, reverse=reverse, return_last_state=True)
    assert h.dtype == torch.complex128
    for b in range(2):
        for n in range(3):
            state = complex(h0[b, n])
            for s in (range(5, -1, -1) if reverse else range(6)):
                state = complex(lam[n]) * state + complex(x[b, s, n])
                assert abs(state - complex(h[b, s, n])) < 1e-12
            assert abs(state - complex(last[b, n])) < 1e-12


# --- torch (chunked) backend -----------------------------------------------------------------------


@pytest.mark.parametrize("form", ["complex", "pairs", "channels_first"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("L", [1, 7, 197, 1000])
def test_torch_backend_matches_reference(L, reverse, form):
    t = make_inputs(2, L, 4, seed=L)
    got = run_with_grads(torch_backend(), t, form, reverse)
    assert_matches(got, reference_of(t, form, reverse), RTOL[torch.float64], f"torch L={L} {form}")


@pytest.mark.parametrize("chunk_size", [2, 3, 5, 64, 256])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_torch_backend_chunk_sizes(chunk_size, reverse):
    """Small chunks recurse over several levels of chunk ends; large ones leave one padded chunk."""
    t = make_inputs(2, 130, 3, seed=chunk_size)
    got = run_with_grads(torch_backend(chunk_size), t, "channels_first", reverse)
    assert_matches(got, reference_of(t, "channels_first", reverse), RTOL[torch.float64], f"chunk_size={chunk_size}")


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_torch_backend_without_h0(reverse):
    t = make_inputs(3, 50, 5, seed=4, h0=False)
    got = run_with_grads(torch_backend(8), t, "complex", reverse)
    assert_matches(got, reference_of(t, "complex", reverse), RTOL[torch.float64], "no h0")


def test_torch_backend_extreme_moduli():
    """|lam| = 0 exactly (h = x), tiny, and very close to 1 over a long sequence: exact powers, no NaN."""
    lam = torch.tensor([0.0, 1e-30, 0.5, 1 - 1e-7], dtype=torch.float64)
    lam = torch.polar(lam, torch.tensor([0.0, 1.0, 3.0, 0.001], dtype=torch.float64))
    x = torch.randn(2, 300, 4, dtype=torch.complex128)
    h = linear_scan(lam, x, backend="torch", chunk_size=16)
    ref = linear_scan_reference(lam, x)
    assert torch.equal(h[..., 0], x[..., 0])
    assert (h - ref).abs().max() <= 1e-11 * ref.abs().max()


def test_gradcheck_complex():
    """torch.autograd.gradcheck (complex Wirtinger derivatives) at a tiny shape that crosses chunk levels."""
    g = torch.Generator().manual_seed(5)
    lam = torch.polar(0.3 + 0.6 * torch.rand(3, generator=g, dtype=torch.float64),
                      6 * torch.rand(3, generator=g, dtype=torch.float64)).requires_grad_(True)
    x = torch.randn(2, 7, 3, generator=g, dtype=torch.complex128, requires_grad=True)
    h0 = torch.randn(2, 3, generator=g, dtype=torch.complex128, requires_grad=True)
    for reverse in (False, True):
        def fn(lam, x, h0, reverse=reverse):
            return linear_scan(lam, x, h0, reverse=reverse, return_last_state=True, backend="torch", chunk_size=2)
        assert torch.autograd.gradcheck(fn, (lam, x, h0))


def test_gradcheck_pairs():
    g = torch.Generator().manual_seed(6)
    t = make_inputs(1, 6, 2, seed=6)
    x = torch.randn(1, 6, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)

    def fn(nu_log, theta_log, x):
        return linear_scan(lam_pair(nu_log, theta_log), x, reverse=True, backend="torch", chunk_size=3)

    assert torch.autograd.gradcheck(fn, (t["nu_log"], t["theta_log"], x))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_backend_float32(device):
    """float32 inputs: the result (float32) is within float32 rounding of the float64 reference."""
    t = make_inputs(2, 1000, 8, dtype=torch.float32, device=device, seed=8)
    for reverse in (False, True):
        got = run_with_grads(torch_backend(), t, "pairs", reverse)
        assert got["h"].dtype == torch.float32 and got["h"].device.type == device
        assert_matches(got, reference_of(t, "pairs", reverse), 5e-5, f"float32 {device}")


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_scans_in_float32(device):
    """Under bf16 autocast, bf16 pairs in: float32 states out, float32-accurate (not bf16) on the same inputs."""
    t = make_inputs(2, 197, 8, dtype=torch.float32, device=device, seed=9)
    x = t["x"].detach().to(torch.bfloat16).requires_grad_(True)
    lam = lam_pair(t["nu_log"], t["theta_log"])
    with torch.autocast(device, dtype=torch.bfloat16):
        h = linear_scan(lam, x, reverse=True)
    assert h.dtype == torch.float32
    h.sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16 and t["nu_log"].grad is not None
    ref = linear_scan_reference(lam.detach().double().cpu(), x.detach().double().cpu(), reverse=True)
    assert (h.detach().double().cpu() - ref).norm() <= 1e-5 * ref.norm()


def test_empty_sequence():
    lam = torch.full((3,), 0.5 + 0.1j, dtype=torch.complex64)
    h0 = torch.randn(2, 3, dtype=torch.complex64)
    h, last = linear_scan(lam, torch.zeros(2, 0, 3, dtype=torch.complex64), h0, return_last_state=True)
    assert h.shape == (2, 0, 3) and torch.equal(last, h0)


@pytest.mark.parametrize("L,expected", [(1, 2), (3, 4), (7, 8), (197, 16), (1000, 32), (6085, 64), (10**6, 64)])
def test_auto_chunk_size(L, expected):
    assert auto_chunk_size(L) == expected


# --- dispatch, errors ------------------------------------------------------------------------------


def test_dispatch_and_errors_name_the_argument():
    assert resolve_backend("auto") == "torch"
    lam = torch.full((3,), 0.5 + 0.1j, dtype=torch.complex64)
    x = torch.randn(2, 5, 3, dtype=torch.complex64)
    with pytest.raises(ValueError, match="unknown backend"):
        linear_scan(lam, x, backend="triton")
    with pytest.raises(ValueError, match=r"^linear_scan: lam must have shape \(3,\)"):
        linear_scan(lam[:2], x)
    with pytest.raises(ValueError, match=r"^linear_scan: x is in complex form, so lam must be too"):
        linear_scan(torch.view_as_real(lam), x)
    with pytest.raises(ValueError, match=r"^linear_scan: h0 must have shape \(2, 3, 2\)"):
        linear_scan(torch.view_as_real(lam), torch.view_as_real(x), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"^linear_scan: x must be complex \(batch, L, N\) or a real pair"):
        linear_scan(lam, x.real)
    with pytest.raises(ValueError, match="chunk_size must be at least 2"):
        linear_scan(lam, x, chunk_size=1)
    with pytest.raises(ValueError, match=r"^linear_scan: with channels_first=True, x must be real pairs"):
        linear_scan(lam, x, channels_first=True)
    with pytest.raises(ValueError, match=r"^linear_scan: h0 must have shape \(3, 2, 2\)"):
        linear_scan(torch.view_as_real(lam), torch.zeros(3, 2, 2, 5), torch.zeros(2, 3, 2), channels_first=True)


# --- memory: nothing of size (batch, L, N, T) --------------------------------------------------------


@pytest.mark.skipif(not HAS_CUDA, reason="measures CUDA memory")
def test_memory_is_linear_in_the_sequence():
    batch, L, N = 4, 4096, 256
    t = make_inputs(batch, L, N, dtype=torch.float32, device="cuda", seed=10, h0=False)

    def step():
        h = linear_scan(lam_pair(t["nu_log"], t["theta_log"]), t["x"], chunk_size=64)
        h.square().sum().backward()

    step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    extra = torch.cuda.max_memory_allocated() - base
    x_bytes = t["x"].numel() * 4
    assert extra < 12 * x_bytes, f"peak {extra / 2**20:.0f} MiB is {extra / x_bytes:.1f}x the input"
