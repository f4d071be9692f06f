"""Vision Mamba (Vim) classifiers exported by mmpretrain, as transformers remote code.

Self-contained: needs torch and transformers only, never mmpretrain (nor mamba_ssm or causal_conv1d).
The scans are written in plain PyTorch as chunked parallel scans: exact (no approximation), on any device,
memory bounded by one chunk; not as fast on GPU as mmpretrain's fused kernels.

    from transformers import AutoModelForImageClassification
    model = AutoModelForImageClassification.from_pretrained(directory, trust_remote_code=True)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput

from .configuration_mmpretrain_vim import VimConfig


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scans run in float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


# -- scans ---------------------------------------------------------------------------------------------------------
def _decay_matrix(dA: torch.Tensor) -> torch.Tensor:
    """dA (..., T) -> (..., T, T) with [t, j] = exp(dA[j+1] + ... + dA[t]) for j <= t, 0 above the diagonal.

    Each exponent is a sum of increments (a cumulative sum of a masked matrix), never a difference of two
    cumulative sums, so nothing cancels.
    """
    T = dA.shape[-1]
    ones = torch.ones(T, T, dtype=torch.bool, device=dA.device)
    after_j = torch.tril(ones, diagonal=-1)  # [k, j]: k > j
    x = dA.unsqueeze(-1).expand(*dA.shape, T).masked_fill(~after_j, 0.0)  # [..., k, j] = dA[k] for k > j
    exponent = torch.cumsum(x, dim=-2)  # [..., t, j] = sum over j < k <= t
    return torch.exp(exponent).masked_fill(~torch.tril(ones), 0.0)


def selective_scan(u, delta, A, B, C, D, z, delta_bias, chunk_size: int = 16) -> torch.Tensor:
    """Mamba's selective scan with the softplus'ed, biased delta and the silu(z) gate.

    u, delta, z (batch, d, L); A (d, n); B, C (batch, n, L); D, delta_bias (d,). Returns (batch, d, L) in
    the compute dtype:  x_t = exp(delta_t A) x_{t-1} + delta_t B_t u_t,  y_t = (C_t . x_t + D u_t) silu(z_t).
    """
    ct = _compute_dtype(u.dtype)
    u, z, A, B, C = (t.to(ct) for t in (u, z, A, B, C))
    delta = F.softplus(delta.to(ct) + delta_bias.to(ct)[:, None])
    batch, d, L = u.shape
    state = u.new_zeros(batch, d, A.shape[1])
    ys = []
    for start in range(0, L, chunk_size):
        sl = slice(start, start + chunk_size)
        dt = delta[..., sl]  # (batch, d, T)
        dA = dt[:, :, None, :] * A[None, :, :, None]  # (batch, d, n, T)
        dBu = (dt * u[..., sl])[:, :, None, :] * B[:, None, :, sl]  # (batch, d, n, T)
        h = (_decay_matrix(dA) * dBu[..., None, :]).sum(-1)  # (batch, d, n, T)
        h = h + torch.exp(torch.cumsum(dA, dim=-1)) * state[..., None]
        ys.append((h * C[:, None, :, sl]).sum(2))
        state = h[..., -1]
    y = torch.cat(ys, dim=-1) + D.to(ct)[:, None] * u
    return y * F.silu(z)


def complex_linear_scan(log_lam: torch.Tensor, v: torch.Tensor, chunk_size: int = 64) -> torch.Tensor:
    """h_t = lam * h_{t-1} + v_t with h_{-1} = 0, lam = exp(log_lam) (n,) complex, v (batch, L, n) complex."""
    batch, L, n = v.shape
    state = v.new_zeros(batch, n)
    steps = torch.arange(chunk_size, device=v.device)
    hs = []
    for start in range(0, L, chunk_size):
        vc = v[:, start:start + chunk_size]
        T = vc.shape[1]
        lag = (steps[:T, None] - steps[None, :T])  # t - j
        powers = torch.exp(lag.clamp(min=0)[..., None].to(log_lam.real.dtype) * log_lam)  # (T, T, n)
        powers = powers.masked_fill((lag < 0)[..., None], 0)
        h = torch.einsum("tjn,bjn->btn", powers, vc)
        h = h + torch.exp((steps[:T, None] + 1).to(log_lam.real.dtype) * log_lam)[None] * state[:, None]
        hs.append(h)
        state = h[:, -1]
    return torch.cat(hs, dim=1)


# -- layers --------------------------------------------------------------------------------------------------------
class VimRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ct = _compute_dtype(x.dtype)
        x = x.to(ct)
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.to(ct)
        return y.to(self.weight.dtype)


class VimPatchEmbed(nn.Module):
    """Image to patch tokens with the weight of one ``Conv2d`` (``self.proj``).

    Non-overlapping patches (stride == patch_size) are one matrix product of the unfolded patches with the conv's
    weight, the same sums (GPU libraries run a strided 16x16 conv on three channels slowly); overlapping strides
    keep the convolution.
    """

    def __init__(self, config: VimConfig) -> None:
        super().__init__()
        self.image_size = tuple(config.image_size)
        p, s = config.patch_size, config.stride
        self.patch_size, self.stride = p, s
        self.grid_size = tuple((i - p) // s + 1 for i in self.image_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=p, stride=s)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if tuple(pixel_values.shape[-2:]) != self.image_size:
            raise ValueError(f"Vim: pixel_values are {tuple(pixel_values.shape[-2:])} but the model takes "
                             f"{self.image_size}; use the image processor saved with the model")
        x = pixel_values.to(self.proj.weight.dtype)
        if self.stride != self.patch_size:
            return self.proj(x).flatten(2).transpose(1, 2)  # (batch, num_patches, hidden_size)
        (gh, gw), p = self.grid_size, self.patch_size
        x = x[..., :gh * p, :gw * p]  # the rows and columns a strided conv would leave out
        patches = x.reshape(x.shape[0], x.shape[1], gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).flatten(3).flatten(1, 2)
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)  # (batch, gh * gw, hidden_size)


class VimMambaMixer(nn.Module):
    """Bidirectional Mamba (Vim v2): shared in/out projections and gate, per direction conv, x_proj, dt_proj, A, D."""

    def __init__(self, config: VimConfig) -> None:
        super().__init__()
        H, E, N, R = config.hidden_size, config.expand * config.hidden_size, config.d_state, config.dt_rank
        self.d_state, self.dt_rank, self.chunk_size = N, R, config.scan_chunk_size
        self.in_proj = nn.Linear(H, 2 * E, bias=config.mixer_bias)
        for suffix in ("", "_b"):
            self.add_module(f"conv1d{suffix}", nn.Conv1d(E, E, config.d_conv, groups=E, padding=config.d_conv - 1,
                                                         bias=config.conv_bias))
            self.add_module(f"x_proj{suffix}", nn.Linear(E, R + 2 * N, bias=False))
            self.add_module(f"dt_proj{suffix}", nn.Linear(R, E, bias=True))
        A_log = torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(E, 1)
        self.A_log = nn.Parameter(A_log)
        self.A_b_log = nn.Parameter(A_log.clone())
        self.D = nn.Parameter(torch.ones(E))
        self.D_b = nn.Parameter(torch.ones(E))
        self.out_proj = nn.Linear(E, H, bias=config.mixer_bias)

    def _direction(self, x: torch.Tensor, z: torch.Tensor, suffix: str) -> torch.Tensor:
        conv, x_proj, dt_proj = (getattr(self, f"{n}{suffix}") for n in ("conv1d", "x_proj", "dt_proj"))
        A_log, D = (self.A_log, self.D) if not suffix else (self.A_b_log, self.D_b)
        L = x.shape[-1]
        x = F.silu(conv(x)[..., :L])  # causal: keep the outputs that saw only the left padding
        dt, B, C = torch.split(x_proj(x.transpose(1, 2)), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dt, dt_proj.weight).transpose(1, 2)
        A = -torch.exp(A_log.to(_compute_dtype(A_log.dtype)))
        return selective_scan(x, delta, A, B.transpose(1, 2), C.transpose(1, 2), D, z, dt_proj.bias,
                              self.chunk_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x, z = self.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)
        y = self._direction(x, z, "")
        y_b = self._direction(x.flip(-1), z.flip(-1), "_b").flip(-1)
        y = 0.5 * (y + y_b)
        return self.out_proj(y.transpose(1, 2).to(self.out_proj.weight.dtype))


class VimLRU(nn.Module):
    """One direction of the Linear Recurrent Unit: x_t = lam x_{t-1} + gamma B u_t, y_t = Re(C x_t) + D u_t."""

    def __init__(self, d_model: int, d_state: int, chunk_size: int) -> None:
        super().__init__()
        self.chunk_size = chunk_size
        N, H = d_state, d_model
        for name, shape in (("nu_log", (N,)), ("theta_log", (N,)), ("gamma_log", (N,)), ("B_re", (N, H)),
                            ("B_im", (N, H)), ("C_re", (H, N)), ("C_im", (H, N)), ("D", (H,))):
            self.register_parameter(name, nn.Parameter(torch.zeros(shape)))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        ct = _compute_dtype(u.dtype)
        cplx = torch.complex128 if ct == torch.float64 else torch.complex64
        p = {n: t.to(ct) for n, t in self.named_parameters()}
        log_lam = torch.complex(-torch.exp(p["nu_log"]), torch.exp(p["theta_log"]))
        B = torch.complex(p["B_re"], p["B_im"]) * torch.exp(p["gamma_log"])[:, None]
        C = torch.complex(p["C_re"], p["C_im"])
        u = u.to(ct)
        h = complex_linear_scan(log_lam, u.to(cplx) @ B.transpose(0, 1), self.chunk_size)
        return (h @ C.transpose(0, 1)).real + u * p["D"]


class VimLRUMixer(nn.Module):
    """Bidirectional LRU mixer: shared in/out projections and silu gate, one LRU per direction."""

    def __init__(self, config: VimConfig) -> None:
        super().__init__()
        H, E = config.hidden_size, config.expand * config.hidden_size
        self.in_proj = nn.Linear(H, 2 * E, bias=config.mixer_bias)
        self.lru_fwd = VimLRU(E, config.d_state, 4 * config.scan_chunk_size)
        self.lru_bwd = VimLRU(E, config.d_state, 4 * config.scan_chunk_size)
        self.out_proj = nn.Linear(E, H, bias=config.mixer_bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        value, gate = self.in_proj(hidden).chunk(2, dim=-1)
        y = 0.5 * (self.lru_fwd(value) + self.lru_bwd(value.flip(1)).flip(1))
        y = y * F.silu(gate.to(y.dtype))
        return self.out_proj(y.to(self.out_proj.weight.dtype))


class VimLayer(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x))."""

    def __init__(self, config: VimConfig) -> None:
        super().__init__()
        self.norm = VimRMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mixer = VimMambaMixer(config) if config.mixer == "mamba" else VimLRUMixer(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mixer(self.norm(x)).to(x.dtype)


# -- models --------------------------------------------------------------------------------------------------------
class VimPreTrainedModel(PreTrainedModel):
    config_class = VimConfig
    base_model_prefix = "vim"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    _no_split_modules = ["VimLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        """The modules initialise themselves when built (the Mamba parameters as Mamba does, linear layers as
        PyTorch does); an exported checkpoint holds every weight, so nothing is re-initialised here."""


class VimModel(VimPreTrainedModel):
    """Vim backbone: ``last_hidden_state`` (batch, num_patches + 1, hidden) with the class token at
    ``cls_index`` (the middle), ``pooler_output`` that token (or the mean of all tokens)."""

    def __init__(self, config: VimConfig) -> None:
        super().__init__(config)
        self.patch_embed = VimPatchEmbed(config)
        num_patches = self.patch_embed.num_patches
        self.cls_index = num_patches // 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        # the class token's entry first, the patches' after it; added before the token moves to the middle
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, config.hidden_size))
        self.layers = nn.ModuleList(VimLayer(config) for _ in range(config.num_hidden_layers))
        self.norm_f = VimRMSNorm(config.hidden_size, eps=config.norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        output_hidden_states = bool(output_hidden_states if output_hidden_states is not None
                                    else self.config.output_hidden_states)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        x = self.patch_embed(pixel_values) + self.pos_embed[:, 1:]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1).to(x.dtype)
        i = self.cls_index
        x = torch.cat([x[:, :i], cls, x[:, i:]], dim=1)
        if self.config.residual_in_fp32:
            x = x.to(_compute_dtype(x.dtype))
        hidden_states = (x,) if output_hidden_states else None
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = self._gradient_checkpointing_func(layer.__call__, x)
            else:
                x = layer(x)
            if output_hidden_states:
                hidden_states = hidden_states + (x,)
        x = self.norm_f(x)
        pooled = x[:, i] if self.config.global_pool == "token" else x.mean(dim=1)
        if not return_dict:
            return tuple(v for v in (x, pooled, hidden_states) if v is not None)
        return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=pooled, hidden_states=hidden_states)


class VimForImageClassification(VimPreTrainedModel):
    """Vim with a linear classifier on the pooled token."""

    def __init__(self, config: VimConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vim = VimModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutput | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.vim(pixel_values, output_hidden_states=output_hidden_states, return_dict=True)
        logits = self.classifier(outputs.pooler_output.to(self.classifier.weight.dtype)
                                 if isinstance(self.classifier, nn.Linear) else outputs.pooler_output)
        loss = None
        if labels is not None:
            loss = self._loss(logits, labels.to(logits.device))
        if not return_dict:
            out = (logits,) + ((outputs.hidden_states,) if outputs.hidden_states is not None else ())
            return ((loss,) + out) if loss is not None else out
        return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        problem = self.config.problem_type
        if problem is None:
            if self.num_labels == 1:
                problem = "regression"
            elif labels.dtype in (torch.long, torch.int):
                problem = "single_label_classification"
            else:
                problem = "multi_label_classification"
        if problem == "regression":
            if self.num_labels == 1:
                return F.mse_loss(logits.float().view(-1), labels.float().view(-1))
            return F.mse_loss(logits.float(), labels.float())
        if problem == "single_label_classification":
            return F.cross_entropy(logits.float().view(-1, self.num_labels), labels.view(-1))
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


__all__ = ["VimForImageClassification", "VimModel", "VimPreTrainedModel", "complex_linear_scan", "selective_scan"]
