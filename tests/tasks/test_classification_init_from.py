"""The classification task's init_from: keeping the head (init_head) and resampling Vim's position embedding.

Vim keeps its class token in the middle of the sequence but stores that token's position-embedding entry
first (timm's prefix layout), so the grid part resamples as a plain 2-D grid and the class entry is carried
over unchanged: a stride-16 checkpoint starts the stride-8 fine-tune (vim_tiny_ft_stride8.yaml).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmpretrain.checkpoints import CheckpointError
from mmpretrain.tasks.classification import ImageClassification

VIT = {"img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}
VIM = {"img_size": 32, "patch_size": 16, "embed_dim": 16, "depth": 1, "d_state": 4, "backend": "reference"}


def save(task: ImageClassification, path) -> str:
    torch.save({"state_dict": {f"model.{k}": v for k, v in task.model.state_dict().items()}}, path)
    return str(path)


def task_of(backbone: str, kwargs: dict, num_classes: int, seed: int = 0, **kw) -> ImageClassification:
    torch.manual_seed(seed)
    task = ImageClassification(backbone=backbone, backbone_kwargs=kwargs, num_classes=num_classes, **kw)
    task.configure_model()
    return task


def test_init_head_keeps_the_checkpoints_head_and_the_default_starts_a_new_one(tmp_path):
    src = task_of("vit_tiny_patch16_224", VIT, 4, seed=0)
    ckpt = save(src, tmp_path / "c.ckpt")
    kept = task_of("vit_tiny_patch16_224", VIT, 4, seed=1, init_from=ckpt, init_head=True)
    new = task_of("vit_tiny_patch16_224", VIT, 4, seed=1, init_from=ckpt)
    for name, value in src.model.state_dict().items():
        assert torch.equal(kept.model.state_dict()[name], value), name
        if not name.startswith("head."):
            assert torch.equal(new.model.state_dict()[name], value), name
    assert not torch.equal(new.model.head.weight, src.model.head.weight)
    images = torch.randn(2, 3, 16, 16)
    src.model.eval(), kept.model.eval()
    with torch.no_grad():
        assert torch.equal(kept.model(images), src.model(images))


def test_init_head_with_other_classes_or_no_head_says_what_to_do(tmp_path):
    ckpt = save(task_of("vit_tiny_patch16_224", VIT, 4), tmp_path / "c.ckpt")
    with pytest.raises(CheckpointError, match=r"model.init_head is set.*head.weight.*\(4, 32\).*\(5, 32\).*"
                                              r"model.num_classes.*model.init_head false"):
        task_of("vit_tiny_patch16_224", VIT, 5, init_from=ckpt, init_head=True)
    # a checkpoint without a head (as a CLIP image tower's)
    state = torch.load(ckpt)
    state["state_dict"] = {k: v for k, v in state["state_dict"].items() if ".head." not in k}
    torch.save(state, tmp_path / "headless.ckpt")
    with pytest.raises(CheckpointError, match="head is absent"):
        task_of("vit_tiny_patch16_224", VIT, 4, init_from=str(tmp_path / "headless.ckpt"), init_head=True)
    # without init_head, other classes are fine: the head starts new
    assert task_of("vit_tiny_patch16_224", VIT, 5, init_from=ckpt).model.head.weight.shape == (5, 32)


def test_vim_stride16_checkpoint_starts_a_stride8_model_with_its_head_and_resampled_positions(tmp_path):
    src = task_of("vim_tiny", VIM, 3, seed=0)
    assert src.model.patch_embed.grid_size == (2, 2) and src.model.cls_index == 2
    D = VIM["embed_dim"]
    # a grid embedding that is linear in (row, col), and a class entry far from every grid value
    rows, cols = torch.meshgrid(torch.arange(2.0), torch.arange(2.0), indexing="ij")
    grid = (rows + 2 * cols).reshape(1, 4, 1) * torch.linspace(0.5, 1.5, D)
    with torch.no_grad():
        src.model.pos_embed.copy_(torch.cat([torch.full((1, 1, D), 100.0), grid], dim=1))
    ckpt = save(src, tmp_path / "vim16.ckpt")

    ft = task_of("vim_tiny", {**VIM, "stride": 8}, 3, seed=1, init_from=ckpt, init_head=True)
    model = ft.model
    assert model.patch_embed.grid_size == (3, 3) and model.cls_index == 4  # 9 patches, class token in the middle
    pos = model.pos_embed.detach()
    assert pos.shape == (1, 10, D)
    # the class token's entry is carried over exactly; none of it leaks into the grid
    assert torch.equal(pos[:, 0], src.model.pos_embed.detach()[:, 0])
    assert pos[:, 1:].abs().max() < 10
    # the grid is resampled as a 2-D image (timm's bicubic, antialiased resampling)
    expected = F.interpolate(grid.reshape(1, 2, 2, D).permute(0, 3, 1, 2), size=(3, 3), mode="bicubic",
                             antialias=True, align_corners=False).permute(0, 2, 3, 1).reshape(1, 9, D)
    torch.testing.assert_close(pos[:, 1:], expected)
    # everything else, the head included, is the checkpoint's
    for name, value in src.model.state_dict().items():
        if name != "pos_embed":
            assert torch.equal(model.state_dict()[name], value), name
    # the class token enters the sequence in the middle with its own (kept) entry
    tokens = model.embed(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(tokens[:, model.cls_index], (model.cls_token + pos[:, :1])[:, 0].expand(2, -1))
    assert math.isfinite(model(torch.randn(1, 3, 32, 32)).sum().item())
