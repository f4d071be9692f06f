"""Semi-causal LM task: Lightning training on spans, validation perplexity over ranks, the image-text path."""

from __future__ import annotations

import math
import random
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from mmpretrain.data.semicausal import ImageCaptionDataModule
from mmpretrain.data.text import TextDataModule
from mmpretrain.data.writer import ShardWriter
from mmpretrain.models.metalm import IGNORE_INDEX, semicausal_targets
from mmpretrain.tasks.semicausal_lm import SemiCausalLM, TokenLoss

TINY = dict(dim=32, layers=2, heads=4, encoder_dim=32, encoder_layers=1, encoder_heads=4)
TINY_VL = dict(dim=32, layers=2, heads=4, image_kwargs=dict(img_size=16, patch_size=8, embed_dim=32, depth=1,
                                                            num_heads=2))


def write_docs(directory: Path, count: int, prefix: str) -> str:
    """Documents with structure a tiny model picks up in a few steps: counting sequences."""
    rng = random.Random(prefix)
    with ShardWriter(directory, prefix=prefix, shard_size=count, metadata={"kind": "text"}) as w:
        for i in range(count):
            start = rng.randint(0, 50)
            w.write({"__key__": f"{i:05d}", "txt": " ".join(str(n) for n in range(start, start + rng.randint(10, 40)))})
    return str(directory / f"{prefix}-*.tar")


def text_data(tmp_path: Path, **kwargs) -> TextDataModule:
    kwargs = {"tokenizer": "demo", "seq_len": 48, "batch_size": 4, "num_workers": 0, "mode": "epoch",
              "spans": {"min_len": 3, "max_len": 8, "coverage": 0.25}, **kwargs}
    return TextDataModule(train_shards=write_docs(tmp_path, 40, "train"), val_shards=write_docs(tmp_path, 12, "val"),
                          **kwargs)


def trainer(tmp_path: Path, steps: int, **kwargs) -> pl.Trainer:
    return pl.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path, accelerator="cpu", num_sanity_val_steps=0,
                      enable_checkpointing=False, **kwargs)


