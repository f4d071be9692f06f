"""Semi-causal language modeling (METALM) on packed text with random non-causal spans, or on image-caption pairs.

Training
--------
The model (:class:`~mmpretrain.models.metalm.MetaLM`) reads a batch of packed sequences with the spans the
data workers drew (``spans``, ``span_ids``: :class:`~mmpretrain.data.text.TextDataModule` with ``spans``) or
of images with their captions (:class:`~mmpretrain.data.semicausal.ImageCaptionDataModule`). The loss is the
mean next-token cross-entropy over the tokens that are targets (:func:`~mmpretrain.models.metalm.semicausal_targets`:
outside spans, not padding; a token that is an encoder input is never a target), on each rank over its own
target tokens (DDP then averages the ranks' gradients; ranks hold near-equal token counts).

Validation and test
-------------------
``val/loss``: the mean token loss over every target token of the validation set, summed over batches and
ranks as (loss sum, token count) pairs, not averaged per batch; ``val/ppl``: its exponential (perplexity per
target token). Validation sequences get spans too (drawn from a fixed seed: the same every time), so the
figures measure the semi-causal objective that training optimises.

Throughput
----------
Lightning's throughput monitor (set up by the CLI) reports tokens per second (``input_ids`` elements:
every token of the packed sequences, span tokens included; for captions, caption tokens) and MFU from the
FLOPs :meth:`~mmpretrain.tasks.base.Task.count_flops` measures on one forward and backward step.

Prediction
----------
``mmpretrain predict``: on image-caption data, a caption generated for each image from the beginning-of-text
prompt (greedy unless ``temperature`` > 0), decoded with the data's tokenizer; on text, the mean token loss
of each sequence.

What the data knows
-------------------
``vocab_size`` is linked from the data module by the CLI (or read from its tokenizer when left ``None``);
``bos_id``, ``eos_id`` and ``pad_id`` are read from the data module's tokenizer when the model is built and
recorded in the checkpoint's hyperparameters, so that generation and export rebuild the same model.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import Metric

from mmpretrain.models.metalm import (
    IGNORE_INDEX,
    MetaLM,
    create_metalm,
    list_metalm_models,
    semicausal_targets,
)
from mmpretrain.tasks.base import Task

log = logging.getLogger("mmpretrain")

__all__ = ["SemiCausalLM", "TokenLoss", "metalm_adamw"]


def metalm_adamw(params) -> torch.optim.Optimizer:
    """The default optimizer: AdamW, lr 6e-4, betas (0.9, 0.98), eps 1e-6, weight decay 0.01 (decayed group)."""
    return torch.optim.AdamW(params, lr=6e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)


class TokenLoss(Metric):
    """Mean loss per token over batches and ranks: sums of (loss, tokens), reduced by summing."""

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("loss_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, loss_sum: torch.Tensor, tokens: torch.Tensor) -> None:
        # out of place: states reset under inference mode (a validate() call) are inference tensors
        self.loss_sum = self.loss_sum + loss_sum.detach().to(torch.float64)
        self.tokens = self.tokens + tokens.detach().long()

    def compute(self) -> torch.Tensor:
        return self.loss_sum / self.tokens.clamp(min=1)


class SemiCausalLM(Task):
    """METALM semi-causal language-model pretraining (text with spans, or image-caption pairs).

    Args:
        preset: a named configuration of :mod:`mmpretrain.models.metalm` (``metalm_1p3b``, ``metalm_base``,
            ``metalm_demo``, ``metalm_vl_demo``).
        overrides: :class:`~mmpretrain.models.metalm.MetaLM` arguments replacing the preset's
            (``{"encoder_layers": 6, "mlp": "swiglu"}``); ``image_kwargs`` updates the preset's dictionary.
            The vocabulary size and special ids have their own arguments below.
        vocab_size: token vocabulary; linked from the data module by the CLI. ``None``: the data module's
            tokenizer's, else the preset's.
        bos_id, eos_id, pad_id: the tokenizer's special ids. ``None``: read from the data module's tokenizer
            when the model is built, and recorded in the checkpoint.
        image_init_from: initialise the image encoder from a checkpoint: an mmpretrain CLIP checkpoint (its image
            tower; use ``image_encoder: clip`` with the same dimensions, or the same timm name) or a
            classification checkpoint's backbone. The connector and the decoder start fresh.
        compile: ``torch.compile`` each transformer block (in place; checkpoint keys are unchanged). Not under
            DeepSpeed ZeRO stage 3.
        compile_mode: ``torch.compile`` mode.
        max_new_tokens: longest caption ``predict`` generates.
        temperature, top_k, top_p: sampling in ``predict`` (temperature 0: greedy).
        optimizer, lr_scheduler, lr_reference_batch, max_skipped_steps, grad_checkpointing: see
            :class:`~mmpretrain.tasks.base.Task` (recomputation covers the decoder, the span encoder and the image
            encoder);
            the default optimizer is :func:`metalm_adamw`. No weight decay on norms, biases and embeddings (the tied output
            projection is the token embedding).
    """

    model: MetaLM | None

    def __init__(
        self,
        preset: str = "metalm_demo",
        overrides: dict[str, Any] | None = None,
        vocab_size: int | None = None,
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
        image_init_from: str | None = None,
        grad_checkpointing: bool = False,
        compile: bool = False,
        compile_mode: str = "default",
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        optimizer: OptimizerCallable = metalm_adamw,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_reference_batch: int | None = None,
        max_skipped_steps: int | None = 10,
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, lr_reference_batch=lr_reference_batch,
                         max_skipped_steps=max_skipped_steps, grad_checkpointing=grad_checkpointing)
        if preset not in list_metalm_models():
            raise ValueError(f"model.preset: {preset!r} is not a METALM configuration; choose one of "
                             f"{list_metalm_models()}")
        overrides = dict(overrides or {})
        for key in ("vocab_size", "bos_id", "eos_id", "pad_id"):
            if key in overrides:
                raise ValueError(f"model.overrides.{key}: set model.{key} instead (or leave it to the data)")
        if vocab_size is not None and vocab_size < 1:
            raise ValueError(f"model.vocab_size must be positive, got {vocab_size}")
        if max_new_tokens < 1:
            raise ValueError(f"model.max_new_tokens must be positive, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"model.temperature must be >= 0, got {temperature}")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.preset = preset
        self.overrides = overrides
        self.vocab_size = vocab_size
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.image_init_from = image_init_from
        self.compile_model = compile
        self.compile_mode = compile_mode
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.val_loss = TokenLoss()
        self.test_loss = TokenLoss()

    # -- model ------------------------------------------------------------------------------------------------
    def build_model(self) -> MetaLM:
        overrides = dict(self.overrides)
        for key in ("vocab_size", "bos_id", "eos_id", "pad_id"):
            if getattr(self, key) is not None:
                overrides[key] = getattr(self, key)
        try:
            return create_metalm(self.preset, **overrides)
        except TypeError as err:
            raise ValueError(f"model.overrides for {self.preset}: {err}") from None

    def load_initial_weights(self) -> None:
        if self.image_init_from is not None:
            if self.model.image_encoder is None:
                raise ValueError(f"model.image_init_from is set but {self.preset} has no image encoder "
                                 "(set model.overrides.image_encoder)")
            from mmpretrain.tasks.classification import load_backbone_weights

            load_backbone_weights(self.model.image_encoder, self.image_init_from)
            log.info("image encoder initialised from %s", self.image_init_from)

    def finish_model(self) -> None:
        if self.compile_model:
            for blocks in (self.model.blocks, getattr(self.model.encoder, "blocks", None)):
                for block in blocks or []:
                    block.compile(mode=self.compile_mode)

    def external_parameters(self) -> list[tuple[torch.nn.Module, torch.nn.Parameter]]:
        # the output projection is the token embedding, used by MetaLM.forward outside the embedding's forward
        return [(self.model, self.model.embed.weight)] if self.model is not None else []

    def prepare_build(self) -> None:
        """Vocabulary size and special ids from the data's tokenizer; checks that data and model fit."""
        data = self._datamodule()
        tokenizer = getattr(data, "tokenizer", None)
        if tokenizer is not None:
            if self.vocab_size is None:
                self.vocab_size = int(tokenizer.vocab_size)
                self.hparams["vocab_size"] = self.vocab_size
            elif self.vocab_size < tokenizer.vocab_size:
                raise ValueError(
                    f"model.vocab_size {self.vocab_size} is smaller than the data's tokenizer vocabulary "
                    f"({tokenizer.vocab_size}): leave it to the data (the CLI links data.vocab_size)"
                )
            for key in ("bos_id", "eos_id", "pad_id"):
                theirs = int(getattr(tokenizer, key))
                if getattr(self, key) is None:
                    setattr(self, key, theirs)
                    self.hparams[key] = theirs  # into the checkpoint: generation and export need them
                elif getattr(self, key) != theirs:
                    raise ValueError(f"model.{key} is {getattr(self, key)} but the data's tokenizer ({tokenizer}) "
                                     f"has {theirs}: leave model.{key} null to take the tokenizer's")
        if data is None:
            return
        with torch.device("meta"):
            shape = self.build_model()
        spans = getattr(data, "span_sampler", None)
        if spans is not None and shape.encoder is None:
            raise ValueError(f"data.spans is set but {self.preset} has no span encoder: set "
                             "model.init_args.overrides.encoder_layers > 0, or drop data.spans")
        if spans is None and shape.encoder is not None and getattr(data, "seq_len", None) is not None:
            log.warning("the data draws no spans (data.spans is null): the span encoder of %s stays unused and "
                        "this trains a plain causal language model", self.preset)
        image_size = getattr(data, "image_size", None)
        if image_size is not None and shape.image_encoder is None:
            raise ValueError(f"the data gives images but {self.preset} has no image encoder: set "
                             "model.init_args.overrides.image_encoder")
        if image_size is not None and shape.image_size is not None and tuple(shape.image_size) != (image_size, image_size):
            raise ValueError(f"data.image_size ({image_size}) differs from the image encoder's input size "
                             f"{tuple(shape.image_size)} of {self.preset}: set data.init_args.image_size or "
                             f"model.init_args.overrides.image_kwargs.img_size")
        length = getattr(data, "seq_len", None) or getattr(data, "context_length", None)
        if length is not None and shape.positions == "learned":
            needed = length + (shape.num_image_tokens if image_size is not None else 0)
            if needed > shape.max_seq_len:
                raise ValueError(f"sequences of {needed} positions exceed max_seq_len {shape.max_seq_len} of the "
                                 f"learned positions of {self.preset}: raise model.init_args.overrides.max_seq_len")

    # -- steps ------------------------------------------------------------------------------------------------
    def compute_loss(self, model: MetaLM, batch: dict[str, Any]) -> dict[str, Any]:
        """Mean next-token loss over the batch's target tokens; also its sum and the target count."""
        input_ids = batch["input_ids"]
        spans = batch.get("spans")
        logits = model(input_ids, spans=spans, span_ids=batch.get("span_ids"), image=batch.get("image"))
        targets = semicausal_targets(input_ids, spans, batch.get("doc_ids"))
        loss_sum = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                                   reduction="sum")
        tokens = (targets != IGNORE_INDEX).sum()
        return {"loss": loss_sum / tokens.clamp(min=1), "loss_sum": loss_sum.detach(), "tokens": tokens}

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.model(input_ids, **kwargs)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = self.compute_loss(self.model, batch)
        n = batch["input_ids"].shape[0]
        self.log("train/loss", out["loss"].detach(), prog_bar=True, batch_size=n)
        spans = batch.get("spans")
        if spans is not None:
            self.log("train/span_fraction", spans[:, 2].sum() / batch["input_ids"].numel(), batch_size=n)
        return out["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.val_loss)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.test_loss)

    def _evaluate(self, batch: dict[str, Any], metric: TokenLoss) -> None:
        out = self.compute_loss(self.model, batch)
        metric.update(out["loss_sum"], out["tokens"])

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val", self.val_loss)

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test", self.test_loss)

    def _log_evaluation(self, stage: str, metric: TokenLoss) -> None:
        loss = metric.compute().float()  # summed over every rank's batches (torchmetrics synchronises)
        metric.reset()
        self.log(f"{stage}/loss", loss, prog_bar=True)
        self.log(f"{stage}/ppl", torch.exp(loss.clamp(max=80.0)))

    # -- prediction -------------------------------------------------------------------------------------------
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        if "image" in batch:
            return self.caption(batch["image"], keys=batch.get("key"))
        input_ids, spans = batch["input_ids"], batch.get("spans")
        logits = self.model(input_ids, spans=spans, span_ids=batch.get("span_ids"))
        targets = semicausal_targets(input_ids, spans, batch.get("doc_ids"))
        per_token = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
        counts = (targets != IGNORE_INDEX).sum(dim=1)
        loss = per_token.sum(dim=1) / counts.clamp(min=1)
        return {"key": batch.get("key"), "loss": loss, "tokens": counts}

    @torch.no_grad()
    def caption(self, image: torch.Tensor, keys: list[str] | None = None) -> dict[str, Any]:
        """Captions of ``image`` ``(B, 3, H, W)``: generated from the beginning-of-text prompt, then decoded."""
        model = self.model
        bos = model.bos_id if model.bos_id is not None else 0
        prompt = torch.full((image.shape[0], 1), bos, dtype=torch.long, device=image.device)
        ids = model.generate(prompt, self.max_new_tokens, image=image, temperature=self.temperature, top_k=self.top_k,
                             top_p=self.top_p)[:, 1:]
        out: dict[str, Any] = {"key": keys, "token_ids": ids}
        tokenizer = getattr(self._datamodule(), "tokenizer", None)
        if tokenizer is not None:
            rows = []
            for row in ids.tolist():
                if model.eos_id is not None and model.eos_id in row:
                    row = row[: row.index(model.eos_id)]
                rows.append(tokenizer.decode(row))
            out["caption"] = rows
        return out
