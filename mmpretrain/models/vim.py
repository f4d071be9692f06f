"""Vision Mamba (Vim): a bidirectional state-space classifier with a class token in the middle of the sequence.

    import timm, mmpretrain.models.vim
    model = timm.create_model("vim_tiny", num_classes=1000)        # 7.1M parameters (Vim-Ti)
    model = timm.create_model("vim_tiny", stride=8)                 # overlapping patches: 27x27 tokens at 224
    model = timm.create_model("vim_lru_tiny")                       # the same network with LRU mixers

Architecture (Zhu et al. 2024, "Vision Mamba", the released "middle class token, bimamba v2, divide out"
variant): patch embedding (a convolution; ``stride < patch_size`` gives overlapping patches), a class
token inserted in the middle of the token sequence and read out there, a learned absolute position
embedding, ``depth`` pre-norm residual blocks (RMSNorm, a bidirectional mixer, drop path) with the residual
stream kept in float32, a final RMSNorm and a linear head. This is the order of Vim's fused add-norm blocks,
written as ordinary pre-norm blocks: the two are the same function.

Layout notes:
- The position embedding is stored as (1, 1 + num_patches, dim) with the class token's entry FIRST (timm's
  prefix-token layout), and added before the class token is moved to the middle. This is the same model as
  Vim's (a permutation of one parameter), and it lets timm's ``resample_abs_pos_embed`` (and the
  classification task's ``init_from``) resample it for another image size or stride. Official Vim
  checkpoints store that entry at index ``num_patches // 2``: :func:`convert_official_vim` moves it.
- Other parameter names follow Vim's (``layers.i.norm``, ``layers.i.mixer.*``, ``norm_f``, ``head``).

The model has timm's classifier surface (``forward_features``/``forward_head``, ``reset_classifier``,
``set_grad_checkpointing``, ``no_weight_decay``, ``group_matcher``, ``pretrained_cfg``), so
``mmpretrain.tasks.classification.ImageClassification(backbone="vim_tiny")`` trains it like any timm model.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath, lecun_normal_, resample_abs_pos_embed, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmpretrain.models.mamba import BiMambaMixer

__all__ = ["MIXERS", "PatchEmbed", "RMSNorm", "Vim", "VimBlock", "checkpoint_filter_fn", "convert_official_vim"]

MIXERS = ("mamba", "lru")


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale, computed in float32; returns the weight's dtype.

    Args:
        dim: normalised (last) dimension.
        eps: added to the mean square.
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)  # float32, or float64 for float64 inputs
        y = F.rms_norm(x.to(dtype), (x.shape[-1],), self.weight.to(dtype), self.eps)
        return y.to(self.weight.dtype)


class PatchEmbed(nn.Module):
    """Image to patch tokens by one convolution; ``stride < patch_size`` makes overlapping patches.

    Non-overlapping patches (``stride == patch_size``) are computed as one matrix product of the convolution's
    weight with the unfolded patches, the same sums: GPU libraries run a strided 16x16 convolution on three
    channels as an implicit GEMM plus layout conversions (cuDNN took 1.6 ms of a Vim-Ti training step at 224,
    batch 256, and 1.57 ms of an inference step at 1248, batch 16), where the product itself is a few
    microseconds' work. The weight stays a ``Conv2d``'s, so checkpoints and exports are unchanged.

    Args:
        img_size: input image size (int or (H, W)); inputs must have exactly this size.
        patch_size: patch (kernel) size.
        stride: step between patches; None for ``patch_size`` (non-overlapping).
        in_chans: input channels.
        embed_dim: token width.
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, stride: int | None = None,
                 in_chans: int = 3, embed_dim: int = 192) -> None:
        super().__init__()
        self.img_size = tuple(to_2tuple(img_size))
        self.patch_size = tuple(to_2tuple(patch_size))
        self.stride = tuple(to_2tuple(stride if stride is not None else patch_size))
        self.grid_size = tuple((i - p) // s + 1 for i, p, s in zip(self.img_size, self.patch_size, self.stride))
        if any(i < p for i, p in zip(self.img_size, self.patch_size)) or min(self.stride) < 1:
            raise ValueError(f"PatchEmbed: img_size {self.img_size} must be at least patch_size {self.patch_size} "
                             f"and stride {self.stride} positive")
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"Vim: input images are {tuple(x.shape[-2:])} but the model was built for "
                             f"img_size={self.img_size}; resize the inputs or build the model with that img_size")
        if self.stride != self.patch_size:
            return self.proj(x).flatten(2).transpose(1, 2)  # (batch, num_patches, embed_dim)
        (gh, gw), (ph, pw) = self.grid_size, self.patch_size
        x = x[..., :gh * ph, :gw * pw]  # the rows and columns a strided convolution would leave out
        patches = x.reshape(x.shape[0], x.shape[1], gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).flatten(3).flatten(1, 2)
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)  # (batch, gh * gw, embed_dim)


