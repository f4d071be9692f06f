"""The classification task: losses (hard, smoothed, Mixup/CutMix soft targets), EMA, parameter groups, schedule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmpretrain.optim import WarmupCosine
from mmpretrain.tasks.classification import ImageClassification

TINY = {"img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


def make_task(**kw) -> ImageClassification:
    task = ImageClassification(backbone="vit_tiny_patch16_224", backbone_kwargs=TINY, num_classes=4, **kw)
    task.configure_model()
    return task


def batch(n=4):
    g = torch.Generator().manual_seed(0)
    return {"image": torch.randn(n, 3, 16, 16, generator=g), "label": torch.tensor([0, 1, 2, 3] * (n // 4))}


def test_hard_and_smoothed_loss_match_cross_entropy():
    task = make_task(label_smoothing=0.1)
    b = batch()
    out = task.compute_loss(task.model, b)
    assert torch.allclose(out["loss"], F.cross_entropy(out["logits"], b["label"], label_smoothing=0.1))


def test_mixup_cutmix_uses_soft_targets_and_keeps_gradients_flowing():
    torch.manual_seed(0)
    task = make_task(mixup=0.8, cutmix=1.0, label_smoothing=0.1)
    b = batch(8)
    image, soft = task.mixup_fn(b["image"].clone(), b["label"])
    assert soft.shape == (8, 4) and torch.allclose(soft.sum(-1), torch.ones(8))
    assert not torch.equal(image, b["image"])  # the batch was mixed
    out = task.compute_loss(task.model, {"image": image, "label": soft})
    expected = torch.sum(-soft * F.log_softmax(out["logits"], -1), -1).mean()
    assert torch.allclose(out["loss"], expected)
    out["loss"].backward()
    assert all(p.grad is not None for p in task.model.parameters() if p.requires_grad)


def test_mixup_rejects_odd_batches():
    task = make_task(mixup=0.8)
    with pytest.raises(ValueError, match="even batch size"):
        task.training_step(batch(4) | {"image": torch.randn(3, 3, 16, 16), "label": torch.tensor([0, 1, 2])}, 0)


def test_ema_update_moves_towards_the_model():
    task = make_task(ema_decay=0.5)
    ema_before = [p.detach().clone() for p in task.ema.module.parameters()]
    with torch.no_grad():
        for p in task.model.parameters():
            p.add_(1.0)
    task.ema.update(task.model, step=1000)
    for before, ema, model in zip(ema_before, task.ema.module.parameters(), task.model.parameters()):
        assert torch.allclose(ema, 0.5 * before + 0.5 * model, atol=1e-6)
    assert not any(p.requires_grad for p in task.ema.parameters())
    assert all(id(p) not in {id(q) for g in task.parameter_groups() for q in g["params"]} for p in task.ema.parameters())


def test_parameter_groups_exclude_norms_biases_and_tokens_from_decay():
    task = make_task()
    groups = task.parameter_groups()
    no_decay = {id(p) for g in groups if g.get("weight_decay") == 0.0 for p in g["params"]}
    names = {n for n, p in task.model.named_parameters() if id(p) in no_decay}
    assert {"cls_token", "pos_embed", "norm.weight", "head.bias"} <= names
    assert "blocks.0.attn.qkv.weight" not in names


def test_layer_decay_scales_learning_rates_by_depth():
    task = make_task(layer_decay=0.5, optimizer=lambda p: torch.optim.AdamW(p, lr=1.0, weight_decay=0.05))
    opt = task.configure_optimizers()
    lrs = {}
    for g in opt.param_groups:
        for p in g["params"]:
            lrs[id(p)] = (g["lr"], g["weight_decay"])
    named = dict(task.model.named_parameters())
    head_lr = lrs[id(named["head.weight"])][0]
    block0_lr = lrs[id(named["blocks.0.attn.qkv.weight"])][0]
    embed_lr = lrs[id(named["patch_embed.proj.weight"])][0]
    assert head_lr == 1.0 and block0_lr == pytest.approx(0.25) and embed_lr == pytest.approx(0.125)
    assert lrs[id(named["blocks.0.attn.qkv.weight"])][1] == 0.05
    assert lrs[id(named["blocks.0.norm1.weight"])][1] == 0.0


def test_warmup_cosine_schedule():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = WarmupCosine(opt, warmup_epochs=1.0, min_lr_ratio=0.1)
    sched.resolve(total_steps=110, steps_per_epoch=10)
    lrs = []
    for _ in range(110):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1 / 11) and lrs[9] == pytest.approx(10 / 11)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    state = sched.state_dict()
    fresh = WarmupCosine(torch.optim.SGD([p], lr=1.0))
    fresh.load_state_dict(state)
    assert fresh.factor(50) == sched.factor(50)


def test_flops_are_counted_on_the_meta_device():
    task = make_task()
    flops = task.count_flops(batch())
    # forward + backward of a 2-block ViT: at least three times the forward matmul FLOPs
    assert flops and flops > 3 * 2 * 4 * 5 * (2 * 32 * 96 + 2 * 32 * 128)


def test_init_from_a_clip_checkpoint_takes_the_image_tower_and_keeps_a_new_head(tmp_path):
    from mmpretrain.models.clip import create_clip

    clip = create_clip("clip_demo")
    torch.save({"state_dict": {f"model.{k}": v for k, v in clip.state_dict().items()}}, tmp_path / "clip.ckpt")
    trunk = clip.visual.trunk
    # the CLIP demo tower's layout (pre-norm), read off the tower itself
    kwargs = {"img_size": 64, "patch_size": 8, "embed_dim": trunk.embed_dim, "depth": len(trunk.blocks),
              "num_heads": trunk.blocks[0].attn.num_heads, "pre_norm": True}
    fresh = ImageClassification(backbone="vit_tiny_patch16_224", backbone_kwargs=kwargs, num_classes=5)
    fresh.configure_model()
    task = ImageClassification(backbone="vit_tiny_patch16_224", backbone_kwargs=kwargs, num_classes=5,
                               init_from=str(tmp_path / "clip.ckpt"))
    task.configure_model()
    tower = trunk.state_dict()
    for name, value in task.model.state_dict().items():
        if name.startswith("head."):
            assert value.shape[0] == 5  # new head, sized for the new classes
        else:
            assert torch.equal(value, tower[name]), name
    assert not torch.equal(task.model.blocks[0].attn.qkv.weight, fresh.model.blocks[0].attn.qkv.weight)


def test_init_from_the_wrong_architecture_names_the_mismatch(tmp_path):
    from mmpretrain.checkpoints import CheckpointError

    other = make_task()
    torch.save({"state_dict": {f"model.{k}": v for k, v in other.model.state_dict().items()}}, tmp_path / "c.ckpt")
    with pytest.raises(CheckpointError, match="do not fit"):
        ImageClassification(backbone="vit_tiny_patch16_224", backbone_kwargs={**TINY, "embed_dim": 64},
                            num_classes=4, init_from=str(tmp_path / "c.ckpt")).configure_model()
