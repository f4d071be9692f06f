"""timm Vision Transformer classifiers -> transformers ``ViTForImageClassification`` (no custom code)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn


class UnsupportedArchitecture(ValueError):
    """The model has no exact counterpart among transformers' native classes."""


def check_vit(model: nn.Module) -> None:
    """Raise :class:`UnsupportedArchitecture` naming the first difference from transformers' ViT."""
    name = type(model).__name__

    def fail(why: str) -> None:
        raise UnsupportedArchitecture(
            f"{name} cannot be exported as transformers.ViTForImageClassification: {why}. Only plain timm "
            f"ViT/DeiT classifiers (class token, no register tokens, pre-norm blocks, GELU MLP, no layer scale) "
            f"map onto it."
        )

    if not isinstance(model, VisionTransformer):
        fail("it is not a timm VisionTransformer")
    if model.cls_token is None or model.global_pool != "token":
        fail(f"it pools by {model.global_pool!r} rather than at a class token")
    if getattr(model, "num_reg_tokens", 0):
        fail("it has register tokens")
    if getattr(model, "no_embed_class", False) or model.pos_embed is None:
        fail("its position embedding does not cover the class token")
    if getattr(model, "dynamic_img_size", False):
        fail("it uses dynamic image sizes")
    for attr in ("norm_pre", "fc_norm", "head_drop"):
        mod = getattr(model, attr, None)
        if mod is not None and not isinstance(mod, (nn.Identity, nn.Dropout)):
            fail(f"it has a {attr} layer")
    if getattr(model, "attn_pool", None) is not None:
        fail("it pools with attention")
    if not isinstance(model.head, nn.Linear):
        fail("its head is not one linear layer")
    if model.patch_embed.proj.bias is None:
        fail("its patch embedding has no bias")
    for i, block in enumerate(model.blocks):
        parts = {"ls1": block.ls1, "ls2": block.ls2, "q_norm": block.attn.q_norm, "k_norm": block.attn.k_norm}
        for part, mod in parts.items():
            if not isinstance(mod, nn.Identity):
                fail(f"block {i} has {part}")
        if getattr(block.attn, "norm", None) is not None and not isinstance(block.attn.norm, nn.Identity):
            fail(f"block {i} normalises inside attention")
        if block.attn.qkv.bias is None:
            fail(f"block {i} has no qkv bias")
        act = getattr(block.mlp, "act", None)
        if not isinstance(act, nn.GELU) or getattr(act, "approximate", "none") != "none":
            fail(f"block {i} MLP activation is {type(act).__name__}, not exact GELU")
        if not hasattr(block.mlp, "fc1") or not isinstance(getattr(block.mlp, "norm", nn.Identity()), nn.Identity):
            fail(f"block {i} MLP is not fc1-GELU-fc2")
        if not isinstance(block.norm1, nn.LayerNorm):
            fail(f"block {i} normalises with {type(block.norm1).__name__}, not LayerNorm")


def vit_config(model: VisionTransformer, class_names: list[str]) -> Any:
    from transformers import ViTConfig

    block = model.blocks[0]
    img_size = model.patch_embed.img_size
    patch = model.patch_embed.patch_size
    if img_size[0] != img_size[1] or patch[0] != patch[1]:
        raise UnsupportedArchitecture(f"non-square image {img_size} or patch {patch}: transformers' ViT takes squares")
    return ViTConfig(
        hidden_size=model.embed_dim,
        num_hidden_layers=len(model.blocks),
        num_attention_heads=block.attn.num_heads,
        intermediate_size=block.mlp.fc1.out_features,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=block.norm1.eps,
        image_size=img_size[0],
        patch_size=patch[0],
        num_channels=model.patch_embed.proj.in_channels,
        qkv_bias=True,
        num_labels=model.num_classes,
        id2label={i: n for i, n in enumerate(class_names)},
        label2id={n: i for i, n in enumerate(class_names)},
        architectures=["ViTForImageClassification"],
    )