def test_fit_on_spans_reads_the_tokenizer_and_validates(tmp_path):
    data = text_data(tmp_path)
    torch.manual_seed(0)
    task = SemiCausalLM(preset="metalm_demo", overrides=TINY, vocab_size=data.vocab_size,
                        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    fit = trainer(tmp_path, 20, val_check_interval=20, check_val_every_n_epoch=None)
    fit.validate(task, datamodule=data)
    before = fit.callback_metrics["val/loss"].item()
    fit.fit(task, datamodule=data)
    tok = data.tokenizer
    assert (task.bos_id, task.eos_id, task.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert task.model.eos_id == tok.eos_id and task.model.vocab_size == tok.vocab_size
    metrics = fit.callback_metrics
    after = metrics["val/loss"].item()
    assert math.isfinite(after) and after < before - 1.0, (before, after)
    torch.testing.assert_close(metrics["val/ppl"], metrics["val/loss"].exp())
    assert 0.1 < metrics["train/span_fraction"].item() < 0.4
    assert task.flops_per_batch and task.flops_per_batch > 0
    path = tmp_path / "model.ckpt"
    fit.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["hyper_parameters"]["eos_id"] == tok.eos_id and ckpt["hyper_parameters"]["pad_id"] == tok.pad_id
    assert ckpt["mmpretrain"]["task"] == "mmpretrain.tasks.semicausal_lm.SemiCausalLM"
    # prediction on text: the mean target-token loss of each sequence
    batch = next(iter(data.val_dataloader()))
    with torch.no_grad():
        out = task.predict_step(batch, 0)
    assert out["loss"].shape == (4,) and torch.isfinite(out["loss"]).all() and (out["tokens"] > 0).all()


def test_validation_loss_is_the_token_mean_over_every_batch(tmp_path):
    """Not the mean of batch means: batches with few target tokens weigh little."""
    data = text_data(tmp_path, val_batch_size=5)
    task = SemiCausalLM(preset="metalm_demo", overrides=TINY, vocab_size=data.vocab_size)
    task.configure_model()
    task.eval()
    sums, counts = [], []
    with torch.no_grad():
        for batch in data.val_dataloader():
            out = task.compute_loss(task.model, batch)
            task.val_loss.update(out["loss_sum"], out["tokens"])
            logits = task.model(batch["input_ids"], batch["spans"], batch["span_ids"])
            targets = semicausal_targets(batch["input_ids"], batch["spans"], batch["doc_ids"])
            sums.append(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                                        reduction="sum"))
            counts.append(int((targets != IGNORE_INDEX).sum()))
    assert len(counts) > 1 and len(set(counts)) > 1  # the padded last batch holds fewer targets
    expected = torch.stack(sums).sum() / sum(counts)
    torch.testing.assert_close(task.val_loss.compute().float(), expected)


def test_perplexity_is_aggregated_over_ranks_by_token_counts():
    """Two ranks' (loss sum, token count) states are summed before dividing: rank 0 holds two batches (30 tokens
    at 2.0, 10 at 1.0), rank 1 one (60 tokens at 4.0); the mean is 3.1 per token, not the mean of rank means.
    The gather is simulated in-process through torchmetrics' ``dist_sync_fn`` hook (the reduction is ours)."""
    other = TokenLoss()
    other.update(torch.tensor(240.0), torch.tensor(60))

    def gather(state: torch.Tensor, group=None) -> list[torch.Tensor]:
        theirs = other.loss_sum if state.dtype == torch.float64 else other.tokens
        return [state, theirs]

    metric = TokenLoss(dist_sync_fn=gather, distributed_available_fn=lambda: True)
    metric.update(torch.tensor(60.0), torch.tensor(30))
    metric.update(torch.tensor(10.0), torch.tensor(10))
    assert abs(float(metric.compute()) - 3.1) < 1e-12
    assert abs(float(other.compute()) - 4.0) < 1e-12


def test_loss_ignores_span_tokens_and_padding():
    task = SemiCausalLM(preset="metalm_demo", overrides=TINY, vocab_size=50)
    task.configure_model()
    ids = torch.randint(3, 50, (2, 16))
    doc_ids = torch.zeros(2, 16, dtype=torch.long)
    doc_ids[1, 12:] = -1
    spans = torch.tensor([[0, 4, 3], [1, 1, 5]])
    out = task.compute_loss(task.model, {"input_ids": ids, "doc_ids": doc_ids, "spans": spans})
    # row 0: 15 next tokens minus 3 in the span; row 1: 11 real next tokens minus 5 in the span
    assert int(out["tokens"]) == (15 - 3) + (11 - 5)
    torch.testing.assert_close(out["loss"], out["loss_sum"] / out["tokens"])


def test_no_weight_decay_for_norms_biases_and_embeddings():
    task = SemiCausalLM(preset="metalm_demo", overrides={**TINY, "positions": "learned"}, vocab_size=50)
    task.configure_model()
    optimizer = task.configure_optimizers()
    assert optimizer.defaults["lr"] == 6e-4 and optimizer.defaults["betas"] == (0.9, 0.98)
    names = {id(p): n for n, p in task.model.named_parameters()}
    decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    free = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decayed | free == set(names.values()) and not decayed & free
    assert {"embed.weight", "pos_embed.weight", "encoder.embed.weight", "blocks.0.ln_1.weight", "blocks.0.attn.qkv.bias",
            "ln_f.weight", "connector.proj.bias", "encoder.blocks.0.mlp.fc.bias"} <= free
    assert {"blocks.0.attn.qkv.weight", "blocks.1.mlp.proj.weight", "encoder.blocks.0.attn.proj.weight",
            "connector.proj.weight"} <= decayed


def test_image_captions_train_and_generate(tmp_path, image_shards):
    urls = image_shards([16])
    data = ImageCaptionDataModule(train_shards=urls, val_shards=urls, tokenizer="demo", context_length=8,
                                  image_size=16, batch_size=4, num_workers=0, mode="epoch")
    torch.manual_seed(0)
    task = SemiCausalLM(preset="metalm_vl_demo", overrides=TINY_VL, vocab_size=data.vocab_size, max_new_tokens=5,
                        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    fit = trainer(tmp_path, 8)
    fit.fit(task, datamodule=data)
    assert math.isfinite(fit.callback_metrics["val/loss"].item())
    batch = next(iter(data.val_dataloader()))
    with torch.no_grad():
        out = task.predict_step(batch, 0)
    assert out["token_ids"].shape[0] == 4 and out["token_ids"].shape[1] <= 5
    assert len(out["caption"]) == 4 and all(isinstance(c, str) for c in out["caption"])
    # the loss covers caption tokens after the beginning-of-text prompt, never padding
    out = task.compute_loss(task.model, batch)
    assert int(out["tokens"]) == int((batch["doc_ids"] >= 0).sum()) - 4


def test_image_encoder_starts_from_a_clip_checkpoint(tmp_path):
    from mmpretrain.models.clip import create_clip

    clip = create_clip("clip_demo")  # its image tower: the CLIP layout, 64 px, 8 px patches, 4 x 128
    torch.save({"state_dict": {f"model.{k}": v for k, v in clip.state_dict().items()}}, tmp_path / "clip.ckpt")
    task = SemiCausalLM(preset="metalm_vl_demo", vocab_size=64, image_init_from=str(tmp_path / "clip.ckpt"))
    task.configure_model()
    tower = clip.visual.trunk.state_dict()
    mine = task.model.image_encoder.state_dict()
    assert mine.keys() == tower.keys()
    assert all(torch.equal(mine[k], tower[k]) for k in mine)


def test_configuration_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="model.preset"):
        SemiCausalLM(preset="metalm_7b")
    with pytest.raises(ValueError, match="model.overrides.eos_id"):
        SemiCausalLM(overrides={"eos_id": 3})
    data = text_data(tmp_path)
    task = SemiCausalLM(preset="metalm_demo", overrides={**TINY, "encoder_layers": 0}, vocab_size=data.vocab_size)
    with pytest.raises(ValueError, match="data.spans is set but metalm_demo has no span encoder"):
        trainer(tmp_path, 1).fit(task, datamodule=data)
    with pytest.raises(ValueError, match="image_init_from"):
        SemiCausalLM(preset="metalm_demo", vocab_size=50, image_init_from="x.ckpt").configure_model()
