"""LRU and the bidirectional LRU mixer: against a plain sequential implementation, initialisation, direction,
precision and autocast."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmpretrain.models.lru import LRU, BiLRUMixer
from mmpretrain.optim import param_groups


def sequential_lru(lru: LRU, u: torch.Tensor) -> torch.Tensor:
    """The paper's equations, one token at a time, in complex128, from the module's parameters."""
    p = {k: v.detach().double() for k, v in lru.named_parameters()}
    lam = torch.exp(-torch.exp(p["nu_log"]) + 1j * torch.exp(p["theta_log"]))
    B = torch.complex(p["B_re"], p["B_im"]) * torch.exp(p["gamma_log"])[:, None]
    C = torch.complex(p["C_re"], p["C_im"])
    u = u.detach().double()
    state = torch.zeros(u.shape[0], lru.d_state, dtype=torch.complex128)
    ys = []
    for t in range(u.shape[1]):
        state = lam * state + u[:, t].to(torch.complex128) @ B.T
        ys.append((state @ C.T).real + p["D"] * u[:, t])
    return torch.stack(ys, dim=1)


def sequential_mixer(mixer: BiLRUMixer, hidden: torch.Tensor) -> torch.Tensor:
    value, gate = mixer.in_proj(hidden.detach().double()).detach().chunk(2, dim=-1)
    y_fwd = sequential_lru(mixer.lru_fwd, value)
    y_bwd = sequential_lru(mixer.lru_bwd, value.flip(1)).flip(1)
    y = 0.5 * (y_fwd + y_bwd) * F.silu(gate)
    return F.linear(y, mixer.out_proj.weight.double(), mixer.out_proj.bias.double()).detach()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("L", [1, 9, 197])
def test_lru_matches_sequential_equations(L, reverse):
    torch.manual_seed(L)
    lru = LRU(6, d_state=5, r_min=0.5).double()
    u = torch.randn(2, L, 6, dtype=torch.float64)
    expected = sequential_lru(lru, u.flip(1)).flip(1) if reverse else sequential_lru(lru, u)
    out = lru(u, reverse=reverse)
    assert out.shape == (2, L, 6) and out.dtype == torch.float64
    assert rel_err(out, expected) < 1e-12


def test_bilru_mixer_matches_sequential_equations():
    torch.manual_seed(1)
    mixer = BiLRUMixer(8, d_state=6, expand=2, bias=True, chunk_size=4).double()
    nn.init.normal_(mixer.in_proj.bias)
    nn.init.normal_(mixer.out_proj.bias)
    hidden = torch.randn(3, 23, 8, dtype=torch.float64)
    out = mixer(hidden)
    assert out.shape == hidden.shape
    assert rel_err(out, sequential_mixer(mixer, hidden)) < 1e-12
    ref_backend = copy.deepcopy(mixer)
    for lru in (ref_backend.lru_fwd, ref_backend.lru_bwd):
        lru.backend = "reference"
    assert rel_err(ref_backend(hidden), out) < 1e-12


def test_gradients_reach_every_parameter():
    torch.manual_seed(2)
    mixer = BiLRUMixer(8, d_state=4, bias=True)
    hidden = torch.randn(2, 11, 8, requires_grad=True)
    mixer(hidden).square().mean().backward()
    for name, p in [("hidden", hidden), *mixer.named_parameters()]:
        assert p.grad is not None, f"{name} has no gradient"
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, f"{name}: gradient zero or not finite"


def test_ring_initialisation():
    torch.manual_seed(3)
    H, N, r_min, r_max, max_phase = 16, 8192, 0.4, 0.9, 3.1
    lru = LRU(H, d_state=N, r_min=r_min, r_max=r_max, max_phase=max_phase)
    lam = torch.view_as_complex(lru.lam().double())
    mod, phase = lam.abs(), torch.exp(lru.theta_log.double())
    assert mod.min() >= r_min - 1e-6 and mod.max() <= r_max + 1e-6
    assert phase.min() >= 0 and phase.max() <= max_phase + 1e-6
    # uniform on the ring's area: |lambda|^2 uniform on [r_min^2, r_max^2]; phases uniform on [0, max_phase]
    sd_mean = lambda lo, hi: (hi - lo) / math.sqrt(12 * N)  # noqa: E731  (std of the mean of N uniforms)
    assert abs(mod.square().mean() - (r_min**2 + r_max**2) / 2) < 5 * sd_mean(r_min**2, r_max**2)
    assert abs(phase.mean() - max_phase / 2) < 5 * sd_mean(0, max_phase)
    assert (mod.square() < (r_min**2 + r_max**2) / 2).double().mean().sub(0.5).abs() < 0.03
    # the angle of lambda is the phase (mod 2 pi)
    assert torch.allclose(torch.remainder(lam.angle(), 2 * math.pi), torch.remainder(phase, 2 * math.pi), atol=1e-5)
    # gamma starts at the normalisation sqrt(1 - |lambda|^2)
    assert torch.allclose(torch.exp(lru.gamma_log.double()), torch.sqrt(1 - mod.square()), atol=1e-5)
    # scaled Gaussians: B ~ N(0, 1/(2H)), C ~ N(0, 1/N)
    assert abs(lru.B_re.std().item() * math.sqrt(2 * H) - 1) < 0.02
    assert abs(lru.B_im.std().item() * math.sqrt(2 * H) - 1) < 0.02
    assert abs(lru.C_re.std().item() * math.sqrt(N) - 1) < 0.02
    assert abs(lru.C_im.std().item() * math.sqrt(N) - 1) < 0.02


def test_default_ring_includes_zero_and_stays_finite():
    torch.manual_seed(4)
    lru = LRU(8, d_state=4096)  # r_min = 0: moduli down to ~0, nu_log large but finite
    assert all(torch.isfinite(p).all() for p in lru.parameters())
    mod = torch.view_as_complex(lru.lam()).abs()
    assert mod.max() <= 0.99 + 1e-6 and mod.min() < 0.05


def test_backward_direction_sees_later_tokens():
    """Perturbing token j changes the mixer's outputs before j (backward LRU), a forward LRU's only from j on."""
    torch.manual_seed(5)
    j, L = 6, 12
    hidden = torch.randn(2, L, 8)
    bumped = hidden.clone()
    bumped[:, j] += 1.0
    mixer = BiLRUMixer(8, d_state=8)
    with torch.no_grad():
        diff = (mixer(bumped) - mixer(hidden)).abs().amax(dim=(0, 2))
    assert (diff > 1e-4).all(), f"every position should see token {j}: {diff}"

    lru = LRU(8, d_state=8)
    with torch.no_grad():
        fwd = (lru(bumped) - lru(hidden)).abs().amax(dim=(0, 2))
        bwd = (lru(bumped, reverse=True) - lru(hidden, reverse=True)).abs().amax(dim=(0, 2))
    assert torch.equal(fwd[:j], torch.zeros(j)) and (fwd[j:] > 1e-4).all()
    assert torch.equal(bwd[j + 1:], torch.zeros(L - j - 1)) and (bwd[: j + 1] > 1e-4).all()


def test_float32_agrees_with_float64():
    torch.manual_seed(6)
    mixer = BiLRUMixer(16, d_state=12, expand=2)
    hidden = torch.randn(2, 197, 16)
    out32 = mixer(hidden)
    out64 = copy.deepcopy(mixer).double()(hidden.double())
    assert out32.dtype == torch.float32 and out64.dtype == torch.float64
    assert rel_err(out32, out64) < 1e-5


def test_bf16_autocast_on_cpu():
    torch.manual_seed(7)
    mixer = BiLRUMixer(16, d_state=12)
    hidden = torch.randn(2, 50, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mixer(hidden)
    out.float().square().mean().backward()
    assert torch.isfinite(out).all()
    assert rel_err(out, mixer(hidden).detach()) < 3e-2
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in mixer.parameters())


def test_no_weight_decay_names_the_recurrence_parameters():
    mixer = BiLRUMixer(8, d_state=4)
    names = mixer.no_weight_decay()
    params = dict(mixer.named_parameters())
    assert names == {f"lru_{d}.{p}" for d in ("fwd", "bwd") for p in ("nu_log", "theta_log", "gamma_log")}
    assert names <= params.keys()
    # as a model reports them (prefixed with the mixer's path), they land in the optimizer's no-decay group
    model = nn.Sequential(nn.Linear(8, 8), mixer)
    groups = param_groups(model, no_decay_names={f"1.{n}" for n in names})
    no_decay = {id(p) for g in groups if g.get("weight_decay") == 0.0 for p in g["params"]}
    assert all(id(params[n]) in no_decay for n in names)


def test_parameter_count_formula():
    d, N, expand = 12, 5, 2
    E = expand * d
    for bias in (False, True):
        mixer = BiLRUMixer(d, d_state=N, expand=expand, bias=bias)
        expected = 3 * d * E + 2 * (3 * N + 4 * N * E + E) + (2 * E + d if bias else 0)
        assert sum(p.numel() for p in mixer.parameters()) == expected
    assert BiLRUMixer(12).d_state == 12 and BiLRUMixer(12).d_inner == 12


def test_bad_ring_arguments():
    with pytest.raises(ValueError, match="r_min < r_max < 1"):
        LRU(4, r_max=1.0)
    with pytest.raises(ValueError, match="r_min < r_max < 1"):
        BiLRUMixer(4, r_min=0.9, r_max=0.5)
    with pytest.raises(ValueError, match="max_phase must be positive"):
        LRU(4, max_phase=0.0)