# transformers renamed ViT's submodules in 5.0; both layouts are written as the installed version expects
_LAYOUTS = {
    "v5": {
        "layer": "vit.layers.{i}.",
        "qkv": ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
        "attn.proj": "attention.o_proj",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    },
    "v4": {
        "layer": "vit.encoder.layer.{i}.",
        "qkv": ("attention.attention.query", "attention.attention.key", "attention.attention.value"),
        "attn.proj": "attention.output.dense",
        "mlp.fc1": "intermediate.dense",
        "mlp.fc2": "output.dense",
    },
}


def vit_state_dict(model: VisionTransformer, layout: str = "v5") -> dict[str, torch.Tensor]:
    """timm parameter names -> transformers' ViTForImageClassification names (qkv split in three)."""
    names = _LAYOUTS[layout]
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    dim = model.embed_dim
    out = {
        "vit.embeddings.cls_token": sd["cls_token"],
        "vit.embeddings.position_embeddings": sd["pos_embed"],
        "vit.embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "vit.embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "vit.layernorm.weight": sd["norm.weight"],
        "vit.layernorm.bias": sd["norm.bias"],
        "classifier.weight": sd["head.weight"],
        "classifier.bias": sd["head.bias"],
    }
    for i in range(len(model.blocks)):
        src, dst = f"blocks.{i}.", names["layer"].format(i=i)
        qkv_w, qkv_b = sd[src + "attn.qkv.weight"], sd[src + "attn.qkv.bias"]
        for j, name in enumerate(names["qkv"]):
            out[dst + f"{name}.weight"] = qkv_w[j * dim : (j + 1) * dim].clone()
            out[dst + f"{name}.bias"] = qkv_b[j * dim : (j + 1) * dim].clone()
        pairs = {"norm1": "layernorm_before", "norm2": "layernorm_after"}
        pairs.update({k: names[k] for k in ("attn.proj", "mlp.fc1", "mlp.fc2")})
        for a, b in pairs.items():
            out[dst + b + ".weight"] = sd[src + a + ".weight"]
            out[dst + b + ".bias"] = sd[src + a + ".bias"]
    return {k: v.contiguous() for k, v in out.items()}


def image_processor(image_size: int, mean, std, crop_pct: float | None, interpolation: str) -> Any:
    """An image processor that prepares images as our evaluation transform does (timm's resize + center crop)."""
    from transformers import ConvNextImageProcessor
    from transformers.image_utils import PILImageResampling

    resample = {"bicubic": PILImageResampling.BICUBIC, "bilinear": PILImageResampling.BILINEAR}.get(
        interpolation, PILImageResampling.BICUBIC
    )
    # ConvNext's processor resizes the shorter side to size/crop_pct and center-crops to size: exactly
    # timm's evaluation transform (for sizes under 384)
    return ConvNextImageProcessor(
        size={"shortest_edge": image_size},
        crop_pct=crop_pct if crop_pct is not None else 0.875,
        resample=resample,
        image_mean=list(mean),
        image_std=list(std),
    )


def export_vit(model: nn.Module, output: Path, class_names: list[str], data_hparams: dict[str, Any]) -> Path:
    """Write ``output`` so that ``ViTForImageClassification.from_pretrained(output)`` loads it, safetensors only."""
    from transformers import ViTForImageClassification

    check_vit(model)
    config = vit_config(model, class_names)
    hf = ViTForImageClassification(config)
    layout = "v5" if "vit.layers.0.attention.q_proj.weight" in hf.state_dict() else "v4"
    missing, unexpected = hf.load_state_dict(vit_state_dict(model, layout), strict=False)
    missing = [k for k in missing if "pooler" not in k]
    if missing or unexpected:
        raise UnsupportedArchitecture(f"weights do not map onto ViT: missing {missing}, unexpected {unexpected}")
    hf.save_pretrained(output, safe_serialization=True)
    eval_args = data_hparams.get("eval_transform") or {}
    processor = image_processor(
        int(data_hparams.get("image_size", config.image_size)),
        data_hparams.get("mean", (0.485, 0.456, 0.406)),
        data_hparams.get("std", (0.229, 0.224, 0.225)),
        eval_args.get("crop_pct"),
        eval_args.get("interpolation", "bilinear"),  # timm create_transform default
    )
    processor.save_pretrained(output)
    return output
