"""``mmpretrain export``: a training checkpoint to a Hugging Face transformers directory.

    mmpretrain export --checkpoint runs/tb/version_0/checkpoints/last.ckpt --output exported/
    mmpretrain export --checkpoint last.ckpt --output exported/ --ema    # the EMA weights, where kept
    mmpretrain export --checkpoint runs/tb/version_0/checkpoints/last.ckpt/ --output exported/   # DeepSpeed ZeRO

A DeepSpeed ZeRO checkpoint is a directory of per-rank shards: it is consolidated into full fp32 weights first
(needs ``pip install 'mmpretrain[deepspeed]'``, no GPU), then exported the same way.

Native transformers classes where the architecture matches (ViT classifiers -> ViTForImageClassification),
weights as safetensors only, with an image processor config, so ``transformers.pipeline`` takes the directory.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
from pathlib import Path
from typing import Any

from torch import nn

from mmpretrain.checkpoints import CheckpointError, read_checkpoint
from mmpretrain.tasks.base import Task

__all__ = ["CheckpointError", "export_checkpoint", "export_task", "load_task", "main", "read_checkpoint"]


def load_task(checkpoint: dict[str, Any], source: str = "checkpoint") -> Task:
    """Rebuild the task recorded in a checkpoint and load its weights."""
    info = checkpoint.get("mmpretrain")
    if not info or "task" not in info:
        raise CheckpointError(f"{source} was not written by an mmpretrain task (no 'mmpretrain' entry)")
    module_name, _, cls_name = info["task"].rpartition(".")
    if not module_name.startswith("mmpretrain."):
        raise CheckpointError(f"{source}: task {info['task']!r} is not an mmpretrain task")
    cls = getattr(importlib.import_module(module_name), cls_name)
    accepted = inspect.signature(cls).parameters
    hparams = {k: v for k, v in (checkpoint.get("hyper_parameters") or {}).items() if k in accepted}
    task = cls(**hparams)
    task.configure_model()
    missing, unexpected = task.load_state_dict(checkpoint["state_dict"], strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{source}: weights do not fit {cls_name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    task.eval()
    return task


def export_task(task: Task, output: str | Path, data_hparams: dict[str, Any] | None = None, ema: bool = False,
                tokenizer: str | Path | None = None) -> Path:
    """Write ``task``'s model to ``output`` in transformers format; returns the directory."""
    from mmpretrain.tasks.classification import ImageClassification

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    data_hparams = dict(data_hparams or {})
    if isinstance(task, ImageClassification):
        from mmpretrain.export.vit import export_vit

        model: nn.Module = task.model
        if ema:
            if task.ema is None:
                raise CheckpointError("--ema: this checkpoint keeps no EMA weights (model.ema_decay was not set)")
            model = task.ema.module
        names = task.class_names or data_hparams.get("class_names") or [f"class_{i}" for i in range(task.num_classes)]
        from mmpretrain.models.vim import Vim

        if isinstance(model, Vim):  # no native transformers class: our own remote code
            from mmpretrain.export.vim import export_vim

            return export_vim(model, output, list(names), data_hparams)
        return export_vit(model, output, list(names), data_hparams)
    from mmpretrain.tasks.contrastive import ContrastivePretraining

    if isinstance(task, ContrastivePretraining):
        from mmpretrain.export.clip import export_clip

        return export_clip(task.model, output, data_hparams, tokenizer=tokenizer, ema=ema)
    from mmpretrain.tasks.semicausal_lm import SemiCausalLM

    if isinstance(task, SemiCausalLM):  # no native transformers class: our own remote code
        from mmpretrain.export.metalm import export_metalm

        if ema:
            raise CheckpointError("--ema: semi-causal LM training keeps no EMA weights; export without --ema")
        settings = {"max_new_tokens": task.max_new_tokens, "temperature": task.temperature, "top_k": task.top_k,
                    "top_p": task.top_p}
        return export_metalm(task.model, output, data_hparams, tokenizer=tokenizer, generation=settings)
    raise CheckpointError(f"export of {type(task).__name__} is not supported yet")


def export_checkpoint(checkpoint: str | Path, output: str | Path, ema: bool = False,
                      tokenizer: str | Path | None = None) -> Path:
    """Export a training checkpoint (a file, or a DeepSpeed ZeRO directory, consolidated first) to ``output``.

    ``tokenizer``: a tokenizer directory for CLIP and METALM exports, instead of the one the checkpoint's data
    module names (needed when training ran without a data module)."""
    ckpt = read_checkpoint(checkpoint)
    task = load_task(ckpt, source=f"--checkpoint {checkpoint}")
    return export_task(task, output, ckpt.get("datamodule_hyper_parameters"), ema=ema, tokenizer=tokenizer)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mmpretrain export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint written by mmpretrain fit (a .ckpt file, or a DeepSpeed ZeRO .ckpt directory)")
    parser.add_argument("--output", required=True, help="directory to write (created if missing)")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights instead of the raw ones")
    parser.add_argument("--tokenizer", default=None,
                        help="CLIP / METALM: the tokenizer directory to export with, instead of the one the "
                             "checkpoint's data module names")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.output, ema=args.ema, tokenizer=args.tokenizer)
    except (CheckpointError, ValueError) as err:
        parser.exit(2, f"mmpretrain export: error: {err}\n")
    print(f"exported to {out}")
    return 0
