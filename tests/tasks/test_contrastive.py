"""Contrastive pretraining: exact accumulation, the global batch over 2 gloo ranks, Lightning steps, evaluation."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mmpretrain.data.image_text import ImageTextDataModule
from mmpretrain.optim import WarmupCosine
from mmpretrain.tasks.contrastive import (
    ContrastivePretraining,
    micro_batch_sizes,
    retrieval_recall,
    zero_shot_accuracy,
)
from tests.distributed import gloo_group

TINY = dict(
    embed_dim=16,
    vision_kwargs=dict(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2),
    text_kwargs=dict(context_length=8, width=32, heads=2, layers=1),
)
VOCAB, EOT, PAD = 50, 3, 2
LR = 0.02


def make_task(double: bool = True, **kwargs) -> ContrastivePretraining:
    torch.manual_seed(0)
    kwargs.setdefault("overrides", TINY)
    task = ContrastivePretraining(preset="clip_demo", vocab_size=VOCAB, eot_id=EOT, **kwargs)
    task.configure_model()
    if double:
        task.model.double()
    return task


def pairs(n: int, seed: int = 1, dtype=torch.float64) -> dict[str, torch.Tensor]:
    """Random images and token rows ``[1, ids..., EOT, PAD...]`` of varied lengths."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.full((n, 8), PAD)
    tokens[:, 0] = 1
    for i in range(n):
        length = 2 + i % 5
        tokens[i, 1:length] = torch.randint(4, VOCAB, (length - 1,), generator=g)
        tokens[i, length] = EOT
    return {"image": torch.randn(n, 3, 16, 16, generator=g, dtype=dtype), "input_ids": tokens}


def grads(task: ContrastivePretraining) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in task.model.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------------- exact accumulation


@pytest.mark.parametrize("siglip", [False, True], ids=["clip", "siglip"])
@pytest.mark.parametrize("micro", [2, 4, 3, 10], ids=["2", "4", "3-not-a-divisor", "10-some-empty"])
def test_accumulated_gradients_equal_those_of_the_whole_batch(siglip, micro):
    batch = pairs(8)
    whole = make_task(siglip=siglip)
    loss = whole.compute_loss(whole.model, batch)["loss"]
    loss.backward()
    expected = grads(whole)

    task = make_task(siglip=siglip, accumulate_micro_batches=micro)
    acc_loss = task.accumulate_gradients(batch)
    got = grads(task)
    assert got.keys() == expected.keys() and "logit_scale" in got
    for name, grad in got.items():
        torch.testing.assert_close(grad, expected[name], msg=name)
    torch.testing.assert_close(acc_loss, loss.detach())


def test_micro_batch_sizes_follow_tensor_split():
    for rows, count in ((8, 2), (8, 3), (7, 4), (3, 5), (0, 2)):
        expected = [len(part) for part in torch.arange(rows).tensor_split(count)]
        assert micro_batch_sizes(rows, count) == expected, (rows, count)


# ----------------------------------------------------------------------------------- two gloo ranks

WORLD, BATCH = 2, 8
# pairs per rank in a step: equal, one rank short (a sample the GPU decoder dropped after batching), and so
# short that some of its micro-batches are empty
SHARES = ((4, 4), (5, 3), (7, 1))


def _check_global_batch(rank: int, shares: tuple[int, int]) -> None:
    batch = pairs(sum(shares))
    start = sum(shares[:rank])
    local_batch = {k: v[start:start + shares[rank]] for k, v in batch.items()}
    for siglip in (False, True):
        # the reference: one process with the whole batch (no process group is consulted for it)
        reference = make_task(siglip=siglip)
        img, txt, scale, bias = reference.model(batch["image"], batch["input_ids"])
        from mmpretrain.models.losses import clip_loss_from_features, siglip_loss_from_features

        ref_loss = (siglip_loss_from_features(img, txt, scale, bias) if siglip
                    else clip_loss_from_features(img, txt, scale))
        ref_loss.backward()
        expected = grads(reference)
        for micro in (1, 2, 3):
            task = make_task(siglip=siglip, accumulate_micro_batches=micro)
            if micro == 1:
                loss = task.compute_loss(task.model, local_batch)["loss"]
                loss.backward()
            else:
                loss = task.accumulate_gradients(local_batch)
            where = f"shares={shares} siglip={siglip} micro={micro}"
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            torch.testing.assert_close(mean_loss / WORLD, ref_loss.detach(), msg=where)
            for name, p in task.model.named_parameters():  # what DDP does: average over the ranks
                grad = p.grad.clone()
                dist.all_reduce(grad)
                torch.testing.assert_close(grad / WORLD, expected[name], msg=f"{where} {name}")


