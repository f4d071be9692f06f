"""CLIP models -> transformers ``CLIPModel`` with its tokenizer and image processor (no custom code).

The directory holds ``config.json`` and ``model.safetensors`` (``CLIPModel.from_pretrained(dir)``), the data's
tokenizer as a ``PreTrainedTokenizerFast`` (``tokenizer.json`` with a post-processor that adds the
begin- and end-of-text tokens as training did, padding with the training pad token, ``model_max_length``
= the text context) and a ``CLIPImageProcessor`` doing the evaluation transform (resize of the shorter side
to ``floor(image_size / crop_pct)``, centre crop, the training mean and std), so that
``transformers.pipeline("zero-shot-image-classification", model=dir)`` runs offline.

What maps: the image tower in the CLIP layout (timm ``VisionTransformer`` with a class token, pre-norm,
final norm, no patch-embedding bias, plain blocks with exact GELU; the ``*_clip_*`` timm models and the
presets) and our causal text tower pooled at the first end-of-text token. What does not, fails naming the
difference: SigLIP models (transformers' ``SiglipModel`` has a bidirectional text tower and an attention-pooling
image head), other timm image towers, and end-of-text ids transformers would pool differently (a
begin-of-text token equal to it, or id 2, which transformers' CLIP treats as the legacy argmax pooling).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mmpretrain.export.vit import UnsupportedArchitecture
from mmpretrain.models.clip import CLIP
from mmpretrain.models.text import TextTransformer

__all__ = ["check_clip", "clip_config", "clip_state_dict", "export_clip", "export_tokenizer", "clip_image_processor"]

# transformers' CLIPTextModel pools at argmax(input_ids) when its config's eos_token_id is 2
_LEGACY_ARGMAX_EOS = 2


def _fail(why: str) -> None:
    raise UnsupportedArchitecture(f"this CLIP cannot be exported as transformers.CLIPModel: {why}")


def _layer_norm_eps(norms: list[nn.Module], where: str) -> float:
    eps = set()
    for norm in norms:
        if not isinstance(norm, nn.LayerNorm) or norm.weight is None or norm.bias is None:
            _fail(f"the {where} normalises with {type(norm).__name__}, not an affine LayerNorm")
        eps.add(norm.eps)
    if len(eps) != 1:
        _fail(f"the {where}'s LayerNorms use different epsilons {sorted(eps)}; CLIPModel has one per tower")
    return eps.pop()


def check_clip(model: CLIP) -> None:
    """Raise :class:`UnsupportedArchitecture` naming the first part of ``model`` that CLIPModel lacks."""
    if not isinstance(model, CLIP):
        _fail(f"it is a {type(model).__name__}, not an mmpretrain CLIP")
    if model.siglip:
        _fail("it is a SigLIP model (sigmoid loss, logit bias); transformers' SiglipModel has a bidirectional "
              "text tower and an attention-pooling image head, which these towers do not have. Train with "
              "model.siglip: false to export")
    trunk = model.visual.trunk
    if not isinstance(trunk, VisionTransformer):
        _fail(f"the image tower is a timm {type(trunk).__name__}, not a VisionTransformer in the CLIP layout")
    if trunk.cls_token is None or trunk.global_pool != "token":
        _fail(f"the image tower pools by {trunk.global_pool!r}, not at a class token")
    if getattr(trunk, "num_reg_tokens", 0):
        _fail("the image tower has register tokens")
    if getattr(trunk, "no_embed_class", False) or trunk.pos_embed is None:
        _fail("the image tower's position embedding does not cover the class token")
    if getattr(trunk, "dynamic_img_size", False):
        _fail("the image tower uses dynamic image sizes")
    if getattr(trunk, "attn_pool", None) is not None:
        _fail("the image tower pools with attention")
    if isinstance(trunk.norm_pre, nn.Identity):
        _fail("the image tower has no pre-norm (timm pre_norm=True, CLIP's ln_pre)")
    if not isinstance(trunk.fc_norm, nn.Identity) or isinstance(trunk.norm, nn.Identity):
        _fail("the image tower normalises after pooling (fc_norm) rather than with a final norm")
    if trunk.patch_embed.proj.bias is not None:
        _fail("the image tower's patch embedding has a bias (CLIP's has none)")
    if getattr(trunk.patch_embed, "norm", None) is not None and not isinstance(trunk.patch_embed.norm, nn.Identity):
        _fail("the image tower normalises its patch embedding")
    img, patch = tuple(trunk.patch_embed.img_size), tuple(trunk.patch_embed.patch_size)
    if img[0] != img[1] or patch[0] != patch[1]:
        _fail(f"non-square image {img} or patch {patch}")
    for i, block in enumerate(trunk.blocks):
        for part in ("ls1", "ls2"):
            if not isinstance(getattr(block, part, nn.Identity()), nn.Identity):
                _fail(f"image block {i} has layer scale ({part})")
        for part in ("q_norm", "k_norm", "norm"):
            if not isinstance(getattr(block.attn, part, nn.Identity()), nn.Identity):
                _fail(f"image block {i} normalises inside attention ({part})")
        if block.attn.qkv.bias is None:
            _fail(f"image block {i} has no qkv bias")
        act = getattr(block.mlp, "act", None)
        if not isinstance(act, nn.GELU) or act.approximate != "none":
            _fail(f"image block {i} MLP activation is {type(act).__name__}, not exact GELU")
        if not hasattr(block.mlp, "fc1") or not isinstance(getattr(block.mlp, "norm", nn.Identity()), nn.Identity):
            _fail(f"image block {i} MLP is not fc1-GELU-fc2")
    _layer_norm_eps([trunk.norm_pre, trunk.norm] + [n for b in trunk.blocks for n in (b.norm1, b.norm2)], "image tower")
    text = model.text
    if not isinstance(text, TextTransformer):
        _fail(f"the text tower is a {type(text).__name__}")
    _layer_norm_eps([text.ln_final] + [n for b in text.blocks for n in (b.ln_1, b.ln_2)], "text tower")
    if text.eot_id == _LEGACY_ARGMAX_EOS:
        _fail("the end-of-text id is 2, which transformers' CLIP takes for its legacy argmax pooling; "
              "a tokenizer with another end-of-text id is needed")


def clip_config(model: CLIP, eos_token_id: int, bos_token_id: int | None, pad_token_id: int | None) -> Any:
    """The ``CLIPConfig`` of ``model`` (``eos_token_id``: where the exported text tower pools)."""
    from transformers import CLIPConfig

    trunk, text = model.visual.trunk, model.text
    block, text_block = trunk.blocks[0], text.blocks[0]
    vision_config = dict(
        hidden_size=trunk.embed_dim,
        intermediate_size=block.mlp.fc1.out_features,
        projection_dim=model.embed_dim,
        num_hidden_layers=len(trunk.blocks),
        num_attention_heads=block.attn.num_heads,
        num_channels=trunk.patch_embed.proj.in_channels,
        image_size=int(trunk.patch_embed.img_size[0]),
        patch_size=int(trunk.patch_embed.patch_size[0]),
        hidden_act="gelu",
        layer_norm_eps=float(trunk.norm.eps),
        attention_dropout=0.0,
    )
    text_config = dict(
        vocab_size=text.vocab_size,
        hidden_size=text.width,
        intermediate_size=text_block.mlp.fc.out_features,
        projection_dim=model.embed_dim,
        num_hidden_layers=text.layers,
        num_attention_heads=text_block.attn.heads,
        max_position_embeddings=text.context_length,
        hidden_act="gelu",
        layer_norm_eps=float(text.ln_final.eps),
        attention_dropout=0.0,
        eos_token_id=eos_token_id,
        bos_token_id=bos_token_id,
        pad_token_id=pad_token_id,
    )
    return CLIPConfig(
        text_config=text_config,
        vision_config=vision_config,
        projection_dim=model.embed_dim,
        logit_scale_init_value=float(model.logit_scale.detach()),
        architectures=["CLIPModel"],
    )


def clip_state_dict(model: CLIP) -> dict[str, torch.Tensor]:
    """Our parameter names -> CLIPModel's (fused query/key/value projections split in three)."""
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {"logit_scale": sd["logit_scale"].reshape(())}  # CLIPModel's is 0-d

    def qkv(src_w: str, src_b: str, dst: str, dim: int) -> None:
        w, b = sd[src_w], sd[src_b]
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out[f"{dst}.self_attn.{name}.weight"] = w[j * dim:(j + 1) * dim].clone()
            out[f"{dst}.self_attn.{name}.bias"] = b[j * dim:(j + 1) * dim].clone()

    def copy(pairs: dict[str, str]) -> None:
        for dst, src in pairs.items():
            out[dst] = sd[src]

    # image tower (timm names under visual.trunk)
    v, hv = "visual.trunk.", "vision_model."
    dim = model.visual.trunk.embed_dim
    out[hv + "embeddings.class_embedding"] = sd[v + "cls_token"].reshape(dim)
    out[hv + "embeddings.position_embedding.weight"] = sd[v + "pos_embed"].reshape(-1, dim)
    copy({
        hv + "embeddings.patch_embedding.weight": v + "patch_embed.proj.weight",
        hv + "pre_layrnorm.weight": v + "norm_pre.weight",
        hv + "pre_layrnorm.bias": v + "norm_pre.bias",
        hv + "post_layernorm.weight": v + "norm.weight",
        hv + "post_layernorm.bias": v + "norm.bias",
        "visual_projection.weight": "visual.proj.weight",
    })
    for i in range(len(model.visual.trunk.blocks)):
        src, dst = f"{v}blocks.{i}.", f"{hv}encoder.layers.{i}"
        qkv(src + "attn.qkv.weight", src + "attn.qkv.bias", dst, dim)
        for a, b in {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.out_proj",
                     "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}.items():
            copy({f"{dst}.{b}.weight": f"{src}{a}.weight", f"{dst}.{b}.bias": f"{src}{a}.bias"})
    # text tower
    t, ht = "text.", "text_model."
    width = model.text.width
    copy({
        ht + "embeddings.token_embedding.weight": t + "token_embedding.weight",
        ht + "embeddings.position_embedding.weight": t + "positional_embedding",
        ht + "final_layer_norm.weight": t + "ln_final.weight",
        ht + "final_layer_norm.bias": t + "ln_final.bias",
        "text_projection.weight": t + "proj.weight",
    })
    for i in range(model.text.layers):
        src, dst = f"{t}blocks.{i}.", f"{ht}encoder.layers.{i}"
        qkv(src + "attn.qkv.weight", src + "attn.qkv.bias", dst, width)
        for a, b in {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                     "mlp.fc": "mlp.fc1", "mlp.proj": "mlp.fc2"}.items():
            copy({f"{dst}.{b}.weight": f"{src}{a}.weight", f"{dst}.{b}.bias": f"{src}{a}.bias"})
    return {k: v.contiguous() for k, v in out.items()}


def _backend(tokenizer: Any) -> Any:
    """The ``tokenizers.Tokenizer`` inside our data tokenizer wrapper (a copy: export changes its post-processor)."""
    from tokenizers import Tokenizer as RustTokenizer

    backend = getattr(tokenizer, "backend_tokenizer", None) or tokenizer._tok
    return RustTokenizer.from_str(backend.to_str())


def export_tokenizer(tokenizer: Any, output: Path, context_length: int) -> dict[str, int]:
    """Write ``tokenizer`` (an :class:`mmpretrain.data.tokenizer.Tokenizer`) as a transformers tokenizer whose
    ``__call__`` gives what training saw: ``[bos] ids [eos]``, padded with the pad token. Returns the ids."""
    from tokenizers import processors

    from mmpretrain.data.tokenizer import save_tokenizer

    rust = _backend(tokenizer)
    bos, eos, pad = (rust.id_to_token(i) for i in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id))
    if bos is None or eos is None or pad is None:
        raise ValueError(f"tokenizer {tokenizer}: a special id has no token string; it cannot be exported")
    specials = [(bos, tokenizer.bos_id)] + ([(eos, tokenizer.eos_id)] if eos != bos else [])
    rust.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} $B {eos}", special_tokens=specials
    )
    rust.no_truncation()
    rust.no_padding()
    save_tokenizer(rust, output, eos_token=eos, bos_token=bos, pad_token=pad, model_max_length=context_length)
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}


