"""CLIP: a timm Vision Transformer and a causal text transformer embedded into one joint space.

Named configurations (``create_clip(name, **overrides)``; ``list_clip_models()``):

================  =========================================================================  ==========
name              layout                                                                     parameters
================  =========================================================================  ==========
``clip_vit_b32``  open_clip ViT-B-32: ViT-B/32 at 224 px, text 12 x 512 (8 heads), joint 512    151.28M
``clip_vit_b16``  open_clip ViT-B-16: ViT-B/16 at 224 px, text 12 x 512 (8 heads), joint 512    149.62M
``clip_demo``     4-layer 128-wide towers, 64 px images, 32 tokens: CPU demos and tests          2.18M
================  =========================================================================  ==========

Overrides are :class:`CLIP` constructor arguments; dictionaries (``vision_kwargs``, ``text_kwargs``) update
the configuration's own, so ``create_clip("clip_vit_b16", text_kwargs={"vocab_size": 32000, "eot_id": 2})``
keeps every other text setting. Weights are never downloaded: every model starts from its initialisation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mmpretrain.models.text import CheckpointFn, TextTransformer

__all__ = ["CLIP", "VisionTower", "clip_demo", "clip_vit_b16", "clip_vit_b32", "create_clip", "list_clip_models"]

# timm's VisionTransformer arguments for the CLIP layout when the tower is given by its dimensions
# (no model name): class token, pre-norm (open_clip's ln_pre), final norm, LayerNorm eps 1e-5, token pooling.
CLIP_VIT_DEFAULTS: dict[str, Any] = dict(
    img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
    class_token=True, global_pool="token", pre_norm=True, final_norm=True,
)


class VisionTower(nn.Module):
    """A timm image model pooled at its class token and projected (no bias) to ``output_dim``.

    Args:
        model_name: a timm model name. The ``*_clip_*`` ViTs (``vit_base_patch16_clip_224`` ...) have the
            CLIP layout; other names keep their own layout unless ``timm_kwargs`` change it
            (``pre_norm=True``, ``global_pool="token"``). ``None``: timm's ``VisionTransformer`` in the
            CLIP layout (:data:`CLIP_VIT_DEFAULTS`) with the dimensions in ``timm_kwargs``.
        output_dim: joint embedding size.
        timm_kwargs: keyword arguments for ``timm.create_model`` / ``VisionTransformer`` (``img_size``,
            ``patch_size``, ``embed_dim``, ``depth``, ``num_heads``, ``drop_path_rate`` ...).

    Initialisation: timm's for the blocks; open_clip's N(0, width^-0.5) for the class token, the position
    embedding and the projection.
    """

    def __init__(self, model_name: str | None = None, output_dim: int = 512,
                 timm_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        kwargs = dict(timm_kwargs or {})
        if kwargs.pop("pretrained", False):
            raise ValueError("vision_kwargs.pretrained: weights are never downloaded; load a checkpoint instead")
        if kwargs.pop("num_classes", 0):
            raise ValueError("vision_kwargs.num_classes: the CLIP image tower has no classifier head")
        try:
            if model_name is None:
                kwargs = {**CLIP_VIT_DEFAULTS, **kwargs}
                kwargs.setdefault("norm_layer", partial(nn.LayerNorm, eps=1e-5))
                self.trunk = VisionTransformer(num_classes=0, **kwargs)
            else:
                if not timm.is_model(model_name):
                    raise ValueError(
                        f"vision_model: {model_name!r} is not a timm model name (see timm.list_models('vit_*'))"
                    )
                self.trunk = timm.create_model(model_name, pretrained=False, num_classes=0, **kwargs)
        except TypeError as err:
            raise ValueError(f"vision_kwargs for {model_name or 'VisionTransformer'}: {err}") from None
        self.width = self.trunk.num_features
        self.proj = nn.Linear(self.width, output_dim, bias=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        std = self.width**-0.5
        for name in ("cls_token", "pos_embed"):
            param = getattr(self.trunk, name, None)
            if isinstance(param, nn.Parameter) and param.requires_grad:
                nn.init.normal_(param, std=std)
        nn.init.normal_(self.proj.weight, std=std)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's per-block checkpointing (torch.utils.checkpoint, non-reentrant unless TIMM_REENTRANT_CKPT=1)."""
        self.trunk.set_grad_checkpointing(enable)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``(batch, 3, H, W)`` -> projected, unnormalised image features ``(batch, output_dim)``."""
        return self.proj(self.trunk(images))


class CLIP(nn.Module):
    """Image and text towers with a learnable temperature (and, for SigLIP, a learnable bias).

    Args:
        embed_dim: joint embedding size (both projections' output).
        vision_model: timm model name of the image tower, or ``None`` for timm's ``VisionTransformer`` in the
            CLIP layout with the dimensions in ``vision_kwargs`` (see :class:`VisionTower`).
        vision_kwargs: keyword arguments for the timm model (``img_size``, ``patch_size``, ``embed_dim``,
            ``depth``, ``num_heads``, ``drop_path_rate`` ...).
        text_kwargs: :class:`~mmpretrain.models.text.TextTransformer` arguments (``vocab_size``,
            ``context_length``, ``width``, ``heads``, ``layers``, ``eot_id`` ...); ``output_dim`` is ``embed_dim``.
        siglip: SigLIP's sigmoid-loss parametrisation: logit scale starts at ln(10) and a learnable logit
            bias at -10 (instead of ln(1/0.07) and no bias).
        init_logit_scale: initial log of the logit scale (default: ln(1/0.07), or ln(10) with ``siglip``).
        init_logit_bias: initial logit bias with ``siglip`` (default -10).

    The defaults are open_clip's ViT-B-16 (see :func:`clip_vit_b16`).
    """

    def __init__(
        self,
        embed_dim: int = 512,
        vision_model: str | None = "vit_base_patch16_clip_224",
        vision_kwargs: dict[str, Any] | None = None,
        text_kwargs: dict[str, Any] | None = None,
        siglip: bool = False,
        init_logit_scale: float | None = None,
        init_logit_bias: float | None = None,
    ) -> None:
        super().__init__()
        text_kwargs = dict(text_kwargs or {})
        if text_kwargs.setdefault("output_dim", embed_dim) != embed_dim:
            raise ValueError(
                f"text_kwargs.output_dim ({text_kwargs['output_dim']}) differs from embed_dim ({embed_dim}); "
                "set embed_dim only"
            )
        if init_logit_bias is not None and not siglip:
            raise ValueError("init_logit_bias is for the SigLIP parametrisation: set siglip: true as well")
        self.embed_dim = embed_dim
        self.siglip = siglip
        self.visual = VisionTower(vision_model, embed_dim, vision_kwargs)
        self.text = TextTransformer(**text_kwargs)
        if init_logit_scale is None:
            init_logit_scale = math.log(10.0) if siglip else math.log(1 / 0.07)
        # one-element vectors, not 0-d scalars: DeepSpeed's ZeRO bf16 paths view parameters as bytes, which
        # a 0-d tensor refuses; checkpoints that hold them as 0-d scalars still load (_load_from_state_dict)
        self.logit_scale = nn.Parameter(torch.full((1,), float(init_logit_scale)))
        if siglip:
            bias = -10.0 if init_logit_bias is None else float(init_logit_bias)
            self.logit_bias = nn.Parameter(torch.full((1,), bias))
        else:
            self.register_parameter("logit_bias", None)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("logit_scale", "logit_bias"):
            value = state_dict.get(prefix + name)
            if isinstance(value, torch.Tensor) and value.dim() == 0:
                state_dict[prefix + name] = value.reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def context_length(self) -> int:
        return self.text.context_length

    @property
    def image_size(self) -> tuple[int, int] | None:
        patch_embed = getattr(self.visual.trunk, "patch_embed", None)
        size = getattr(patch_embed, "img_size", None)
        return tuple(size) if size is not None else None

    def set_grad_checkpointing(self, enable: bool = True, checkpoint_fn: CheckpointFn | None = None) -> None:
        """Per-block activation checkpointing in both towers; ``checkpoint_fn`` (see
        :data:`~mmpretrain.models.text.CheckpointFn`) applies to our text tower, the timm image tower uses timm's."""
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable, checkpoint_fn=checkpoint_fn)

    @torch.no_grad()
    def clamp_logit_scale(self, max: float = math.log(100)) -> None:  # noqa: A002 (the usual name)
        """Keep the log logit scale in [0, max] (ln(100) by default); call after each optimizer step."""
        self.logit_scale.clamp_(0, max)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        features = self.visual(images)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        features = self.text(tokens)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(
        self, images: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """-> (unit image features, unit text features, exp(logit_scale), logit_bias or None)."""
        return self.encode_image(images), self.encode_text(tokens), self.logit_scale.exp(), self.logit_bias


# ---------------------------------------------------------------------------------------- named configs

_TEXT_B: dict[str, Any] = dict(vocab_size=49408, context_length=77, width=512, heads=8, layers=12)


def _build(preset: dict[str, Any], overrides: dict[str, Any]) -> CLIP:
    args = dict(preset)
    for key, value in overrides.items():
        if key in ("vision_kwargs", "text_kwargs") and isinstance(value, dict):
            args[key] = {**args.get(key, {}), **value}
        else:
            args[key] = value
    return CLIP(**args)


def clip_vit_b32(**overrides: Any) -> CLIP:
    """open_clip's ViT-B-32: ViT-B/32 at 224 px, 12 x 512 text transformer, joint dim 512 (151.28M)."""
    return _build(dict(embed_dim=512, vision_model="vit_base_patch32_clip_224", text_kwargs=_TEXT_B), overrides)


def clip_vit_b16(**overrides: Any) -> CLIP:
    """open_clip's ViT-B-16: ViT-B/16 at 224 px, 12 x 512 text transformer, joint dim 512 (149.62M)."""
    return _build(dict(embed_dim=512, vision_model="vit_base_patch16_clip_224", text_kwargs=_TEXT_B), overrides)


def clip_demo(**overrides: Any) -> CLIP:
    """A tiny CLIP for CPU demos and tests: 64 px images in 8 px patches, 4 x 128 towers, 32 tokens."""
    return _build(
        dict(
            embed_dim=128,
            vision_model=None,
            vision_kwargs=dict(img_size=64, patch_size=8, embed_dim=128, depth=4, num_heads=4),
            text_kwargs=dict(vocab_size=4096, context_length=32, width=128, heads=4, layers=4),
        ),
        overrides,
    )


CLIP_MODELS: dict[str, Callable[..., CLIP]] = {
    "clip_vit_b32": clip_vit_b32,
    "clip_vit_b16": clip_vit_b16,
    "clip_demo": clip_demo,
}


def list_clip_models() -> list[str]:
    return sorted(CLIP_MODELS)


def create_clip(name: str, **overrides: Any) -> CLIP:
    """Build the named configuration (see the module docstring), with ``CLIP`` arguments overridden."""
    try:
        factory = CLIP_MODELS[name]
    except KeyError:
        raise ValueError(f"unknown CLIP configuration {name!r}; choose one of {list_clip_models()}") from None
    return factory(**overrides)