def _worker(rank: int, init_file: str) -> None:
    torch.set_num_threads(1)  # two ranks on a 2-core machine: more threads only contend
    with gloo_group(rank, WORLD, init_file):
        for shares in SHARES:
            _check_global_batch(rank, shares)
        batch = pairs(BATCH)

        # evaluation: uneven shares of the validation set (one rank with none at all), gathered, give the
        # single-process figures
        task = make_task()
        labels = torch.tensor([0, 1, 2, 0, 1, 2, -1, 0])
        classes = pairs(3, seed=7)["input_ids"].view(3, 1, 8)
        with torch.no_grad():
            img = task.model.encode_image(batch["image"]).float()
            txt = task.model.encode_text(batch["input_ids"]).float()
            task._zero_shot_weights = task.zero_shot_weights(classes)
        expected = {**retrieval_recall(img, txt), **zero_shot_accuracy(img, task._zero_shot_weights, labels)}
        for shares in ([slice(0, 5), slice(5, 8)], [slice(0, 8), slice(8, 8)]):
            task._reset_evaluation()
            share = shares[rank]
            if share.stop > share.start:
                task.eval_image_features.append(img[share])
                task.eval_text_features.append(txt[share])
                task.eval_labels.append(labels[share])
            metrics = task.evaluation_metrics()
            assert metrics.keys() == expected.keys()
            for name, value in expected.items():
                torch.testing.assert_close(metrics[name], value, msg=name)


def test_two_gloo_ranks_train_on_the_global_batch(tmp_path):
    """Loss and DDP-averaged gradients of 2 ranks holding 4+4, 5+3 or 7+1 pairs, with and without exact
    accumulation (2 and 3 micro-batches), equal one process on all the pairs; evaluation metrics gathered
    from both ranks equal the single-process ones."""
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"),), nprocs=WORLD, join=True)


# ----------------------------------------------------------------------------------- through Lightning