def clip_image_processor(image_size: int, mean, std, crop_pct: float | None, interpolation: str) -> Any:
    """A ``CLIPImageProcessor`` preparing images as timm's evaluation transform does: the shorter side resized
    to ``floor(image_size / crop_pct)``, a centre crop of ``image_size``, then the normalisation.

    One difference remains: where a crop margin is 3 mod 4 pixels, transformers' crop starts one pixel before
    torchvision's (which rounds half to even); with ``crop_pct: 1.0`` the shorter side is not cropped at all.
    """
    from transformers import CLIPImageProcessor
    from transformers.image_utils import PILImageResampling

    resample = {"bicubic": PILImageResampling.BICUBIC, "bilinear": PILImageResampling.BILINEAR,
                "nearest": PILImageResampling.NEAREST}.get(interpolation, PILImageResampling.BILINEAR)
    crop_pct = 0.875 if crop_pct is None else float(crop_pct)  # timm's default
    return CLIPImageProcessor(
        size={"shortest_edge": int(math.floor(image_size / crop_pct))},
        crop_size={"height": image_size, "width": image_size},
        resample=resample,
        image_mean=list(mean),
        image_std=list(std),
    )


def export_clip(model: CLIP, output: str | Path, data_hparams: dict[str, Any] | None = None,
                tokenizer: Any = None, ema: bool = False) -> Path:
    """Write ``output`` so that ``transformers.CLIPModel.from_pretrained(output)`` and the zero-shot pipeline load it.

    Args:
        model: the trained CLIP (``task.model``).
        output: directory to write (created if missing).
        data_hparams: the data module's hyperparameters from the checkpoint (``tokenizer``, ``context_length``,
            ``image_size``, ``mean``, ``std``, ``eval_transform``).
        tokenizer: the tokenizer (a directory, ``"demo"`` or a loaded ``Tokenizer``); default: the one the data
            module was given (``data_hparams["tokenizer"]``), which must still exist.
        ema: refused: contrastive pretraining keeps no EMA weights.
    """
    from transformers import CLIPModel

    from mmpretrain.data.tokenizer import Tokenizer

    if ema:
        raise ValueError("--ema: contrastive pretraining keeps no EMA weights; export without --ema")
    check_clip(model)
    data_hparams = dict(data_hparams or {})
    source = tokenizer if tokenizer is not None else data_hparams.get("tokenizer")
    if source is None:
        raise ValueError("no tokenizer to export: the checkpoint's data hyperparameters name none; pass tokenizer=")
    try:
        tok = Tokenizer.from_dir(source)
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"the tokenizer the model was trained with ({source!r}) cannot be loaded: {err}") from None
    text = model.text
    if tok.vocab_size > text.vocab_size:
        raise ValueError(f"tokenizer {tok} has {tok.vocab_size} ids but the text tower embeds {text.vocab_size}: "
                         "it is not the tokenizer the model was trained with")
    if text.eot_id is None:
        # our tower pools at argmax(ids); transformers' CLIP does that for eos_token_id 2
        eos_for_pooling = _LEGACY_ARGMAX_EOS
    else:
        if text.eot_id != tok.eos_id:
            raise ValueError(f"the text tower pools at id {text.eot_id} but tokenizer {tok} ends texts with "
                             f"{tok.eos_id}: pass the tokenizer the model was trained with")
        if tok.bos_id == tok.eos_id:
            _fail("the tokenizer begins texts with its end-of-text token; transformers' CLIP would pool at the "
                  "first position instead of the end of the text")
        eos_for_pooling = text.eot_id
    context = int(data_hparams.get("context_length") or text.context_length)
    context = min(context, text.context_length)

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    config = clip_config(model, eos_for_pooling, tok.bos_id, tok.pad_id)
    hf = CLIPModel(config)
    missing, unexpected = hf.load_state_dict(clip_state_dict(model), strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        _fail(f"weights do not map: missing {missing[:5]}, unexpected {unexpected[:5]}")
    hf.save_pretrained(output, safe_serialization=True)
    export_tokenizer(tok, output, context)
    eval_args = data_hparams.get("eval_transform") or {}
    image_size = int(data_hparams.get("image_size") or config.vision_config.image_size)
    processor = clip_image_processor(
        image_size,
        data_hparams.get("mean") or OPENAI_CLIP_MEAN,
        data_hparams.get("std") or OPENAI_CLIP_STD,
        eval_args.get("crop_pct"),
        eval_args.get("interpolation", "bilinear"),  # timm create_transform's default
    )
    processor.save_pretrained(output)
    return output
