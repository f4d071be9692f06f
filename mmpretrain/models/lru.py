"""Linear Recurrent Unit (Orvieto et al. 2023, "Resurrecting Recurrent Neural Networks for Long Sequences").

:class:`LRU` is one direction of the paper's layer: a complex diagonal linear recurrence

    x_t = lambda * x_{t-1} + gamma * (B u_t),     y_t = Re(C x_t) + D * u_t,
    lambda = exp(-exp(nu_log) + i * exp(theta_log)),     gamma = exp(gamma_log)

(the state x is complex of size N; u, y real of size H). :class:`BiLRUMixer` is the bidirectional
sequence mixer for Vision Mamba built from two of them, shaped like Vim's Mamba "v2" mixer.

All parameters are real tensors (B and C as separate real and imaginary parts), and the scan runs on
real pairs (:func:`mmpretrain.ops.linear_scan.linear_scan`), so nothing complex meets the optimizer,
DDP, autocast or torch.compile.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.linear_scan import linear_scan


class LRU(nn.Module):
    """One direction of the Linear Recurrent Unit, on (batch, L, d_model) sequences.

    Parameters (names as in the paper): ``nu_log``, ``theta_log``, ``gamma_log`` (N,) for the
    recurrence and the input normalisation; ``B_re``, ``B_im`` (N, H); ``C_re``, ``C_im`` (H, N);
    ``D`` (H,). Count: 3N + 4NH + H.

    Initialisation (the paper's, :meth:`reset_parameters`): lambda uniform on the ring
    r_min <= |lambda| <= r_max (uniform in area, i.e. |lambda|^2 uniform in [r_min^2, r_max^2]) with
    phase uniform in [0, max_phase]; gamma_log = log(sqrt(1 - |lambda|^2)), trained freely afterwards;
    B_re, B_im ~ N(0, 1/(2H)); C_re, C_im ~ N(0, 1/N); D ~ N(0, 1).

    Args:
        d_model: H, the width of the input and output sequence.
        d_state: N, the number of complex state channels (default: d_model).
        r_min: smallest initial |lambda|, in [0, r_max).
        r_max: largest initial |lambda|, in (r_min, 1).
        max_phase: initial phases are uniform in [0, max_phase] (radians; 2*pi for the whole circle).
        backend: scan backend of :func:`~mmpretrain.ops.linear_scan.linear_scan` ("auto", "torch", "reference").
        chunk_size: chunk length of the torch scan (None: automatic).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int | None = None,
        r_min: float = 0.0,
        r_max: float = 0.99,
        max_phase: float = 6.283,
        backend: str = "auto",
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= r_min < r_max < 1.0:
            raise ValueError(f"LRU: need 0 <= r_min < r_max < 1 for a stable ring initialisation, "
                             f"got r_min={r_min}, r_max={r_max}")
        if max_phase <= 0:
            raise ValueError(f"LRU: max_phase must be positive (radians), got {max_phase}")
        self.d_model = d_model
        self.d_state = d_state or d_model
        self.r_min, self.r_max, self.max_phase = r_min, r_max, max_phase
        self.backend = backend
        self.chunk_size = chunk_size
        N, H = self.d_state, d_model
        self.nu_log = nn.Parameter(torch.empty(N))
        self.theta_log = nn.Parameter(torch.empty(N))
        self.gamma_log = nn.Parameter(torch.empty(N))
        self.B_re = nn.Parameter(torch.empty(N, H))
        self.B_im = nn.Parameter(torch.empty(N, H))
        self.C_re = nn.Parameter(torch.empty(H, N))
        self.C_im = nn.Parameter(torch.empty(H, N))
        self.D = nn.Parameter(torch.empty(H))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        N, H = self.d_state, self.d_model
        tiny = torch.finfo(torch.float32).tiny
        # |lambda|^2 uniform on [r_min^2, r_max^2]; nu = -log|lambda| = -0.5 log(|lambda|^2)
        u1 = torch.rand(N, dtype=torch.float64)
        mod_sq = (u1 * (self.r_max**2 - self.r_min**2) + self.r_min**2).clamp_min(tiny)
        nu = -0.5 * torch.log(mod_sq)
        theta = (torch.rand(N, dtype=torch.float64) * self.max_phase).clamp_min(tiny)
        self.nu_log.copy_(torch.log(nu))
        self.theta_log.copy_(torch.log(theta))
        self.gamma_log.copy_(0.5 * torch.log1p(-mod_sq))  # log sqrt(1 - |lambda|^2)
        for w, std in ((self.B_re, 1 / math.sqrt(2 * H)), (self.B_im, 1 / math.sqrt(2 * H)),
                       (self.C_re, 1 / math.sqrt(N)), (self.C_im, 1 / math.sqrt(N))):
            nn.init.normal_(w, std=std)
        nn.init.normal_(self.D)

    def no_weight_decay(self) -> set[str]:
        """Names (relative to this module) of the recurrence parameters, to keep out of weight decay."""
        return {"nu_log", "theta_log", "gamma_log"}

    def lam(self) -> torch.Tensor:
        """The diagonal lambda as a real pair (N, 2): exp(-exp(nu_log)) * (cos, sin)(exp(theta_log))."""
        dtype = torch.float64 if self.nu_log.dtype == torch.float64 else torch.float32
        mod = torch.exp(-torch.exp(self.nu_log.to(dtype)))
        phase = torch.exp(self.theta_log.to(dtype))
        return torch.stack((mod * torch.cos(phase), mod * torch.sin(phase)), dim=-1)

    def forward(self, u: torch.Tensor, reverse: bool = False) -> torch.Tensor:
        """u (batch, L, d_model) -> y (batch, L, d_model); ``reverse`` runs the recurrence from the last token
        to the first (the same as flipping the sequence, running forward and flipping back).

        Under autocast the projections follow autocast, the scan runs in float32 (float64 for a double module).
        """
        batch, L, H = u.shape
        N = self.d_state
        gamma = torch.exp(self.gamma_log)[:, None]
        # one real projection to the (real, imaginary) pairs of gamma * B u, rows interleaved per state channel,
        # written channels first, (2N, batch * L): the scan's own layout, so it transposes nothing
        w_in = torch.stack((self.B_re * gamma, self.B_im * gamma), dim=1).reshape(2 * N, H)
        bu = torch.matmul(w_in, u.reshape(batch * L, H).t()).view(N, 2, batch, L)
        h = linear_scan(self.lam(), bu, reverse=reverse, backend=self.backend, chunk_size=self.chunk_size,
                        channels_first=True)
        # Re(C h) = C_re h_re - C_im h_im, again one real projection, reading the states channels first
        w_out = torch.stack((self.C_re, -self.C_im), dim=-1).reshape(H, 2 * N)
        h = h.reshape(2 * N, batch * L).to(w_out.dtype)  # (autocast still casts to bf16)
        y = torch.matmul(h.t(), w_out.t()).view(batch, L, H)
        return y + u * self.D.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_state={self.d_state}, r_min={self.r_min}, r_max={self.r_max}, "
                f"max_phase={self.max_phase}, backend={self.backend!r}")