class LogitScales(pl.Callback):
    """Records the log logit scale after every training step."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, task, *args) -> None:
        self.values.append(task.model.logit_scale.item())


def fit(task: ContrastivePretraining, batches: list[dict], tmp_path, **trainer_kwargs) -> pl.Trainer:
    trainer = pl.Trainer(max_steps=len(batches), logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu",
                         num_sanity_val_steps=0, callbacks=[LogitScales()], **trainer_kwargs)
    trainer.fit(task, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return trainer


def sgd_task(**kwargs) -> ContrastivePretraining:
    torch.manual_seed(0)
    # the log logit scale starts far above ln(100): the first step must clamp it
    overrides = {**TINY, "init_logit_scale": 6.0}
    return ContrastivePretraining(
        preset="clip_demo", overrides=overrides, vocab_size=VOCAB, eot_id=EOT,
        optimizer=lambda p: torch.optim.SGD(p, lr=LR, weight_decay=0.1),
        lr_scheduler=lambda opt: WarmupCosine(opt, warmup_steps=1), **kwargs,
    )


@pytest.mark.parametrize("clip_val", [None, 0.05])
def test_exact_accumulation_steps_like_the_whole_batch_in_lightning(tmp_path, clip_val):
    batches = [pairs(8, seed=s) for s in (1, 2, 3)]
    plain = sgd_task()
    fit(plain, batches, tmp_path / "a", precision="64-true", gradient_clip_val=clip_val)
    micro = sgd_task(accumulate_micro_batches=2)
    trainer = fit(micro, batches, tmp_path / "b", precision="64-true", gradient_clip_val=clip_val)
    assert not micro.automatic_optimization and trainer.global_step == 3
    for (name, a), b in zip(plain.model.named_parameters(), micro.model.parameters()):
        torch.testing.assert_close(a, b, msg=name)
    for task in (plain, micro):  # clamped from 6.0 by the first step, then never above ln(100)
        scales = task.trainer.callbacks[0].values
        assert scales[0] == pytest.approx(math.log(100), abs=1e-12) and max(scales) <= math.log(100)
    # the schedule advanced once per optimizer step in both modes
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(LR * WarmupCosine(
        torch.optim.SGD([torch.zeros(1)], lr=1.0), warmup_steps=1, total_steps=3).factor(3))


@pytest.mark.parametrize("micro", [1, 2])
def test_lightning_gradient_accumulation_is_refused(tmp_path, micro):
    task = sgd_task(accumulate_micro_batches=micro)
    with pytest.raises(ValueError, match="accumulate_micro_batches"):
        fit(task, [pairs(8)], tmp_path, accumulate_grad_batches=2)


def test_no_weight_decay_for_norms_biases_embeddings_and_the_logit_scale():
    task = make_task(double=False, siglip=True)
    optimizer = task.configure_optimizers()
    assert optimizer.defaults["betas"] == (0.9, 0.98) and optimizer.defaults["eps"] == 1e-6
    names = {id(p): n for n, p in task.model.named_parameters()}
    decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0.2 for p in g["params"]}
    not_decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert decayed | not_decayed == set(names.values()) and not decayed & not_decayed
    assert {"logit_scale", "logit_bias", "visual.trunk.cls_token", "visual.trunk.pos_embed", "text.positional_embedding",
            "text.token_embedding.weight", "text.ln_final.weight", "visual.trunk.blocks.0.attn.qkv.bias",
            "text.blocks.0.mlp.fc.bias"} <= not_decayed
    assert {"visual.trunk.blocks.0.attn.qkv.weight", "text.blocks.0.attn.qkv.weight", "visual.proj.weight",
            "text.proj.weight", "visual.trunk.patch_embed.proj.weight"} <= decayed


def test_fit_takes_the_end_of_text_id_from_the_data_and_validates(tmp_path, image_shards):
    train = image_shards([24])
    val = image_shards([10], prefix="val")
    data = ImageTextDataModule(train_shards=train, val_shards=val, tokenizer="demo", context_length=8, image_size=16,
                               label_key="cls", batch_size=8, num_workers=0, mode="epoch")
    torch.manual_seed(0)
    task = ContrastivePretraining(preset="clip_demo", overrides=TINY, vocab_size=data.vocab_size,
                                  class_names=data.class_names)
    trainer = pl.Trainer(max_steps=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, accelerator="cpu", num_sanity_val_steps=0,
                         enable_checkpointing=False)
    trainer.fit(task, datamodule=data)
    assert task.eot_id == data.tokenizer.eos_id == task.model.text.eot_id
    metrics = trainer.callback_metrics
    names = ["val/loss", "val/zeroshot_acc1", "val/zeroshot_acc5"] + [
        f"val/{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
    assert set(names) <= set(metrics)
    assert all(0.0 <= metrics[n].item() <= 1.0 for n in names[1:])
    assert metrics["val/i2t_r10"].item() == 1.0  # 10 validation pairs: every match is in the top 10
    # zero-shot top-5 of 3 classes is top-3: always right
    assert metrics["val/zeroshot_acc5"].item() == 1.0
    # prediction: embeddings of every pair and each image's zero-shot class (the step alone: Lightning's
    # predict loop cannot re-instantiate the shard loader)
    task.on_predict_epoch_start()
    with torch.no_grad():
        out = task.predict_step(next(iter(data.val_dataloader())), 0)
    assert out["image_embeds"].shape == (8, 16) and torch.allclose(out["image_embeds"].norm(dim=-1), torch.ones(8))
    assert set(out["class_name"]) <= {"c0", "c1", "c2"} and ((out["prob"] > 1 / 3) & (out["prob"] <= 1)).all()
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["hyper_parameters"]["eot_id"] == data.tokenizer.eos_id
    assert ckpt["mmpretrain"]["task"] == "mmpretrain.tasks.contrastive.ContrastivePretraining"


def test_data_that_does_not_fit_the_model_is_named(tmp_path, image_shards):
    urls = image_shards([8])
    data = ImageTextDataModule(train_shards=urls, tokenizer="demo", context_length=16, image_size=16, batch_size=4,
                               num_workers=0)
    task = ContrastivePretraining(preset="clip_demo", overrides=TINY, vocab_size=data.vocab_size)
    trainer = pl.Trainer(max_steps=1, logger=False, enable_progress_bar=False, accelerator="cpu",
                         default_root_dir=tmp_path, enable_checkpointing=False)
    with pytest.raises(ValueError, match="data.context_length"):
        trainer.fit(task, datamodule=data)
    task = ContrastivePretraining(preset="clip_demo", overrides=TINY, vocab_size=data.vocab_size, eot_id=7)
    with pytest.raises(ValueError, match="eot_id"):
        pl.Trainer(max_steps=1, logger=False, accelerator="cpu", default_root_dir=tmp_path,
                   enable_checkpointing=False).fit(task, datamodule=data)


def test_configuration_errors_name_the_field():
    with pytest.raises(ValueError, match="model.preset"):
        ContrastivePretraining(preset="clip_vit_h14")
    with pytest.raises(ValueError, match="model.siglip"):
        ContrastivePretraining(preset="clip_demo", overrides={"siglip": True})
    with pytest.raises(ValueError, match="model.vocab_size"):
        ContrastivePretraining(preset="clip_demo", overrides={"text_kwargs": {"vocab_size": 10}})
    with pytest.raises(ValueError, match="accumulate_micro_batches"):
        ContrastivePretraining(preset="clip_demo", accumulate_micro_batches=0)


# ----------------------------------------------------------------------------------- metrics


def test_retrieval_recall_matches_a_brute_force_ranking():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(30, 8, generator=g), dim=-1)
    txt = F.normalize(img + 0.8 * torch.randn(30, 8, generator=g), dim=-1)
    got = retrieval_recall(img, txt, ks=(1, 5, 10), chunk=7)
    sim = img @ txt.T
    for name, scores in (("i2t", sim), ("t2i", sim.T)):
        order = scores.argsort(dim=1, descending=True)
        position = (order == torch.arange(30)[:, None]).float().argmax(1)  # where each match lands
        for k in (1, 5, 10):
            assert got[f"{name}_r{k}"].item() == pytest.approx((position < k).float().mean().item())
    assert 0 < got["i2t_r1"] < got["i2t_r10"] < 1  # a case that tells the ks apart


def test_zero_shot_accuracy_ignores_unlabelled_samples():
    weights = torch.eye(3, 4)
    image = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0.1, 0], [0, 0.6, 0.8, 0], [0, 0, 1.0, 0]])
    labels = torch.tensor([0, 2, 2, -1])
    acc = zero_shot_accuracy(image, weights, labels, top_k=(1, 2, 5))
    assert acc["zeroshot_acc1"].item() == pytest.approx(2 / 3)
    assert acc["zeroshot_acc2"].item() == 1.0 and acc["zeroshot_acc5"].item() == 1.0


def test_zero_shot_weights_average_templates_then_renormalise():
    task = make_task(double=False)
    prompts = torch.stack([pairs(2, seed=s)["input_ids"] for s in (3, 4, 5)])  # 3 classes x 2 templates
    weights = task.zero_shot_weights(prompts)
    with torch.no_grad():
        per_prompt = task.model.encode_text(prompts.view(6, 8)).view(3, 2, -1)
    torch.testing.assert_close(weights, F.normalize(per_prompt.mean(1), dim=-1))

