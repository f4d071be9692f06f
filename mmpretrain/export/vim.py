"""Vision Mamba classifiers -> a transformers directory with our own configuration and modeling code.

transformers has no Vision Mamba, so the directory carries the code (``configuration_mmpretrain_vim.py``,
``modeling_mmpretrain_vim.py`` from :mod:`mmpretrain.export.hf_vim`; plain torch and transformers) and
``auto_map`` in config.json points at it:

    model = AutoModelForImageClassification.from_pretrained(directory, trust_remote_code=True)

Weights as safetensors, ``id2label``, and an image processor that prepares images as our evaluation
transform does. Both mixers (Mamba and LRU) are supported.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmpretrain.export.vit import UnsupportedArchitecture, image_processor
from mmpretrain.models.vim import Vim

HF_CODE_DIR = Path(__file__).resolve().with_name("hf_vim")
CODE_FILES = ("configuration_mmpretrain_vim.py", "modeling_mmpretrain_vim.py")
AUTO_MAP = {
    "AutoConfig": "configuration_mmpretrain_vim.VimConfig",
    "AutoModel": "modeling_mmpretrain_vim.VimModel",
    "AutoModelForImageClassification": "modeling_mmpretrain_vim.VimForImageClassification",
}


def vim_hf_config(model: Vim, class_names: list[str]) -> Any:
    """The :class:`~mmpretrain.export.hf_vim.VimConfig` describing ``model``."""
    from mmpretrain.export.hf_vim import VimConfig

    if not isinstance(model, Vim):
        raise UnsupportedArchitecture(f"{type(model).__name__} is not an mmpretrain Vim model")
    pe = model.patch_embed
    if pe.patch_size[0] != pe.patch_size[1] or pe.stride[0] != pe.stride[1]:
        raise UnsupportedArchitecture(f"Vim export takes square patches and strides, got patch {pe.patch_size}, "
                                      f"stride {pe.stride}")
    if not isinstance(model.head, nn.Linear):
        raise UnsupportedArchitecture("Vim export needs a linear head (num_classes > 0)")
    if len(class_names) != model.num_classes:
        raise ValueError(f"{len(class_names)} class names for a {model.num_classes}-class head")
    mixer = model.layers[0].mixer
    common = dict(
        image_size=list(pe.img_size), patch_size=pe.patch_size[0], stride=pe.stride[0],
        num_channels=pe.proj.in_channels, hidden_size=model.embed_dim, num_hidden_layers=len(model.layers),
        mixer=model.mixer_type, expand=mixer.d_inner // mixer.d_model, d_state=mixer.d_state,
        mixer_bias=mixer.in_proj.bias is not None, norm_eps=model.norm_f.eps,
        residual_in_fp32=model.residual_in_fp32, global_pool=model.global_pool,
        id2label=dict(enumerate(class_names)), label2id={n: i for i, n in enumerate(class_names)},
    )
    if model.mixer_type == "mamba":
        common.update(d_conv=mixer.d_conv, dt_rank=mixer.dt_rank, conv_bias=mixer.conv1d.bias is not None)
    return VimConfig(**common)


def vim_hf_state_dict(model: Vim) -> dict[str, torch.Tensor]:
    """Our parameter names -> the remote code's: the backbone under ``vim.``, ``head`` as ``classifier``."""
    out = {}
    for key, value in model.state_dict().items():
        name = "classifier." + key[len("head."):] if key.startswith("head.") else "vim." + key
        out[name] = value.detach().float().cpu().contiguous()
    return out


def export_vim(model: Vim, output: Path, class_names: list[str], data_hparams: dict[str, Any]) -> Path:
    """Write ``output`` so that ``AutoModelForImageClassification.from_pretrained(output, trust_remote_code=True)``
    loads ``model`` without mmpretrain; returns ``output``."""
    from mmpretrain.export.hf_vim import VimForImageClassification

    output = Path(output)
    height, width = model.patch_embed.img_size
    if height != width:
        raise UnsupportedArchitecture(f"Vim export writes a square-image processor; the model takes {height}x{width}")
    config = vim_hf_config(model, class_names)
    config.auto_map = dict(AUTO_MAP)
    hf = VimForImageClassification(config)
    missing, unexpected = hf.load_state_dict(vim_hf_state_dict(model), strict=False)
    if missing or unexpected:
        raise UnsupportedArchitecture(f"Vim weights do not map onto the exported model: missing {missing[:5]}, "
                                      f"unexpected {unexpected[:5]}")
    output.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(output, safe_serialization=True)
    for name in CODE_FILES:
        shutil.copyfile(HF_CODE_DIR / name, output / name)
    eval_args = data_hparams.get("eval_transform") or {}
    cfg = getattr(model, "pretrained_cfg", None) or {}
    processor = image_processor(
        height,
        data_hparams.get("mean", cfg.get("mean", (0.485, 0.456, 0.406))),
        data_hparams.get("std", cfg.get("std", (0.229, 0.224, 0.225))),
        eval_args.get("crop_pct"),
        eval_args.get("interpolation", "bilinear"),  # timm create_transform default
    )
    processor.save_pretrained(output)
    return output