class VimBlock(nn.Module):
    """``x + drop_path(mixer(norm(x)))``, with the residual stream ``x`` kept in float32 if it is given so.

    Args:
        dim: token width.
        mixer: the sequence mixer, (batch, L, dim) -> (batch, L, dim).
        drop_path: stochastic depth rate of this block.
        norm_eps: RMSNorm epsilon.
    """

    def __init__(self, dim: int, mixer: nn.Module, drop_path: float = 0.0, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, eps=norm_eps)
        self.mixer = mixer
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.mixer(self.norm(x))).to(x.dtype)


def build_mixer(mixer: str, dim: int, d_state: int, d_conv: int, expand: int, dt_rank: int | None,
                backend: str, mixer_kwargs: dict[str, Any]) -> nn.Module:
    if mixer == "mamba":
        kwargs = dict(d_state=d_state, d_conv=d_conv, expand=expand, dt_rank=dt_rank, backend=backend)
        kwargs.update(mixer_kwargs)
        return BiMambaMixer(dim, **kwargs)
    if mixer == "lru":
        try:
            from mmpretrain.models.lru import BiLRUMixer
        except ImportError as err:
            raise ImportError(f"Vim(mixer='lru') needs mmpretrain.models.lru.BiLRUMixer, which does not import "
                              f"here ({err})") from err
        return BiLRUMixer(dim, **{"backend": backend, **mixer_kwargs})
    raise ValueError(f"Vim: unknown mixer {mixer!r}; choose one of {', '.join(MIXERS)}")


