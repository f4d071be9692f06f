"""METALM semi-causal LMs -> a transformers directory with our own configuration and modeling code.

transformers has no semi-causal LM, so the directory carries the code (``configuration_mmpretrain_metalm.py``,
``modeling_mmpretrain_metalm.py`` from :mod:`mmpretrain.export.hf_metalm`; plain torch and transformers, no
timm) and ``auto_map`` in config.json points at it:

    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=True)

(``AutoTokenizer`` reads config.json first, whose ``auto_map`` makes transformers ask whether to run the
code; declining, or ``PreTrainedTokenizerFast.from_pretrained(directory)``, loads the same tokenizer.)

What the directory holds: ``config.json``; ``model.safetensors`` (float32; the output projection is tied to
the token embedding and stored once); ``generation_config.json`` with the tokenizer's special ids and the
task's generation settings (``max_new_tokens``; greedy, or sampling with its temperature, top-k and top-p);
the data's tokenizer as a ``PreTrainedTokenizerFast`` whose ``__call__`` starts a text the way the model's
training texts started (the beginning-of-text token for image-text models and for text trained with
``add_bos``, nothing otherwise; never the end-of-text token, so that a prompt is continued rather than ended),
padding on the left for batched prompts; and for image-text models an image processor preparing images as the
evaluation transform did.

Everything of :class:`~mmpretrain.models.metalm.MetaLM` is exported: rotary or learned positions, GELU or
SwiGLU, with or without biases, the span encoder and its connector (``spans``/``span_ids`` inputs), and the
image encoder when it is a plain timm ``VisionTransformer`` (class and register tokens, learned positions with
or without the class token's entry, pre- and final norms, layer scale, GELU/tanh-GELU/QuickGELU MLPs, any
biases; the ``"clip"`` image encoder is one). Other image encoders (q/k-normalised or gated attention, SwiGLU
or normalised MLPs, rotary ViTs, non-ViT timm models, dynamic image sizes) fail with
:class:`UnsupportedArchitecture` naming the part.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from torch import nn

from mmpretrain.export.vit import UnsupportedArchitecture, image_processor
from mmpretrain.models.metalm import MetaLM

__all__ = ["export_lm_tokenizer", "export_metalm", "image_encoder_config", "metalm_generation_config",
           "metalm_hf_config", "metalm_hf_state_dict"]

HF_CODE_DIR = Path(__file__).resolve().with_name("hf_metalm")
CODE_FILES = ("configuration_mmpretrain_metalm.py", "modeling_mmpretrain_metalm.py")
AUTO_MAP = {
    "AutoConfig": "configuration_mmpretrain_metalm.MetaLMConfig",
    "AutoModel": "modeling_mmpretrain_metalm.MetaLMModel",
    "AutoModelForCausalLM": "modeling_mmpretrain_metalm.MetaLMForCausalLM",
}


def image_encoder_config(encoder: nn.Module) -> dict[str, Any]:
    """The ``image_encoder_config`` of the exported model describing ``encoder`` (a timm
    ``VisionTransformer``); raises :class:`UnsupportedArchitecture` naming the first part the exported plain
    ViT lacks."""
    from timm.layers import Attention, LayerScale, Mlp, PatchEmbed
    from timm.layers.activations import QuickGELU
    from timm.models.vision_transformer import Block, VisionTransformer

    def fail(why: str) -> None:
        raise UnsupportedArchitecture(
            f"the METALM image encoder ({type(encoder).__name__}) cannot be exported: {why}. The "
            "exported model carries a plain ViT (timm's VisionTransformer with standard blocks, as "
            "image_encoder 'clip' builds)"
        )

    if not isinstance(encoder, VisionTransformer):
        fail("it is not a timm VisionTransformer")
    if getattr(encoder, "dynamic_img_size", False):
        fail("it uses dynamic image sizes")
    pe = encoder.patch_embed
    if type(pe) is not PatchEmbed or not isinstance(pe.proj, nn.Conv2d):
        fail(f"its patch embedding is a {type(pe).__name__}, not timm's convolutional PatchEmbed")
    if tuple(pe.proj.kernel_size) != tuple(pe.proj.stride) or pe.proj.padding != (0, 0):
        fail(f"its patches overlap or are padded (kernel {pe.proj.kernel_size}, stride {pe.proj.stride})")
    if not isinstance(pe.norm, nn.Identity) or getattr(pe, "dynamic_img_pad", False):
        fail("its patch embedding normalises or pads its input")
    dim = encoder.embed_dim
    regs = int(getattr(encoder, "num_reg_tokens", 0) or 0)
    no_embed_class = bool(getattr(encoder, "no_embed_class", False))
    if encoder.pos_embed is not None:
        expected = pe.num_patches + (0 if no_embed_class else encoder.num_prefix_tokens)
        if tuple(encoder.pos_embed.shape) != (1, expected, dim):
            fail(f"its position embedding has shape {tuple(encoder.pos_embed.shape)}, not "
                 f"(1, {expected}, {dim})")
    norms: list[nn.Module] = []

    def layer_norm(module: nn.Module, where: str) -> bool:
        """True for an affine LayerNorm, False for Identity; anything else fails."""
        if isinstance(module, nn.Identity):
            return False
        if not isinstance(module, nn.LayerNorm):  # timm's LayerNorm subclasses compute the same
            fail(f"its {where} is a {type(module).__name__}, not a LayerNorm")
        if module.weight is None or module.bias is None:
            fail(f"its {where} LayerNorm is not affine with a bias")
        norms.append(module)
        return True

    pre_norm = layer_norm(encoder.norm_pre, "pre-norm")
    final_norm = layer_norm(encoder.norm, "final norm")
    if not len(encoder.blocks):
        fail("it has no blocks")
    acts, layer_scale, qkv_bias, proj_bias, mlp_bias, hidden = set(), set(), set(), set(), set(), set()
    for i, block in enumerate(encoder.blocks):
        if type(block) is not Block:
            fail(f"block {i} is a {type(block).__name__}, not timm's standard Block")
        attn, mlp = block.attn, block.mlp
        if type(attn) is not Attention:
            fail(f"block {i} attention is a {type(attn).__name__}")
        for part in ("q_norm", "k_norm", "norm"):
            if not isinstance(getattr(attn, part, nn.Identity()), nn.Identity):
                fail(f"block {i} normalises inside attention ({part})")
        if getattr(attn, "gate", None) is not None:
            fail(f"block {i} gates its attention output")
        if attn.num_heads * attn.head_dim != dim:
            fail(f"block {i} attention width {attn.num_heads * attn.head_dim} differs from the embedding "
                 f"width {dim}")
        if type(mlp) is not Mlp or not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
            fail(f"block {i} MLP is a {type(mlp).__name__}, not fc1-activation-fc2")
        act = mlp.act
        if isinstance(act, QuickGELU):
            acts.add("quick_gelu")
        elif type(act) is nn.GELU:
            acts.add("gelu_tanh" if act.approximate == "tanh" else "gelu")
        else:
            fail(f"block {i} MLP activation is {type(act).__name__}, not GELU or QuickGELU")
        for part in ("ls1", "ls2"):
            ls = getattr(block, part)
            if isinstance(ls, LayerScale):
                layer_scale.add(True)
            elif isinstance(ls, nn.Identity):
                layer_scale.add(False)
            else:
                fail(f"block {i} {part} is a {type(ls).__name__}")
        layer_norm(block.norm1, f"block {i} norm1")
        layer_norm(block.norm2, f"block {i} norm2")
        qkv_bias.add(attn.qkv.bias is not None)
        proj_bias.add(attn.proj.bias is not None)
        mlp_bias.add(mlp.fc1.bias is not None)
        mlp_bias.add(mlp.fc2.bias is not None)
        hidden.add(mlp.fc1.out_features)
    for name, values in (("activations", acts), ("layer scales", layer_scale), ("qkv biases", qkv_bias),
                         ("projection biases", proj_bias), ("MLP biases", mlp_bias), ("MLP widths", hidden),
                         ("LayerNorm epsilons", {n.eps for n in norms})):
        if len(values) > 1:
            fail(f"its blocks differ in their {name} {sorted(values)}; the exported ViT has one setting")
    return {
        "image_size": [int(s) for s in pe.img_size],
        "patch_size": [int(s) for s in pe.patch_size],
        "num_channels": pe.proj.in_channels,
        "hidden_size": dim,
        "num_hidden_layers": len(encoder.blocks),
        "num_attention_heads": encoder.blocks[0].attn.num_heads,
        "intermediate_size": hidden.pop(),
        "hidden_act": acts.pop(),
        "layer_norm_eps": float(norms[0].eps),
        "patch_bias": pe.proj.bias is not None,
        "qkv_bias": qkv_bias.pop(),
        "proj_bias": proj_bias.pop(),
        "mlp_bias": mlp_bias.pop(),
        "class_token": encoder.cls_token is not None,
        "num_register_tokens": regs,
        "position_embedding": encoder.pos_embed is not None,
        "no_embed_class": no_embed_class,
        "pre_norm": pre_norm,
        "final_norm": final_norm,
        "layer_scale": layer_scale.pop(),
    }


def metalm_hf_config(model: MetaLM, bos_id: int | None = None, eos_id: int | None = None,
                     pad_id: int | None = None) -> Any:
    """The :class:`~mmpretrain.export.hf_metalm.MetaLMConfig` describing ``model`` (special ids: the
    model's unless given)."""
    from mmpretrain.export.hf_metalm import MetaLMConfig

    if not isinstance(model, MetaLM):
        raise UnsupportedArchitecture(f"{type(model).__name__} is not an mmpretrain MetaLM model")
    block = model.blocks[0]
    kwargs: dict[str, Any] = dict(
        vocab_size=model.vocab_size,
        hidden_size=model.dim,
        num_hidden_layers=len(model.blocks),
        num_attention_heads=model.heads,
        intermediate_size=block.mlp.proj.in_features,
        mlp=block.mlp.kind,
        position_embedding=model.positions,
        max_position_embeddings=model.max_seq_len,
        rope_theta=float(model.rope_theta),
        layer_norm_eps=float(model.ln_f.eps),
        bias=block.attn.qkv.bias is not None,
        encoder_num_hidden_layers=0,
        image_encoder_config=None,
        bos_token_id=model.bos_id if bos_id is None else bos_id,
        eos_token_id=model.eos_id if eos_id is None else eos_id,
        pad_token_id=model.pad_id if pad_id is None else pad_id,
    )
    if model.encoder is not None:
        enc = model.encoder
        kwargs.update(
            encoder_hidden_size=enc.dim,
            encoder_num_hidden_layers=len(enc.blocks),
            encoder_num_attention_heads=enc.heads,
            encoder_intermediate_size=enc.blocks[0].mlp.proj.in_features,
            connector=model.connector.kind,
        )
        if enc.rope_theta != model.rope_theta:
            raise UnsupportedArchitecture(f"the span encoder's rotary base {enc.rope_theta} differs from the "
                                          f"decoder's {model.rope_theta}; the exported config has one")
    if model.image_encoder is not None:
        kwargs.update(image_encoder_config=image_encoder_config(model.image_encoder),
                      image_connector=model.image_connector.kind)
    config = MetaLMConfig(**kwargs)
    if config.num_image_tokens != model.num_image_tokens:
        raise UnsupportedArchitecture(f"the image encoder gives {model.num_image_tokens} tokens but its "
                                      f"exported description gives {config.num_image_tokens}")
    return config


def metalm_hf_state_dict(model: MetaLM) -> dict[str, torch.Tensor]:
    """Our parameter names -> the remote code's: everything under ``model.``, the tied ``lm_head`` as the
    token embedding (float32, contiguous)."""
    out = {"model." + k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    out["lm_head.weight"] = out["model.embed.weight"]
    return out


def export_lm_tokenizer(tokenizer: Any, output: Path, add_bos: bool, model_max_length: int | None) -> None:
    """Write ``tokenizer`` (an :class:`mmpretrain.data.tokenizer.Tokenizer`) as a transformers tokenizer
    whose ``__call__`` gives ``[bos] ids`` (``add_bos``) or ``ids``, never an end-of-text token, padding on
    the left."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import processors

    from mmpretrain.data.tokenizer import save_tokenizer

    backend = getattr(tokenizer, "backend_tokenizer", None) or tokenizer._tok
    rust = RustTokenizer.from_str(backend.to_str())  # a copy: the post-processor changes below
    bos, eos, pad = (rust.id_to_token(i) for i in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id))
    if bos is None or eos is None or pad is None:
        raise ValueError(f"tokenizer {tokenizer}: a special id has no token string; it cannot be exported")
    if add_bos:
        rust.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                            special_tokens=[(bos, tokenizer.bos_id)])
    else:
        rust.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B", special_tokens=[])
    rust.no_truncation()
    rust.no_padding()
    save_tokenizer(rust, output, eos_token=eos, bos_token=bos, pad_token=pad,
                   model_max_length=model_max_length)
    path = output / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["padding_side"] = "left"  # batched prompts for generate()
    path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                    encoding="utf-8")


def metalm_generation_config(bos_id: int, eos_id: int, pad_id: int | None,
                             settings: dict[str, Any] | None = None) -> Any:
    """A ``GenerationConfig`` with the special ids and ``settings`` (``max_new_tokens``, ``temperature`` (0:
    greedy), ``top_k``, ``top_p``, as :class:`~mmpretrain.tasks.semicausal_lm.SemiCausalLM` holds them)."""
    from transformers import GenerationConfig

    settings = dict(settings or {})
    kwargs: dict[str, Any] = dict(bos_token_id=bos_id, eos_token_id=eos_id,
                                  pad_token_id=pad_id if pad_id is not None else eos_id)
    if settings.get("max_new_tokens"):
        kwargs["max_new_tokens"] = int(settings["max_new_tokens"])
    temperature = float(settings.get("temperature") or 0.0)
    if temperature > 0:
        # transformers keeps its top-k of 50 unless told otherwise; 0 turns it off, as our None does
        kwargs.update(do_sample=True, temperature=temperature, top_k=int(settings.get("top_k") or 0),
                      top_p=float(settings["top_p"]) if settings.get("top_p") is not None else 1.0)
    else:
        kwargs["do_sample"] = False
    return GenerationConfig(**kwargs)


def export_metalm(model: MetaLM, output: str | Path, data_hparams: dict[str, Any] | None = None,
                  tokenizer: Any = None, generation: dict[str, Any] | None = None) -> Path:
    """Write ``output`` so that ``AutoModelForCausalLM.from_pretrained(output, trust_remote_code=True)`` and
    ``AutoTokenizer.from_pretrained(output, trust_remote_code=True)`` load ``model`` and its tokenizer
    without mmpretrain.

    Args:
        model: the trained model (``task.model``).
        output: directory to write (created if missing).
        data_hparams: the data module's hyperparameters from the checkpoint (``tokenizer``, ``add_bos``,
            ``seq_len`` or ``context_length``, ``image_size``, ``mean``, ``std``, ``eval_transform``).
        tokenizer: the tokenizer (a directory, ``"demo"`` or a loaded ``Tokenizer``); default: the one the
            data module was given (``data_hparams["tokenizer"]``), which must still exist.
        generation: generation settings for ``generation_config.json`` (see
            :func:`metalm_generation_config`).
    """
    from mmpretrain.data.tokenizer import Tokenizer
    from mmpretrain.export.hf_metalm import MetaLMForCausalLM

    data_hparams = dict(data_hparams or {})
    source = tokenizer if tokenizer is not None else data_hparams.get("tokenizer")
    if source is None:
        raise ValueError("no tokenizer to export with the METALM model: the checkpoint's data "
                         "hyperparameters name none (train through a data module, or call "
                         "export_metalm(..., tokenizer=DIR))")
    try:
        tok = Tokenizer.from_dir(source)
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"the tokenizer the model was trained with ({source!r}) cannot be loaded: "
                         f"{err}") from None
    if tok.vocab_size > model.vocab_size:
        raise ValueError(f"tokenizer {tok} has {tok.vocab_size} ids but the model embeds {model.vocab_size}: "
                         "it is not the tokenizer the model was trained with")
    for key in ("bos_id", "eos_id", "pad_id"):
        ours = getattr(model, key)
        if ours is not None and ours != getattr(tok, key):
            raise ValueError(f"the model's {key} is {ours} but tokenizer {tok} has {getattr(tok, key)}: pass "
                             "the tokenizer the model was trained with")
    vl = model.image_encoder is not None

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    config = metalm_hf_config(model, tok.bos_id, tok.eos_id, tok.pad_id)
    config.auto_map = dict(AUTO_MAP)
    hf = MetaLMForCausalLM(config)
    missing, unexpected = hf.load_state_dict(metalm_hf_state_dict(model), strict=False)
    if missing or unexpected:
        raise UnsupportedArchitecture(f"METALM weights do not map onto the exported model: missing "
                                      f"{missing[:5]}, unexpected {unexpected[:5]}")
    if hf.lm_head.weight.data_ptr() != hf.model.embed.weight.data_ptr():
        raise UnsupportedArchitecture("the exported model's output projection is not tied to its token "
                                      "embedding (this transformers version did not tie _tied_weights_keys)")
    hf.generation_config = metalm_generation_config(tok.bos_id, tok.eos_id, tok.pad_id, generation)
    hf.save_pretrained(output, safe_serialization=True)
    for name in CODE_FILES:
        shutil.copyfile(HF_CODE_DIR / name, output / name)

    if vl:
        max_length = data_hparams.get("context_length") or model.max_seq_len - model.num_image_tokens
    else:
        max_length = data_hparams.get("seq_len") or model.max_seq_len
    # image-text captions start with the beginning-of-text prompt; text starts as its training documents did
    export_lm_tokenizer(tok, output, add_bos=vl or bool(data_hparams.get("add_bos", False)),
                        model_max_length=int(max_length))
    if vl:
        height, width = model.image_size
        if height != width:
            raise UnsupportedArchitecture(f"METALM export writes a square-image processor; the image encoder "
                                          f"takes {height}x{width}")
        eval_args = data_hparams.get("eval_transform") or {}
        processor = image_processor(
            int(height),
            data_hparams.get("mean") or OPENAI_CLIP_MEAN,  # the image-caption data's defaults
            data_hparams.get("std") or OPENAI_CLIP_STD,
            eval_args.get("crop_pct"),
            eval_args.get("interpolation", "bilinear"),  # timm create_transform's default
        )
        processor.save_pretrained(output)
    return output