class BiLRUMixer(nn.Module):
    """Bidirectional LRU sequence mixer for Vision Mamba, shaped like Vim's Mamba "v2" mixer.

    ::

        value, gate = in_proj(hidden).chunk(2)                  shared, d_model -> 2 * expand * d_model
        y = (lru_fwd(value) + lru_bwd(value reversed, reversed back)) / 2
        out = out_proj(y * silu(gate))                          shared, expand * d_model -> d_model

    ``lru_fwd`` reads the tokens first to last, ``lru_bwd`` last to first (the scan runs in reverse, which
    equals running over the flipped sequence and flipping back); each has its own lambda, gamma, B, C, D,
    both initialised the same way (the paper's ring). No convolution and no nonlinearity on the value
    path: the recurrence is linear, the gate is the nonlinearity, as in the paper's LRU block.

    Parameters, with E = expand * d_model and N = d_state:
    3 * d_model * E (projections) + 2 * (3N + 4NE + E) (two LRUs) + (2E + d_model if bias).
    E.g. d_model 192, expand 1, N 192: 407,040; N 96: 259,008 (Vim-Ti's Mamba mixer: about 282k).
    Forward FLOPs per token: 6 * d_model * E (shared projections) + 2 * 8 * N * E (each direction's
    projections into and out of the complex state) + 2 * 8 * N * T (each direction's chunked scan, T its
    chunk length, 8..64); the backward about twice that. At Vim-Ti sizes the scan is a few percent of
    the FLOPs but, being memory-bound, most of the time.

    Args:
        d_model: width of the residual stream (input and output).
        d_state: N, complex state channels per LRU (default: d_model).
        expand: E = expand * d_model, the width the LRUs run at.
        r_min, r_max: initial |lambda| ring, 0 <= r_min < r_max < 1.
        max_phase: initial phases uniform in [0, max_phase] radians.
        backend: scan backend ("auto", "torch", "reference").
        bias: biases on in_proj and out_proj (Vim's Mamba has none).
        chunk_size: chunk length of the torch scan (None: automatic).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int | None = None,
        expand: int = 1,
        r_min: float = 0.0,
        r_max: float = 0.99,
        max_phase: float = 6.283,
        backend: str = "auto",
        bias: bool = False,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        if expand < 1:
            raise ValueError(f"BiLRUMixer: expand must be a positive integer, got {expand}")
        self.d_model = d_model
        self.d_inner = expand * d_model
        self.d_state = d_state or d_model
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        lru_args = dict(d_state=self.d_state, r_min=r_min, r_max=r_max, max_phase=max_phase, backend=backend,
                        chunk_size=chunk_size)
        self.lru_fwd = LRU(self.d_inner, **lru_args)
        self.lru_bwd = LRU(self.d_inner, **lru_args)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def no_weight_decay(self) -> set[str]:
        """Names (relative to this module, e.g. 'lru_fwd.nu_log') of the recurrence parameters.

        A model holding the mixer as ``blocks.3.mixer`` should report them prefixed ('blocks.3.mixer.lru_fwd.nu_log'):
        exact names work with both our ``param_groups`` (substring match) and timm's layer-decay groups (fnmatch).
        """
        return {f"{name}.{p}" for name in ("lru_fwd", "lru_bwd") for p in self.lru_fwd.no_weight_decay()}

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (batch, L, d_model) -> (batch, L, d_model)."""
        value, gate = self.in_proj(hidden).chunk(2, dim=-1)
        y = 0.5 * (self.lru_fwd(value) + self.lru_bwd(value, reverse=True))
        return self.out_proj(y * F.silu(gate).to(y.dtype))