class Vim(nn.Module):
    """Vision Mamba classifier (see the module docstring).

    Args:
        img_size: input image size (int or (H, W)).
        patch_size: patch size.
        stride: patch-embedding stride; None for ``patch_size``. 8 with patch 16 is Vim's long-sequence
            fine-tune (27x27 = 729 patches at 224).
        in_chans: input channels.
        num_classes: classes of the linear head; 0 for no head (``forward`` returns the pooled features).
        global_pool: "token" reads the middle class token (Vim); "avg" averages all tokens.
        embed_dim: token width (192 Ti, 384 S, 768 B).
        depth: number of blocks.
        d_state: Mamba state size N per channel.
        expand: Mamba inner width factor.
        d_conv: Mamba causal conv width.
        dt_rank: Mamba dt projection rank; None for ceil(embed_dim / 16).
        mixer: "mamba" (:class:`~mmpretrain.models.mamba.BiMambaMixer`) or "lru"
            (:class:`~mmpretrain.models.lru.BiLRUMixer`, which ignores d_state/expand/d_conv/dt_rank: give its
            own arguments in ``mixer_kwargs``).
        mixer_kwargs: extra keyword arguments for the mixer (override the ones above).
        drop_rate: dropout before the head.
        pos_drop_rate: dropout after the position embedding is added (Vim's ``drop_rate``).
        drop_path_rate: stochastic depth, rising linearly from 0 at the first block to this at the last.
        norm_eps: RMSNorm epsilon.
        residual_in_fp32: keep the residual stream in float32 under mixed precision (Vim does).
        backend: scan backend of the mixers ("auto" picks triton on CUDA, torch elsewhere).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        stride: int | None = None,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 192,
        depth: int = 24,
        d_state: int = 16,
        expand: int = 2,
        d_conv: int = 4,
        dt_rank: int | None = None,
        mixer: str = "mamba",
        mixer_kwargs: dict[str, Any] | None = None,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-5,
        residual_in_fp32: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if global_pool not in ("token", "avg"):
            raise ValueError(f"Vim: global_pool must be 'token' or 'avg', got {global_pool!r}")
        if mixer not in MIXERS:
            raise ValueError(f"Vim: unknown mixer {mixer!r}; choose one of {', '.join(MIXERS)}")
        if depth < 1:
            raise ValueError(f"Vim: depth must be positive, got {depth}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1  # the class token, stored first in pos_embed (see the module docstring)
        self.no_embed_class = False
        self.mixer_type = mixer
        self.residual_in_fp32 = residual_in_fp32
        self.grad_checkpointing = False
        self.checkpoint_fn: Any = None  # recompute hook: fn(block, x) (mmpretrain.models.text.CheckpointFn)

        self.patch_embed = PatchEmbed(img_size, patch_size, stride, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_index = num_patches // 2  # where the class token sits in the sequence (Vim: M // 2)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.layers = nn.ModuleList(
            VimBlock(embed_dim, build_mixer(mixer, embed_dim, d_state, d_conv, expand, dt_rank, backend,
                                            dict(mixer_kwargs or {})), rates[i], norm_eps)
            for i in range(depth)
        )
        self.norm_f = RMSNorm(embed_dim, eps=norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    # -- initialisation -----------------------------------------------------------------------------------------
    def init_weights(self) -> None:
        """Vim's initialisation: trunc-normal(0.02) tokens and head, lecun-normal patch embedding, out_proj
        scaled by 1/sqrt(depth); the mixers' own SSM initialisation is done in their constructors."""
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        lecun_normal_(self.patch_embed.proj.weight)
        nn.init.zeros_(self.patch_embed.proj.bias)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        for layer in self.layers:
            out_proj = getattr(layer.mixer, "out_proj", None)
            if self.mixer_type == "mamba" and isinstance(out_proj, nn.Linear):
                nn.init.kaiming_uniform_(out_proj.weight, a=math.sqrt(5))
                with torch.no_grad():
                    out_proj.weight /= math.sqrt(len(self.layers))

    # -- timm's model surface ----------------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        names = {"pos_embed", "cls_token"}
        for i, layer in enumerate(self.layers):
            names |= {f"layers.{i}.mixer.{n}" for n in getattr(layer.mixer, "no_weight_decay", set)()}
        return names

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return {"stem": r"^cls_token|^pos_embed|^patch_embed",
                "blocks": [(r"^layers\.(\d+)", None), (r"^norm_f", (99999,))]}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True, checkpoint_fn: Any = None) -> None:
        """Recompute each block's activations in the backward pass: through ``checkpoint_fn(block, x)`` when given
        (DeepSpeed's, passed by the training task), else non-reentrant torch.utils.checkpoint."""
        self.grad_checkpointing = enable
        self.checkpoint_fn = checkpoint_fn

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            if global_pool not in ("token", "avg"):
                raise ValueError(f"Vim: global_pool must be 'token' or 'avg', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    # -- forward ------------------------------------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images (batch, C, H, W) -> tokens (batch, num_patches + 1, dim), the class token at ``cls_index``."""
        x = self.patch_embed(x) + self.pos_embed[:, 1:]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        i = self.cls_index
        return self.pos_drop(torch.cat([x[:, :i], cls.to(x.dtype), x[:, i:]], dim=1))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> normalised tokens (batch, num_patches + 1, dim) (the class token at ``cls_index``)."""
        x = self.embed(x)
        if self.residual_in_fp32:
            x = x.to(torch.promote_types(x.dtype, torch.float32))
        for layer in self.layers:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = self.checkpoint_fn(layer, x) if self.checkpoint_fn is not None else checkpoint(
                    layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return self.norm_f(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, self.cls_index] if self.global_pool == "token" else x.mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: Vim) -> dict[str, torch.Tensor]:
    """Adapt a Vim state dict (ours) to ``model``: unwrap ``model``/``state_dict`` entries, resample pos_embed."""
    for key in ("model", "state_dict"):
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
    out = dict(state_dict)
    pos = out.get("pos_embed")
    if pos is not None and pos.shape != model.pos_embed.shape:
        out["pos_embed"] = resample_abs_pos_embed(pos, new_size=list(model.patch_embed.grid_size), num_prefix_tokens=1)
    return out


def convert_official_vim(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict of hustvl/Vim's VisionMamba (middle class token, bimamba v2) in our layout.

    Parameter names are the same; only the position embedding differs: Vim stores the class token's entry
    at index ``num_patches // 2`` (where the token sits), we store it first. Unwraps a ``model`` entry.
    """
    if "model" in state_dict and isinstance(state_dict["model"], dict):
        state_dict = state_dict["model"]
    out = dict(state_dict)
    pos = out["pos_embed"]
    i = (pos.shape[1] - 1) // 2
    out["pos_embed"] = torch.cat([pos[:, i : i + 1], pos[:, :i], pos[:, i + 1 :]], dim=1)
    return out


# -- named configurations (timm registry) --------------------------------------------------------------------------
def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.875,
        "interpolation": "bicubic", "fixed_input_size": True, "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225), "first_conv": "patch_embed.proj", "classifier": "head",
        "license": "apache-2.0", "paper_ids": "arXiv:2401.09417", **kwargs,
    }


