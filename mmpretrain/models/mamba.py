"""The bidirectional Mamba mixer of Vision Mamba (Vim's "v2" block), on our selective scan op.

One input projection makes the scan input ``x`` and the gate ``z``; each direction has its own
depthwise causal conv1d, ``x_proj`` (to dt, B, C), ``dt_proj``, ``A_log`` and ``D``; the backward
direction reads the sequence from the end. Both directions are gated by the same ``silu(z)`` (fused into
the scan through its ``z`` argument), averaged, and projected back by one shared output projection.
Parameter names follow Vim's (``conv1d_b``, ``x_proj_b``, ``dt_proj_b``, ``A_b_log``, ``D_b``).

Layout: activations stay (batch, L, channels) as the linear layers make them; the convolution and the scan
take their transposed views (channels contiguous) and run the backward direction with ``reverse=True``, so
on the GPU (triton kernels) nothing is transposed, flipped or copied between the projections. On CPU the
reference convolution and scans flip and copy as they need.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mmpretrain.ops.causal_conv1d import causal_conv1d_bidirectional
from mmpretrain.ops.selective_scan import selective_scan
from mmpretrain.ops.selective_scan.dispatch import resolve_backend


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or float64 if it is float64 (the scan's parameters are used in full precision)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def aligned_projections(x_proj_weight: torch.Tensor, dt_proj_weight: torch.Tensor, dt_rank: int,
                        multiple: int = 8) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``x_proj`` and ``dt_proj`` weights with dt_rank padded to a multiple of ``multiple``: zero rows after
    x_proj's dt rows, zero columns after dt_proj's, so the products are exactly the same and gradients reach
    only the real weights. Returns (x_proj weight, dt_proj weight, padded rank).

    Why: cuBLAS runs Hopper's kernels only for sizes that are multiples of 8. Vim-Ti's x_proj has 12 + 2 x 16 = 44
    outputs and dt_proj a reduction over 12, so both ran as sm80 CUTLASS kernels with 2-element alignment; padded
    to 48 and 16, the two products' forward and backward took 0.341 against 0.414 ms at 97k tokens (a Vim-Ti
    direction at 1248x1248, batch 16) and 0.200 against 0.232 ms at 50k (224, batch 256) on an H100.

    The mixer pads only under ``torch.compile``, where the concatenation and padding fuse into other kernels: on an
    H200, Vim-Ti with CUDA graphs trained at 224 (batch 256) at 3103.5 against 2980.3 samples/s and inferred at
    1248 (batch 16) at 363.2 against 349.8. In eager mode they cost about 576 more kernel launches a training step,
    and that step waits on the host: 2164-2193 against 2288-2366 samples/s."""
    pad = -dt_rank % multiple
    if not pad:
        return x_proj_weight, dt_proj_weight, dt_rank
    zeros = x_proj_weight.new_zeros(pad, x_proj_weight.shape[1])
    x_w = torch.cat([x_proj_weight[:dt_rank], zeros, x_proj_weight[dt_rank:]])
    return x_w, F.pad(dt_proj_weight, (0, pad)), dt_rank + pad


def init_dt_bias(bias: torch.Tensor, dt_min: float, dt_max: float, dt_init_floor: float) -> None:
    """Fill ``bias`` so that softplus(bias) is dt drawn log-uniformly in [dt_min, dt_max] (clamped at the floor)."""
    with torch.no_grad():
        log_dt = torch.rand_like(bias, dtype=torch.float32) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        dt = torch.exp(log_dt).clamp(min=dt_init_floor)
        # softplus^-1(dt) = log(exp(dt) - 1) = dt + log(1 - exp(-dt)), stable for small dt
        bias.copy_(dt + torch.log(-torch.expm1(-dt)))


