"""Exported CLIP models load in transformers with no custom code and give our embeddings."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform

from mmpretrain.data.image_text import ImageTextDataModule
from mmpretrain.export import export_checkpoint, export_task, load_task, read_checkpoint
from mmpretrain.export.clip import check_clip, export_clip
from mmpretrain.export.vit import UnsupportedArchitecture
from mmpretrain.tasks.contrastive import ContrastivePretraining

TINY = dict(
    embed_dim=16,
    vision_kwargs=dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2),
    text_kwargs=dict(context_length=16, width=32, heads=2, layers=2),
)
CAPTIONS = ["a red circle on a grey background", "a large blue star in the top left corner", "square"]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / a.norm()).item()


@pytest.fixture
def trained(tmp_path, image_shards):
    """A real checkpoint: two steps of Lightning's Trainer on image-text shards with the demo tokenizer."""
    urls = image_shards([16], size=20)
    data = ImageTextDataModule(train_shards=urls, val_shards=urls, tokenizer="demo", context_length=16, image_size=32,
                               label_key="cls", batch_size=8, num_workers=0, mode="epoch",
                               eval_transform={"crop_pct": 0.875, "interpolation": "bicubic"})
    torch.manual_seed(0)
    task = ContrastivePretraining(preset="clip_demo", overrides=TINY, vocab_size=data.vocab_size)
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu",
                         num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(task, datamodule=data)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    return path, data


def test_export_round_trip_through_transformers(tmp_path, trained):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel, pipeline

    ckpt, data = trained
    out = export_checkpoint(ckpt, tmp_path / "hf")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= names
    assert not list(out.glob("*.bin")) and not list(out.glob("*.py"))  # safetensors only, no custom code

    ours = load_task(read_checkpoint(ckpt)).model.eval()
    assert ours.text.eot_id == data.tokenizer.eos_id  # recorded in the checkpoint, not re-read from the data
    hf = CLIPModel.from_pretrained(out).eval()
    x = torch.randn(4, 3, 32, 32)
    tokenizer = AutoTokenizer.from_pretrained(out)
    encoded = tokenizer(CAPTIONS, padding=True, return_tensors="pt")
    ids = data.tokenizer.encode_batch(CAPTIONS, 16)
    # the exported tokenizer gives what training saw (up to the padding length)
    assert torch.equal(encoded["input_ids"], ids[:, : encoded["input_ids"].shape[1]])
    with torch.no_grad():
        img_ours, img_hf = ours.encode_image(x, normalize=False), hf.get_image_features(pixel_values=x)
        txt_ours, txt_hf = ours.encode_text(ids, normalize=False), hf.get_text_features(**encoded)
    img_hf = getattr(img_hf, "pooler_output", img_hf)  # transformers 5 returns an output object
    txt_hf = getattr(txt_hf, "pooler_output", txt_hf)
    assert relative_error(img_ours, img_hf) < 1e-4
    assert relative_error(txt_ours, txt_hf) < 1e-4
    torch.testing.assert_close(hf.logit_scale.detach(), ours.logit_scale.detach().reshape(()))

    # the image processor prepares images as our evaluation transform does (resize, crop, normalisation)
    g = np.random.default_rng(0)
    image = Image.fromarray(np.kron(g.integers(0, 255, (5, 7, 3)), np.ones((9, 9, 1))).astype(np.uint8))
    theirs = AutoImageProcessor.from_pretrained(out)(images=image, return_tensors="pt")["pixel_values"][0]
    mine = create_transform(32, is_training=False, mean=data.mean, std=data.std, **data.eval_transform_args)(image)
    assert theirs.shape == mine.shape == (3, 32, 32)
    # (the margins here are even: for margins of 3 mod 4 pixels transformers' centre crop sits one pixel off
    # torchvision's, which rounds half to even)
    assert (theirs - mine).abs().mean() < 1e-3

    classify = pipeline("zero-shot-image-classification", model=str(out))
    result = classify(Image.new("RGB", (40, 50), (200, 30, 30)), candidate_labels=["circle", "square", "star"])
    assert sorted(r["label"] for r in result) == ["circle", "square", "star"]
    assert sum(r["score"] for r in result) == pytest.approx(1.0, abs=1e-5)


def tiny_task(**kwargs) -> ContrastivePretraining:
    task = ContrastivePretraining(preset="clip_demo", vocab_size=4096, eot_id=0, **kwargs)
    task.configure_model()
    return task


@pytest.mark.parametrize(
    "kwargs,why",
    [
        ({"siglip": True}, "SigLIP"),
        ({"overrides": {**TINY, "vision_model": "vit_tiny_patch16_224", "vision_kwargs": {"img_size": 32}}}, "pre-norm"),
        ({"overrides": {**TINY, "vision_kwargs": {**TINY["vision_kwargs"], "global_pool": "avg"}}}, "pools"),
        ({"overrides": {**TINY, "vision_kwargs": {**TINY["vision_kwargs"], "init_values": 0.1}}}, "layer scale"),
    ],
)
def test_what_does_not_map_fails_with_a_clear_message(tmp_path, kwargs, why):
    task = tiny_task(**kwargs)
    with pytest.raises(UnsupportedArchitecture, match=why):
        export_task(task, tmp_path / "out", {"tokenizer": "demo"})


def test_the_tokenizer_must_be_the_training_one(tmp_path):
    task = tiny_task(overrides=TINY)
    check_clip(task.model)
    with pytest.raises(ValueError, match="pools at id 5"):
        task.model.text.eot_id = 5
        export_clip(task.model, tmp_path / "a", {"tokenizer": "demo"})
    with pytest.raises(ValueError, match="cannot be loaded"):
        export_clip(task.model, tmp_path / "b", {"tokenizer": str(tmp_path / "missing")})
    with pytest.raises(ValueError, match="EMA"):
        export_clip(task.model, tmp_path / "c", {"tokenizer": "demo"}, ema=True)


# ------------------------------------------------------------------ the CLIP demo recipe end to end


def test_demo_recipe_trains_validates_and_exports(tmp_path):
    """``mmpretrain fit`` on recipes/clip/demo.yaml (a few steps), then the export of its checkpoint."""
    import csv
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    fit = [sys.executable, "-m", "mmpretrain", "fit", "--config", str(root / "recipes/clip/demo.yaml"),
           "--trainer.max_steps", "4", "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "2",
           "--trainer.default_root_dir", str(tmp_path), "--data.num_workers", "1", "--data.batch_size", "16",
           "--checkpoint.every_n_train_steps", "4", "--trainer.enable_progress_bar", "false"]
    proc = subprocess.run(fit, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (metrics_csv,) = tmp_path.glob("csv/version_*/metrics.csv")
    rows = list(csv.DictReader(metrics_csv.open()))
    acc = [float(r["val/zeroshot_acc1"]) for r in rows if r.get("val/zeroshot_acc1")]
    recall = [float(r["val/t2i_r10"]) for r in rows if r.get("val/t2i_r10")]
    assert len(acc) == 1 and 0.0 <= acc[0] <= 1.0 and len(recall) == 1
    (ckpt,) = tmp_path.glob("tb/version_*/checkpoints/last.ckpt")
    from transformers import CLIPModel

    from mmpretrain.export import export_checkpoint

    hf = CLIPModel.from_pretrained(export_checkpoint(ckpt, tmp_path / "hf"))
    assert hf.config.vision_config.image_size == 64 and hf.config.text_config.max_position_embeddings == 32
