"""Exported classifiers load in transformers with no custom code and give our logits."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from PIL import Image

from mmpretrain.export import CheckpointError, export_checkpoint, export_task, load_task, read_checkpoint
from mmpretrain.export.vit import UnsupportedArchitecture
from mmpretrain.tasks.classification import ImageClassification

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3}
CLASSES = ["circle", "square", "star"]


def trained_checkpoint(tmp_path, **task_kwargs) -> str:
    """A real checkpoint from Lightning's Trainer after two optimizer steps."""
    task = ImageClassification(backbone="vit_tiny_patch16_224", backbone_kwargs=TINY, num_classes=3,
                               class_names=CLASSES, **task_kwargs)
    g = torch.Generator().manual_seed(0)
    batches = [{"image": torch.randn(4, 3, 32, 32, generator=g), "label": torch.tensor([0, 1, 2, 1])}] * 2
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu")
    trainer.fit(task, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    return str(path)


def test_export_round_trip_through_transformers(tmp_path):
    from transformers import ViTForImageClassification, pipeline

    ckpt = trained_checkpoint(tmp_path)
    out = export_checkpoint(ckpt, tmp_path / "hf")
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "preprocessor_config.json"}
    assert not list(out.glob("*.bin")) and not list(out.glob("*.py"))  # safetensors only, no custom code

    ours = load_task(read_checkpoint(ckpt)).model.eval()
    hf = ViTForImageClassification.from_pretrained(out).eval()
    assert hf.config.id2label == dict(enumerate(CLASSES))
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        a, b = ours(x), hf(pixel_values=x).logits
    assert (a - b).norm() / a.norm() < 1e-4

    classify = pipeline("image-classification", model=str(out))
    result = classify(Image.new("RGB", (40, 50), (200, 30, 30)))
    assert {r["label"] for r in result} <= set(CLASSES) and len(result) == 3


def test_export_ema_weights(tmp_path):
    from transformers import ViTForImageClassification

    ckpt = trained_checkpoint(tmp_path, ema_decay=0.5)
    raw = ViTForImageClassification.from_pretrained(export_checkpoint(ckpt, tmp_path / "raw"))
    ema = ViTForImageClassification.from_pretrained(export_checkpoint(ckpt, tmp_path / "ema", ema=True))
    task = load_task(read_checkpoint(ckpt))
    assert torch.equal(ema.classifier.weight, task.ema.module.head.weight)
    assert not torch.equal(ema.classifier.weight, raw.classifier.weight)
    with pytest.raises(CheckpointError, match="ema_decay"):
        export_checkpoint(trained_checkpoint(tmp_path / "b"), tmp_path / "x", ema=True)


@pytest.mark.parametrize(
    "backbone,kwargs,why",
    [
        ("vit_tiny_patch16_224", {"global_pool": "avg", "class_token": False}, "pools"),
        ("deit3_small_patch16_224", {"img_size": 32, "depth": 1}, "position embedding"),
        ("deit3_small_patch16_224", {"img_size": 32, "depth": 1, "no_embed_class": False}, "ls1"),
        ("vit_tiny_patch16_224", {"reg_tokens": 2}, "register"),
    ],
)
def test_other_architectures_fail_with_a_clear_message(tmp_path, backbone, kwargs, why):
    task = ImageClassification(backbone=backbone, backbone_kwargs={"img_size": 32, **kwargs}, num_classes=3)
    task.configure_model()
    with pytest.raises(UnsupportedArchitecture, match=why):
        export_task(task, tmp_path / "out")


def test_bad_checkpoints_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        export_checkpoint(tmp_path / "missing.ckpt", tmp_path / "o")
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        export_checkpoint(junk, tmp_path / "o")
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
    with pytest.raises(CheckpointError, match="not written by an mmpretrain task"):
        export_checkpoint(tmp_path / "foreign.ckpt", tmp_path / "o")
