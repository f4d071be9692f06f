"""The bidirectional Mamba mixer (Vim v2): initialisation, causality of each direction, and values against a
step-by-step implementation written independently here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmpretrain.models.mamba import BiMambaMixer, aligned_projections
from mmpretrain.ops.causal_conv1d import causal_conv1d


def small_mixer(backend: str = "torch", **kwargs) -> BiMambaMixer:
    torch.manual_seed(0)
    return BiMambaMixer(d_model=8, d_state=4, d_conv=3, expand=2, backend=backend, **kwargs).double()


def naive_direction(x, z, conv_w, conv_b, x_proj_w, dt_proj_w, dt_proj_b, A_log, D, dt_rank, N):
    """One direction, one time step at a time: x, z (L, E) for one sample -> (L, E)."""
    L, E = x.shape
    k = conv_w.shape[-1]
    A = -torch.exp(A_log)
    state = torch.zeros(E, N, dtype=x.dtype)
    out = []
    for t in range(L):
        window = [x[t - j] if t - j >= 0 else torch.zeros(E, dtype=x.dtype) for j in range(k)]
        # conv weight (E, 1, k): tap k-1 multiplies the current step
        xc = conv_b + sum(conv_w[:, 0, k - 1 - j] * window[j] for j in range(k))
        xc = xc * torch.sigmoid(xc)
        proj = x_proj_w @ xc
        dt, B, C = proj[:dt_rank], proj[dt_rank:dt_rank + N], proj[dt_rank + N:]
        delta = F.softplus(dt_proj_w @ dt + dt_proj_b)  # (E,)
        state = torch.exp(delta[:, None] * A) * state + delta[:, None] * B[None, :] * xc[:, None]
        y = state @ C + D * xc
        out.append(y * z[t] * torch.sigmoid(z[t]))
    return torch.stack(out)


def naive_mixer(m: BiMambaMixer, h: torch.Tensor) -> torch.Tensor:
    outs = []
    for sample in h:
        xz = sample @ m.in_proj.weight.T
        x, z = xz.chunk(2, dim=-1)
        args = dict(dt_rank=m.dt_rank, N=m.d_state)
        fwd = naive_direction(x, z, m.conv1d.weight, m.conv1d.bias, m.x_proj.weight, m.dt_proj.weight,
                              m.dt_proj.bias, m.A_log, m.D, **args)
        bwd = naive_direction(x.flip(0), z.flip(0), m.conv1d_b.weight, m.conv1d_b.bias, m.x_proj_b.weight,
                              m.dt_proj_b.weight, m.dt_proj_b.bias, m.A_b_log, m.D_b, **args).flip(0)
        outs.append(((fwd + bwd) / 2) @ m.out_proj.weight.T)
    return torch.stack(outs)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_mixer_matches_step_by_step_implementation(backend):
    m = small_mixer(backend)
    with torch.no_grad():  # move D and the biases off their init so that every term shows
        m.D.uniform_(0.5, 1.5)
        m.D_b.uniform_(-1.0, 0.5)
        m.conv1d.bias.normal_()
        m.conv1d_b.bias.normal_()
    h = torch.randn(2, 9, 8, dtype=torch.float64)
    torch.testing.assert_close(m(h), naive_mixer(m, h), rtol=1e-10, atol=1e-10)


def test_torch_and_reference_backends_agree_with_gradients():
    ref, fast = small_mixer("reference"), small_mixer("torch")
    h = torch.randn(2, 37, 8, dtype=torch.float64, requires_grad=True)
    out_ref = ref(h)
    out_fast = fast(h)
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out_ref)
    grads_ref = torch.autograd.grad(out_ref, [h, *ref.parameters()], g)
    grads_fast = torch.autograd.grad(out_fast, [h, *fast.parameters()], g)
    names = ["input"] + [n for n, _ in ref.named_parameters()]
    for name, a, b in zip(names, grads_ref, grads_fast):
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-10, msg=lambda s, name=name: f"{name}: {s}")


@pytest.mark.parametrize("rank", [12, 16, 5])
def test_aligned_projections_are_the_same_products(rank):
    """dt_rank padded to a multiple of 8 by zero rows and columns (what the mixer does on CUDA): the same dt, B, C
    and delta, and the same gradients for the real weights."""
    N, E = 4, 10
    x = torch.randn(3, 7, E, dtype=torch.float64)
    w_x = torch.randn(rank + 2 * N, E, dtype=torch.float64, requires_grad=True)
    w_dt = torch.randn(E, rank, dtype=torch.float64, requires_grad=True)

    def outputs(pad: bool):
        wx, wdt, r = aligned_projections(w_x, w_dt, rank) if pad else (w_x, w_dt, rank)
        dt, B, C = torch.split(F.linear(x, wx), [r, N, N], dim=-1)
        return F.linear(dt, wdt), B, C, r

    *plain, r_plain = outputs(False)
    *padded, r_padded = outputs(True)
    assert r_plain == rank and r_padded % 8 == 0 and r_padded - rank < 8
    for a, b in zip(plain, padded):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12)
    g = [torch.randn_like(t) for t in plain]
    grads_plain = torch.autograd.grad(plain, [w_x, w_dt], g)
    grads_padded = torch.autograd.grad(padded, [w_x, w_dt], g)
    for a, b in zip(grads_plain, grads_padded):
        assert b.shape == a.shape
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12)


def test_mamba_initialisation_for_both_directions():
    torch.manual_seed(1)
    m = BiMambaMixer(d_model=64, d_state=16, expand=2)
    E, N = 128, 16
    assert m.dt_rank == math.ceil(64 / 16)
    expected = torch.log(torch.arange(1, N + 1, dtype=torch.float32)).expand(E, N)
    for A_log, D, dt_proj in ((m.A_log, m.D, m.dt_proj), (m.A_b_log, m.D_b, m.dt_proj_b)):
        torch.testing.assert_close(A_log.detach(), expected)
        torch.testing.assert_close(-torch.exp(A_log[0].detach()), -torch.arange(1.0, N + 1))
        assert torch.equal(D.detach(), torch.ones(E))
        dt = F.softplus(dt_proj.bias.detach())
        assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
        # log-uniform: the logs spread over most of [log 1e-3, log 1e-1], around its middle
        log_dt = dt.log()
        assert log_dt.max() - log_dt.min() > 0.8 * math.log(100)
        assert abs(log_dt.mean().item() - 0.5 * (math.log(1e-3) + math.log(1e-1))) < 0.5
        bound = m.dt_rank**-0.5
        assert dt_proj.weight.abs().max() <= bound and dt_proj.weight.abs().max() > 0.8 * bound
    assert not torch.equal(m.dt_proj.bias, m.dt_proj_b.bias)  # drawn independently, unlike Vim's zero bias


def test_no_weight_decay_names_exist():
    m = small_mixer()
    names = dict(m.named_parameters())
    assert m.no_weight_decay() == {"A_log", "A_b_log", "D", "D_b"}
    assert m.no_weight_decay() <= set(names)


def test_causal_conv_sees_only_the_past():
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(6, 6, 4, groups=6, padding=3).double()
    x = torch.randn(2, 6, 11, dtype=torch.float64)
    y = causal_conv1d(x, conv.weight, conv.bias, activation=None)
    assert y.shape == x.shape
    x2 = x.clone()
    x2[..., 7] += 1.0
    y2 = causal_conv1d(x2, conv.weight, conv.bias, activation=None)
    assert torch.equal(y[..., :7], y2[..., :7]) and not torch.equal(y[..., 7:], y2[..., 7:])
    # written out: y_t = b + sum_j w[k-1-j] x_{t-j}; nn.Conv1d's padding (both sides) keeps its first L outputs
    t = 5
    manual = conv.bias + sum(conv.weight[:, 0, 3 - j] * x[..., t - j] for j in range(4))
    torch.testing.assert_close(y[..., t], manual)
    torch.testing.assert_close(y, conv(x)[..., :11])
    # reverse: anti-causal, y_t sees x_t .. x_{t+3} only
    r, r2 = (causal_conv1d(v, conv.weight, conv.bias, activation=None, reverse=True) for v in (x, x2))
    assert torch.equal(r[..., 8:], r2[..., 8:]) and not torch.equal(r[..., 4:8], r2[..., 4:8])


def test_each_direction_is_causal_and_the_mixer_is_bidirectional():
    m = small_mixer()
    L, i = 10, 4
    h = torch.randn(1, L, 8, dtype=torch.float64, requires_grad=True)
    # the whole mixer: position i depends on tokens before and after it
    grad = torch.autograd.grad(m(h)[0, i].sum(), h)[0][0].abs().sum(-1)
    assert (grad[:i] > 0).all() and (grad[i + 1:] > 0).all()
    # the forward scan alone only looks back, the backward scan (run from the end) only ahead
    xz = m.in_proj(h).transpose(1, 2)
    x, z = xz.chunk(2, dim=1)
    fwd = m._scan(x, z, "")
    bwd = m._scan(x, z, "_b")
    g_fwd = torch.autograd.grad(fwd[0, :, i].sum(), h, retain_graph=True)[0][0].abs().sum(-1)
    g_bwd = torch.autograd.grad(bwd[0, :, i].sum(), h)[0][0].abs().sum(-1)
    assert (g_fwd[i + 1:] == 0).all() and (g_fwd[: i + 1] > 0).all()
    assert (g_bwd[:i] == 0).all() and (g_bwd[i:] > 0).all()


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="dt_min"):
        BiMambaMixer(8, dt_min=0.2, dt_max=0.1)
    with pytest.raises(ValueError, match="unknown backend"):
        BiMambaMixer(8, backend="cuda")(torch.randn(1, 3, 8))


TRITON_CHECK = """
import torch
from mmpretrain.models.mamba import BiMambaMixer
torch.manual_seed(0)
ref = BiMambaMixer(d_model=8, d_state=4, d_conv=3, expand=2, backend="reference")
tri = BiMambaMixer(d_model=8, d_state=4, d_conv=3, expand=2, backend="triton")
tri.load_state_dict(ref.state_dict())
h = torch.randn(1, 6, 8, requires_grad=True)
a, b = ref(h), tri(h)
torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
g = torch.randn_like(a)
ga = torch.autograd.grad(a, [h, *ref.parameters()], g)
gb = torch.autograd.grad(b, [h, *tri.parameters()], g)
for name, x, y in zip(["input"] + [n for n, _ in ref.named_parameters()], ga, gb):
    torch.testing.assert_close(y, x, rtol=1e-3, atol=1e-5, msg=name)
# torch.compile traces the mixer in one graph, the kernels as custom ops, with the eager kernels' results
c = torch.compile(tri, backend="aot_eager", fullgraph=True)(h)
torch.testing.assert_close(c, b, rtol=1e-6, atol=1e-7)
gc = torch.autograd.grad(c, [h, *tri.parameters()], g)
for name, x, y in zip(["input"] + [n for n, _ in tri.named_parameters()], gb, gc):
    torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-7, msg="compiled " + name)
print("ok")
"""


def test_mixer_on_the_triton_backend_in_the_interpreter():
    """The GPU path of the mixer (layouts, gate and biases into the fused kernel), run by Triton's interpreter,
    eager and under torch.compile."""
    pytest.importorskip("triton")
    from tests.ops.interpreter import interpreter_usable

    if not interpreter_usable():
        pytest.skip("this triton's interpreter does not run with this numpy (triton < 3.8 with numpy >= 2.5)")
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", TRITON_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