class BiMambaMixer(nn.Module):
    """Bidirectional Mamba mixer (Vim v2): (batch, L, d_model) -> (batch, L, d_model).

    Initialisation, the same for both directions: ``A = -exp(A_log)`` with ``A_log[d] = log(1..d_state)``
    (S4D-real); ``dt_proj.weight`` uniform in +-dt_rank^-0.5 * dt_scale; ``dt_proj.bias`` the inverse
    softplus of dt drawn log-uniformly in [dt_min, dt_max]; ``D = 1``. Vim's own code initialises the
    backward direction's ``dt_proj_b.bias`` like any linear bias, to zero (so softplus gives dt = 0.69 for
    every channel); we initialise it like the forward one, as Mamba intends.

    Args:
        d_model: model width (input and output channels).
        d_state: state size N per channel.
        d_conv: width of the causal depthwise convolution.
        expand: inner width is ``expand * d_model``.
        dt_rank: rank of the dt projection; None for Mamba's ``ceil(d_model / 16)``.
        dt_min: smallest initial dt.
        dt_max: largest initial dt.
        dt_init_floor: initial dt is clamped to at least this.
        dt_scale: scale of the dt projection's initial weights.
        conv_bias: bias in the depthwise convolutions.
        bias: bias in the input and output projections.
        backend: selective scan backend ("auto", "reference", "torch", "triton", "mamba_ssm"; see
            :func:`mmpretrain.ops.selective_scan.selective_scan`).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | None = None,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_scale: float = 1.0,
        conv_bias: bool = True,
        bias: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if d_model < 1 or d_state < 1 or d_conv < 1 or expand < 1:
            raise ValueError(f"BiMambaMixer: d_model, d_state, d_conv and expand must be positive, got "
                             f"{d_model}, {d_state}, {d_conv}, {expand}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"BiMambaMixer: need 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.d_inner = expand * d_model
        self.dt_rank = dt_rank if dt_rank is not None else math.ceil(d_model / 16)
        self.dt_min, self.dt_max, self.dt_init_floor, self.dt_scale = dt_min, dt_max, dt_init_floor, dt_scale
        self.backend = backend
        E, R, N = self.d_inner, self.dt_rank, d_state

        self.in_proj = nn.Linear(d_model, 2 * E, bias=bias)
        for suffix in ("", "_b"):
            self.add_module(f"conv1d{suffix}", nn.Conv1d(E, E, d_conv, groups=E, padding=d_conv - 1, bias=conv_bias))
            self.add_module(f"x_proj{suffix}", nn.Linear(E, R + 2 * N, bias=False))
            self.add_module(f"dt_proj{suffix}", nn.Linear(R, E, bias=True))
        self.A_log = nn.Parameter(torch.empty(E, N))
        self.A_b_log = nn.Parameter(torch.empty(E, N))
        self.D = nn.Parameter(torch.empty(E))
        self.D_b = nn.Parameter(torch.empty(E))
        self.out_proj = nn.Linear(E, d_model, bias=bias)
        self.reset_ssm_parameters()

    def reset_ssm_parameters(self) -> None:
        """Mamba's initialisation of dt_proj, A_log and D, for both directions (see the class docstring)."""
        std = self.dt_rank**-0.5 * self.dt_scale
        with torch.no_grad():
            for dt_proj in (self.dt_proj, self.dt_proj_b):
                nn.init.uniform_(dt_proj.weight, -std, std)
                init_dt_bias(dt_proj.bias, self.dt_min, self.dt_max, self.dt_init_floor)
            A = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=self.A_log.device)
            for A_log in (self.A_log, self.A_b_log):
                A_log.copy_(torch.log(A).expand_as(A_log))
            self.D.fill_(1.0)
            self.D_b.fill_(1.0)

    def no_weight_decay(self) -> set[str]:
        """Names (relative to this module) of the parameters that take no weight decay."""
        return {"A_log", "A_b_log", "D", "D_b"}

    def _scan(self, x: torch.Tensor, z: torch.Tensor, suffix: str, out_scale: float = 1.0,
              out_add: torch.Tensor | None = None) -> torch.Tensor:
        """One direction: projections and the gated selective scan of the convolved x; the backward direction
        (``suffix="_b"``) scans from the end. x, z (batch, E, L) -> (batch, E, L) (channels-contiguous on the
        triton path), times ``out_scale``, plus ``out_add`` (the scan's output epilogue)."""
        reverse = bool(suffix)
        x_proj: nn.Linear = getattr(self, f"x_proj{suffix}")
        dt_proj: nn.Linear = getattr(self, f"dt_proj{suffix}")
        A_log: torch.Tensor = self.A_log if not suffix else self.A_b_log
        D: torch.Tensor = self.D if not suffix else self.D_b
        w_x, w_dt, rank = x_proj.weight, dt_proj.weight, self.dt_rank
        if x.is_cuda and torch.compiler.is_compiling():  # sizes cuBLAS has fast kernels for (the same products)
            w_x, w_dt, rank = aligned_projections(w_x, w_dt, rank)
        x_dbl = F.linear(x.transpose(1, 2), w_x)  # (batch, L, rank + 2N); x_proj has no bias
        dt, B, C = torch.split(x_dbl, [rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dt, w_dt).transpose(1, 2)  # (batch, E, L); the bias goes in as delta_bias
        A = -torch.exp(at_least_fp32(A_log))
        B, C = B.transpose(1, 2), C.transpose(1, 2)  # (batch, N, L)
        if x.device.type == "meta":
            # shape propagation and FLOP counting (FlopCounterMode counts no elementwise work): nothing is
            # computed on meta tensors, and the chunked scan's loop over chunks took minutes there at long
            # sequences. The stand-in reads the same inputs, so every matrix product's backward remains.
            y = x + delta + B.sum(1, keepdim=True) + C.sum(1, keepdim=True) + A.sum() + D[:, None]
            y = (y + dt_proj.bias[:, None]) * z * out_scale
            return y + out_add if out_add is not None else y
        return selective_scan(
            x, delta, A, B, C, D=at_least_fp32(D), z=z, delta_bias=at_least_fp32(dt_proj.bias),
            delta_softplus=True, backend=self.backend, reverse=reverse, out_scale=out_scale, out_add=out_add,
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (batch, L, d_model) -> (batch, L, d_model)."""
        xz = self.in_proj(hidden)  # (batch, L, 2E)
        # (batch, E, L) views. chunk, not two slices: the backward of a slice fills a zero tensor of xz's size
        # and copies the slice's gradient in (two of each per block, then an add); chunk's is one concatenation
        x, z = (t.transpose(1, 2) for t in xz.chunk(2, dim=-1))
        # both directions' convolutions + SiLU (the backward one from the end) in one kernel each way on the triton
        # path: x read once, one dx for both
        fused = x.device.type != "meta" and resolve_backend(self.backend, x) == "triton"
        x_f, x_b = causal_conv1d_bidirectional(x, self.conv1d.weight, self.conv1d.bias, self.conv1d_b.weight,
                                               self.conv1d_b.bias, "silu", backend="triton" if fused else "reference")
        # Vim's "if_devide_out": the mean of the two directions, taken in the scans' output epilogue (on the triton
        # path the kernels scale each direction and the second adds the first's output as it stores its own)
        y = self._scan(x_b, z, "_b", out_scale=0.5, out_add=self._scan(x_f, z, "", out_scale=0.5))
        return self.out_proj(y.transpose(1, 2))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, d_conv={self.d_conv}, "
                f"dt_rank={self.dt_rank}, backend={self.backend!r}")