default_cfgs = generate_default_cfgs({name: _cfg() for name in (
    "vim_tiny", "vim_small", "vim_base", "vim_lru_tiny", "vim_lru_small",
)})


def _create_vim(variant: str, pretrained: bool = False, **kwargs: Any) -> Vim:
    model = build_model_with_cfg(Vim, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)
    # the data config (timm.data.resolve_data_config) should describe this model, not the preset's 224
    cfg = dict(model.pretrained_cfg)
    cfg["input_size"] = (model.patch_embed.proj.in_channels, *model.patch_embed.img_size)
    model.pretrained_cfg = model.default_cfg = cfg
    return model


@register_model
def vim_tiny(pretrained: bool = False, **kwargs: Any) -> Vim:
    """Vim-Ti: dim 192, depth 24, d_state 16, expand 2, patch 16 (7.15M parameters with a 1000-class head)."""
    args = dict(patch_size=16, embed_dim=192, depth=24, d_state=16, expand=2, d_conv=4)
    return _create_vim("vim_tiny", pretrained, **{**args, **kwargs})


@register_model
def vim_small(pretrained: bool = False, **kwargs: Any) -> Vim:
    """Vim-S: dim 384, depth 24, d_state 16, expand 2, patch 16."""
    args = dict(patch_size=16, embed_dim=384, depth=24, d_state=16, expand=2, d_conv=4)
    return _create_vim("vim_small", pretrained, **{**args, **kwargs})


@register_model
def vim_base(pretrained: bool = False, **kwargs: Any) -> Vim:
    """Vim-B: dim 768, depth 24, d_state 16, expand 2, patch 16."""
    args = dict(patch_size=16, embed_dim=768, depth=24, d_state=16, expand=2, d_conv=4)
    return _create_vim("vim_base", pretrained, **{**args, **kwargs})


def _lru_kwargs(d_state: int, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The preset's LRU state size under the caller's mixer_kwargs (which override it, key by key)."""
    return {**kwargs, "mixer": "lru", "mixer_kwargs": {"d_state": d_state, **(kwargs.get("mixer_kwargs") or {})}}


@register_model
def vim_lru_tiny(pretrained: bool = False, **kwargs: Any) -> Vim:
    """Vim-Ti's network with bidirectional LRU mixers (dim 192, depth 24, patch 16, expand 1); the LRU state
    size 112 matches Vim-Ti's parameter count (7.19M against 7.15M)."""
    args = dict(patch_size=16, embed_dim=192, depth=24)
    return _create_vim("vim_lru_tiny", pretrained, **{**args, **_lru_kwargs(112, kwargs)})


@register_model
def vim_lru_small(pretrained: bool = False, **kwargs: Any) -> Vim:
    """Vim-S's network with bidirectional LRU mixers (dim 384, depth 24, patch 16, expand 1); the LRU state
    size 192 matches Vim-S's parameter count (25.58M against 25.80M)."""
    args = dict(patch_size=16, embed_dim=384, depth=24)
    return _create_vim("vim_lru_small", pretrained, **{**args, **_lru_kwargs(192, kwargs)})
