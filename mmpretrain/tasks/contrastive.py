"""Contrastive image-text pretraining (CLIP, SigLIP) over the global batch, with exact gradient accumulation.

Training
--------
Each rank encodes its ``B`` pairs; the loss (:class:`~mmpretrain.models.losses.ClipLoss` or
:class:`~mmpretrain.models.losses.SigLipLoss`) gathers the features of every rank with gradient and scores
the rank's own rows against all ``W B`` columns, so that training under DDP is training on the loss of the
global batch (see :mod:`mmpretrain.models.losses`). Ranks may hold different numbers of pairs in a step
(``data.decode_device: cuda`` drops a sample the GPU decoder rejects after batching): the loss still is the
global batch's, in both modes below.

A global batch larger than memory: ``accumulate_micro_batches: M`` splits each rank's batch into ``M``
micro-batches (manual optimization; their sizes differ by one pair where ``M`` does not divide the batch).
All features are first computed without gradient and gathered; then each micro-batch is encoded again with
gradient, put in place of its cached rows (its own rows and, through a gather with gradient, its columns on
every rank), and the full-batch loss is backpropagated.
The gradients summed over the micro-batches are exactly those of one step on the whole batch (the logit
scale and bias, which the loss uses directly, take their gradient from the last micro-batch only), at the
price of one extra forward pass without gradient. Stochastic layers (drop path, dropout) draw new noise
in the second pass, so with them the equality is only in expectation; the presets have none.
Lightning's ``trainer.accumulate_grad_batches`` sums per-batch losses, each over its own small batch: it
is *not* the contrastive loss of the big batch and is refused.

After each optimizer step the log logit scale is clamped to ``[0, max_logit_scale]`` (ln 100).

Validation and test
-------------------
``val/loss`` (the loss of each validation batch on its own, averaged), zero-shot classification
(``val/zeroshot_acc1``, ``val/zeroshot_acc5``: class names and prompt templates from the data module's
``zero_shot_prompts()``, the text features of each class averaged over its templates and renormalised,
scored against the batches' ``label``, ``-1`` = no label) and image-text retrieval recall
(``val/i2t_r1/5/10``, ``val/t2i_r1/5/10``) over the whole validation set: the features of every rank are
gathered at the end of the epoch, and every rank computes the same figures.

What the data knows
-------------------
``vocab_size`` is linked from the data module by the CLI (or read from the data module's tokenizer when left
``None``). ``eot_id``, the token the text tower pools at, is left ``None`` in recipes: the task reads the
data module's ``tokenizer.eos_id`` when the model is built (``configure_model``) and records it in the
checkpoint's hyperparameters, so that export and evaluation rebuild the same model without the data.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import ParallelStrategy
from torch import nn

from mmpretrain.models.clip import CLIP, create_clip, list_clip_models
from mmpretrain.models.losses import (
    ClipLoss,
    SigLipLoss,
    clip_loss_from_features,
    gather_row_counts,
    gather_with_grad,
    row_divisor,
    siglip_loss_from_features,
)
from mmpretrain.tasks.base import Task, deepspeed_strategy, deepspeed_strategy_name

log = logging.getLogger("mmpretrain")

__all__ = ["ContrastivePretraining", "clip_adamw", "gather_rows", "micro_batch_sizes", "retrieval_recall",
           "zero_shot_accuracy"]

RECALL_AT = (1, 5, 10)


def clip_adamw(params) -> torch.optim.Optimizer:
    """open_clip's optimizer: AdamW, lr 5e-4, betas (0.9, 0.98), eps 1e-6, weight decay 0.2 (decayed group)."""
    return torch.optim.AdamW(params, lr=5e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)


class ContrastivePretraining(Task):
    """CLIP / SigLIP pretraining on image-text pairs.

    Args:
        preset: a named CLIP configuration (``clip_vit_b32``, ``clip_vit_b16``, ``clip_demo``; see
            :mod:`mmpretrain.models.clip`).
        overrides: :class:`~mmpretrain.models.clip.CLIP` arguments replacing the preset's; ``vision_kwargs``
            and ``text_kwargs`` update the preset's dictionaries (``{"vision_kwargs": {"drop_path_rate": 0.1}}``).
            ``siglip``, the vocabulary size and the end-of-text id have their own arguments below.
        vocab_size: text vocabulary size; linked from the data module by the CLI. ``None``: the data module's
            tokenizer's when there is one, else the preset's.
        eot_id: end-of-text token id the text tower pools at. ``None``: the data module's ``tokenizer.eos_id``,
            read when the model is built and recorded in the checkpoint; without a data module the tower pools
            at the largest token id (right only for tokenizers whose end-of-text id is the largest, like
            the CLIP BPE).
        siglip: SigLIP's sigmoid loss and parametrisation (learnable logit bias) instead of CLIP's InfoNCE.
        class_names: zero-shot class names in label order; linked from the data module by the CLI, which also
            builds the prompts (``zero_shot_prompts()``: its templates, its tokenizer). Names the classes
            ``predict`` assigns.
        accumulate_micro_batches: split each batch into this many micro-batches with exact gradient
            accumulation (see the module docstring); best a divisor of the batch size (otherwise the
            micro-batches differ by one pair). The global batch is ``world size x data.batch_size``, whatever
            this number.
        max_logit_scale: upper bound of the log logit scale, applied after every optimizer step.
        compile: ``torch.compile`` the model in place (checkpoint keys are unchanged). Not under DeepSpeed ZeRO
            stage 3.
        optimizer, lr_scheduler, max_skipped_steps, grad_checkpointing: see :class:`~mmpretrain.tasks.base.Task`
            (recomputation covers both towers); the default optimizer is :func:`clip_adamw`.

    Under DeepSpeed, ``accumulate_micro_batches`` > 1 is refused (its manual optimization and per-micro-batch
    backward without gradient synchronisation are DDP's); raise the per-GPU batch instead, which ZeRO's memory
    savings allow.
    """

    model: CLIP | None

    def __init__(
        self,
        preset: str = "clip_vit_b16",
        overrides: dict[str, Any] | None = None,
        vocab_size: int | None = None,
        eot_id: int | None = None,
        siglip: bool = False,
        class_names: list[str] | None = None,
        grad_checkpointing: bool = False,
        accumulate_micro_batches: int = 1,
        max_logit_scale: float = math.log(100),
        compile: bool = False,
        optimizer: OptimizerCallable = clip_adamw,
        lr_scheduler: LRSchedulerCallable | None = None,
        max_skipped_steps: int | None = 10,
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, max_skipped_steps=max_skipped_steps,
                         grad_checkpointing=grad_checkpointing)
        if preset not in list_clip_models():
            raise ValueError(f"model.preset: {preset!r} is not a CLIP configuration; choose one of {list_clip_models()}")
        overrides = dict(overrides or {})
        if "siglip" in overrides:
            raise ValueError("model.overrides.siglip: use model.siglip (the task picks the loss with it)")
        text_overrides = overrides.get("text_kwargs") or {}
        for key in ("vocab_size", "eot_id"):
            if key in text_overrides:
                raise ValueError(f"model.overrides.text_kwargs.{key}: set model.{key} instead (or leave it to the data)")
        if vocab_size is not None and vocab_size < 1:
            raise ValueError(f"model.vocab_size must be positive, got {vocab_size}")
        if accumulate_micro_batches < 1:
            raise ValueError(f"model.accumulate_micro_batches must be >= 1, got {accumulate_micro_batches}")
        if max_logit_scale <= 0:
            raise ValueError(f"model.max_logit_scale must be positive, got {max_logit_scale}")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.preset = preset
        self.overrides = overrides
        self.vocab_size = vocab_size
        self.eot_id = eot_id
        self.siglip = siglip
        self.class_names = list(class_names) if class_names is not None else None
        self.accumulate_micro_batches = accumulate_micro_batches
        self.max_logit_scale = max_logit_scale
        self.compile_model = compile
        self.loss_fn: nn.Module = SigLipLoss() if siglip else ClipLoss()
        # exact accumulation steps the optimizer itself; one micro-batch is Lightning's usual step
        self.automatic_optimization = accumulate_micro_batches == 1
        self._clip_gradients: tuple[float, str] | None = None
        # validation state: features and labels of this rank, gathered across ranks at the epoch's end
        self.eval_image_features: list[torch.Tensor] = []
        self.eval_text_features: list[torch.Tensor] = []
        self.eval_labels: list[torch.Tensor] = []
        self._zero_shot_weights: torch.Tensor | None = None

    # -- model ------------------------------------------------------------------------------------------------
    def build_model(self) -> CLIP:
        overrides = dict(self.overrides)
        text = dict(overrides.get("text_kwargs") or {})
        if self.vocab_size is not None:
            text["vocab_size"] = self.vocab_size
        if self.eot_id is not None:
            text["eot_id"] = self.eot_id
        overrides["text_kwargs"] = text
        try:
            return create_clip(self.preset, siglip=self.siglip, **overrides)
        except TypeError as err:
            raise ValueError(f"model.overrides for {self.preset}: {err}") from None

    def finish_model(self) -> None:
        if self.compile_model:
            self.model.compile()

    def prepare_build(self) -> None:
        """Read the vocabulary size and end-of-text id from the data module's tokenizer; check sizes."""
        data = self._datamodule()
        tokenizer = getattr(data, "tokenizer", None)
        if tokenizer is not None:
            if self.eot_id is None:
                self.eot_id = int(tokenizer.eos_id)
                self.hparams["eot_id"] = self.eot_id  # into the checkpoint: export rebuilds the same pooling
            elif self.eot_id != tokenizer.eos_id:
                raise ValueError(
                    f"model.eot_id is {self.eot_id} but the data's tokenizer ({tokenizer}) ends texts with id "
                    f"{tokenizer.eos_id}: leave model.eot_id null to take the tokenizer's"
                )
            if self.vocab_size is None:
                self.vocab_size = int(tokenizer.vocab_size)
                self.hparams["vocab_size"] = self.vocab_size
            elif self.vocab_size < tokenizer.vocab_size:
                raise ValueError(
                    f"model.vocab_size {self.vocab_size} is smaller than the data's tokenizer vocabulary "
                    f"({tokenizer.vocab_size}): leave it to the data (the CLI links data.vocab_size)"
                )
        elif self.eot_id is None and self._trainer is not None:
            log.warning("model.eot_id is not set and the data module has no tokenizer: the text tower pools at "
                        "the largest token id of each text; set model.eot_id to the tokenizer's end-of-text id")
        if data is None:
            return
        with torch.device("meta"):
            shape = self.build_model()
        context = getattr(data, "context_length", None)
        if context is not None and context > shape.context_length:
            raise ValueError(
                f"data.context_length ({context}) exceeds the text tower's context length ({shape.context_length}) "
                f"of {self.preset}: set data.init_args.context_length <= {shape.context_length} or "
                f"model.init_args.overrides.text_kwargs.context_length"
            )
        image_size = getattr(data, "image_size", None)
        if image_size is not None and shape.image_size is not None and tuple(shape.image_size) != (image_size, image_size):
            raise ValueError(
                f"data.image_size ({image_size}) differs from the image tower's input size {tuple(shape.image_size)} "
                f"of {self.preset}: set data.init_args.image_size or model.init_args.overrides.vision_kwargs.img_size"
            )

    # -- checks on the trainer ----------------------------------------------------------------------------
    def configure_callbacks(self) -> list:
        # the first hook that sees the trainer, before Lightning validates its configuration (which would
        # refuse manual optimization with gradient clipping or accumulation in its own words)
        self._check_trainer()
        return []

    def setup(self, stage: str) -> None:
        self._check_trainer()
        super().setup(stage)

    def _check_trainer(self) -> None:
        trainer = self._trainer
        if trainer is None:
            return
        strategy = deepspeed_strategy(trainer)
        if strategy is not None and self.accumulate_micro_batches > 1:
            raise ValueError(
                f"model.init_args.accumulate_micro_batches={self.accumulate_micro_batches} is not supported under "
                f"trainer.strategy {deepspeed_strategy_name(strategy)} (exact accumulation steps the optimizer itself "
                f"and skips DDP's gradient synchronisation, which ZeRO does not allow): set it to 1 and raise "
                f"data.batch_size, or use trainer.strategy ddp"
            )
        if trainer.accumulate_grad_batches > 1:
            raise ValueError(
                f"trainer.accumulate_grad_batches={trainer.accumulate_grad_batches} is not exact for a contrastive "
                f"loss (each batch would only see its own negatives): remove it and set "
                f"model.init_args.accumulate_micro_batches instead; the global batch is then world size x "
                f"data.batch_size, split into that many micro-batches per rank"
            )
        if not self.automatic_optimization and trainer.gradient_clip_val:
            # Lightning does not clip under manual optimization: the task clips before its optimizer step
            self._clip_gradients = (float(trainer.gradient_clip_val), trainer.gradient_clip_algorithm or "norm")
            trainer.gradient_clip_val = None

    # -- training -------------------------------------------------------------------------------------------
    def compute_loss(self, model: CLIP, batch: dict[str, Any]) -> dict[str, Any]:
        """Features of both towers and this rank's share of the global-batch loss."""
        image, text, scale, bias = model(batch["image"], batch["input_ids"])
        if image.device.type == "meta":  # FLOP counting: meta tensors cannot be gathered; count the local loss
            loss = (siglip_loss_from_features(image, text, scale, bias) if self.siglip
                    else clip_loss_from_features(image, text, scale))
        else:
            loss = self.loss_fn(image, text, scale, bias)
        return {"loss": loss, "image_features": image, "text_features": text, "logit_scale": scale, "logit_bias": bias}

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        return self.model(images, tokens)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        if self.automatic_optimization:
            out = self.compute_loss(self.model, batch)
            self._log_train(out["loss"], batch["image"].shape[0], out["logit_scale"], out["logit_bias"])
            return out["loss"]
        optimizer = self.optimizers()
        optimizer.zero_grad()
        loss = self.accumulate_gradients(batch)
        if self._clip_gradients is not None:
            value, algorithm = self._clip_gradients
            self.clip_gradients(optimizer, gradient_clip_val=value, gradient_clip_algorithm=algorithm)
        optimizer.step()
        self.clamp_logit_scale()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        self._log_train(loss, batch["image"].shape[0])
        return None

    def _log_train(self, loss: torch.Tensor, batch_size: int, scale: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None) -> None:
        # the scale and bias as the forward pass saw them (under ZeRO stage 3 the parameters outside it are shards)
        scale = self.model.logit_scale.exp() if scale is None else scale
        bias = self.model.logit_bias if bias is None else bias
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=batch_size)
        self.log("train/logit_scale", scale.detach().float().reshape(()), batch_size=batch_size)
        if bias is not None:
            self.log("train/logit_bias", bias.detach().float().reshape(()), batch_size=batch_size)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.clamp_logit_scale()

    def clamp_logit_scale(self) -> None:
        """Clamp the log logit scale to ``[0, max_logit_scale]``. Under DeepSpeed the optimizer's fp32 master copy
        is what the next step starts from (the module holds a bf16 copy, under ZeRO stage 3 an empty shard): the
        clamp goes to the master copy (``deepspeed.utils.safe_set_full_fp32_param``; collective, every rank
        calls it)."""
        if deepspeed_strategy(self._trainer) is None:
            self.model.clamp_logit_scale(self.max_logit_scale)
            return
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        param = self.model.logit_scale
        master = safe_get_full_fp32_param(param)
        if master is None:  # not an optimized parameter of the engine: the module's is the weight
            self.model.clamp_logit_scale(self.max_logit_scale)
            return
        clamped = master.clamp(0, self.max_logit_scale)
        if not torch.equal(clamped, master):
            safe_set_full_fp32_param(param, clamped)

    def _micro_batches(self, batch: dict[str, Any]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """This rank's images and token rows in ``accumulate_micro_batches`` parts
        (:func:`micro_batch_sizes`)."""
        images, tokens = batch["image"], batch["input_ids"]
        if tokens.shape[0] != images.shape[0]:
            raise ValueError(f"batch: {images.shape[0]} images but {tokens.shape[0]} input_ids rows")
        count = self.accumulate_micro_batches
        return list(images.tensor_split(count)), list(tokens.tensor_split(count))

    def accumulate_gradients(self, batch: dict[str, Any]) -> torch.Tensor:
        """Backpropagate the global-batch loss micro-batch by micro-batch; returns the loss (detached).

        The parameters' gradients afterwards equal those of ``compute_loss(model, batch)["loss"].backward()``
        (with ``M`` micro-batches: ``M`` forward passes without gradient, ``M`` with). Under a trainer,
        backward goes through Lightning (precision, DDP), and DDP synchronises only the last micro-batch's.
        Ranks may hold different numbers of pairs: their counts are gathered once (one small collective) and
        give every rank's micro-batch sizes, so each later gather is a single collective.
        """
        model = self.model
        images, tokens = self._micro_batches(batch)
        count = len(images)
        rank, _ = _rank_and_world()
        local = batch["image"].shape[0]
        sizes = gather_row_counts(local, device=batch["image"].device)
        # rows of micro-batch m on each rank: what each rank's own tensor_split gives
        micro = [micro_batch_sizes(n, count) for n in sizes]
        offset, divide_by = sum(sizes[:rank]), row_divisor(sizes)
        with torch.no_grad():
            cached_image = torch.cat([model.encode_image(x) for x in images])
            cached_text = torch.cat([model.encode_text(t) for t in tokens])
            all_image = gather_with_grad(cached_image, sizes=sizes) if not self.siglip else None
            all_text = gather_with_grad(cached_text, sizes=sizes)
        for m in range(count):
            last = m == count - 1
            live = [rows[m] for rows in micro]  # every rank's rows in micro-batch m
            with self._backward_sync(enabled=last):
                image = model.encode_image(images[m])
                text = model.encode_text(tokens[m])
                # the logit scale and bias enter the loss directly: their gradient is taken once
                scale = model.logit_scale.exp() if last else model.logit_scale.detach().exp()
                rows_image = _splice(cached_image, image, m, [micro[rank]])
                rows_text = _splice(cached_text, text, m, [micro[rank]])
                cols_text = _splice(all_text, gather_with_grad(text, sizes=live), m, micro)
                if self.siglip:
                    bias = model.logit_bias if last else model.logit_bias.detach()
                    loss = siglip_loss_from_features(rows_image, rows_text, scale, bias, cols_text,
                                                     offset=offset, divide_by=divide_by)
                else:
                    cols_image = _splice(all_image, gather_with_grad(image, sizes=live), m, micro)
                    loss = clip_loss_from_features(rows_image, rows_text, scale, cols_image, cols_text,
                                                   offset=offset, divide_by=divide_by)
                self._backward(loss)
        return loss.detach()  # every micro-batch's loss has the value of the whole batch's

    def _backward_sync(self, enabled: bool):
        """No DDP gradient all-reduce for all but the last micro-batch (the gradients add up locally)."""
        trainer = self._trainer
        if enabled or trainer is None or not isinstance(trainer.strategy, ParallelStrategy):
            return nullcontext()
        return trainer.strategy.block_backward_sync()

    def _backward(self, loss: torch.Tensor) -> None:
        if self._trainer is not None:
            self.manual_backward(loss)
        else:
            loss.backward()

    # -- validation and test ----------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._start_evaluation()

    def on_test_epoch_start(self) -> None:
        self._start_evaluation()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._finish_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._finish_evaluation("test")

    def _start_evaluation(self) -> None:
        self._reset_evaluation()
        data = self._datamodule()
        prompts = data.zero_shot_prompts() if hasattr(data, "zero_shot_prompts") else None
        self._zero_shot_weights = None if prompts is None else self.zero_shot_weights(prompts)

    @torch.no_grad()
    def zero_shot_weights(self, prompts: torch.Tensor, chunk: int = 256) -> torch.Tensor:
        """Token ids ``(classes, templates, length)`` -> unit class embeddings ``(classes, dim)``: each
        class's text features averaged over its templates, renormalised."""
        classes, templates, length = prompts.shape
        flat = prompts.reshape(classes * templates, length).to(self.device)
        features = torch.cat([self.model.encode_text(flat[i:i + chunk]).float() for i in range(0, len(flat), chunk)])
        return F.normalize(features.view(classes, templates, -1).mean(1), dim=-1)

    def _evaluate(self, batch: dict[str, Any], stage: str) -> None:
        image, text, scale, bias = self.model(batch["image"], batch["input_ids"])
        # the loss of this batch alone (ranks' last batches may differ in size: nothing is gathered here)
        if self.siglip:
            loss = siglip_loss_from_features(image, text, scale, bias)
        else:
            loss = clip_loss_from_features(image, text, scale)
        n = image.shape[0]
        self.log(f"{stage}/loss", loss, batch_size=n, sync_dist=True)
        self.eval_image_features.append(image.detach().float())
        self.eval_text_features.append(text.detach().float())
        if "label" in batch:
            self.eval_labels.append(batch["label"])

    def _reset_evaluation(self) -> None:
        self.eval_image_features, self.eval_text_features, self.eval_labels = [], [], []

    def _finish_evaluation(self, stage: str) -> None:
        metrics = self.evaluation_metrics()
        if metrics:
            # identical on every rank; synchronising keeps Lightning's epoch-level bookkeeping uniform
            self.log_dict({f"{stage}/{k}": v for k, v in metrics.items()}, sync_dist=True)
        self._reset_evaluation()

    def evaluation_metrics(self) -> dict[str, torch.Tensor]:
        """Retrieval recall and zero-shot accuracy over the features collected on every rank.

        The rows of all ranks are gathered (any number per rank, none included) in rank order, so images,
        texts and labels stay paired, and every rank computes the same figures. Collective: every rank
        must call it. Empty when no rank collected anything.
        """
        dim = self.model.embed_dim
        device = self.device

        def rows(parts: list[torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            local = torch.cat(parts) if parts else torch.zeros(shape, dtype=dtype, device=device)
            return gather_rows(local.to(device))

        image = rows(self.eval_image_features, (0, dim), torch.float32)
        text = rows(self.eval_text_features, (0, dim), torch.float32)
        labels = rows(self.eval_labels, (0,), torch.long)
        if image.shape[0] == 0:
            return {}
        metrics = retrieval_recall(image, text)
        if self._zero_shot_weights is not None and labels.shape[0] == image.shape[0]:
            metrics.update(zero_shot_accuracy(image, self._zero_shot_weights.to(image.device), labels))
        return metrics

    def on_predict_epoch_start(self) -> None:
        self._start_evaluation()

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Unit image and text embeddings of each pair and, where the data module gives zero-shot prompts,
        each image's zero-shot class (``zero_shot_label``, ``class_name``, ``prob``: softmax over classes)."""
        image, text, scale, _ = self.model(batch["image"], batch["input_ids"])
        out: dict[str, Any] = {"key": batch.get("key"), "image_embeds": image.float().cpu(),
                               "text_embeds": text.float().cpu()}
        if self._zero_shot_weights is not None:
            probs = (scale * image.float() @ self._zero_shot_weights.to(image.device).T).softmax(-1)
            prob, label = probs.max(-1)
            names = self.class_names or [str(i) for i in range(probs.shape[-1])]
            out.update(zero_shot_label=label.cpu(), class_name=[names[i] for i in label.tolist()], prob=prob.cpu())
        return out


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """The rows of ``x`` on every rank, concatenated in rank order; ranks may hold different numbers of rows
    (none included). ``x`` itself without a process group. Collective: every rank must call it."""
    rank, world = _rank_and_world()
    if world == 1:
        return x
    count = torch.tensor([x.shape[0]], device=x.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def micro_batch_sizes(rows: int, count: int) -> list[int]:
    """Sizes of the ``count`` micro-batches of ``rows`` pairs, as ``Tensor.tensor_split(count)`` cuts them:
    the first ``rows % count`` one pair larger (some empty when ``rows < count``)."""
    base, extra = divmod(rows, count)
    return [base + (i < extra) for i in range(count)]


def _splice(cached: torch.Tensor, live: torch.Tensor, m: int, micro: list[list[int]]) -> torch.Tensor:
    """``cached`` rows (rank-major, then micro-batch; ``micro[r][j]`` rows in micro-batch ``j`` of rank ``r``)
    with micro-batch ``m`` of every rank replaced by ``live`` (those micro-batches' rows, in rank order)."""
    parts, start, live_start = [], 0, 0
    for rows in micro:
        before, size = sum(rows[:m]), rows[m]
        parts += [cached[start:start + before], live[live_start:live_start + size],
                  cached[start + before + size:start + sum(rows)]]
        start, live_start = start + sum(rows), live_start + size
    return torch.cat(parts)


def _chunks(n: int, size: int) -> Iterator[slice]:
    for lo in range(0, n, size):
        yield slice(lo, min(n, lo + size))


@torch.no_grad()
def retrieval_recall(image: torch.Tensor, text: torch.Tensor, ks: tuple[int, ...] = RECALL_AT,
                     chunk: int = 1024) -> dict[str, torch.Tensor]:
    """Recall@k of image->text and text->image retrieval; pair ``i`` is ``(image[i], text[i])``.

    A query's rank is the number of candidates scoring strictly higher than its match; recall@k is the
    fraction of queries ranked below ``k``. Scores are computed ``chunk`` queries at a time (no N x N
    matrix). Returns ``{"i2t_r1": ..., "t2i_r1": ..., ...}``.
    """
    if image.shape != text.shape:
        raise ValueError(f"retrieval: {tuple(image.shape)} image and {tuple(text.shape)} text features do not pair up")
    out: dict[str, torch.Tensor] = {}
    for name, queries, candidates in (("i2t", image, text), ("t2i", text, image)):
        ranks = []
        for rows in _chunks(queries.shape[0], chunk):
            scores = queries[rows] @ candidates.T
            idx = torch.arange(rows.start, rows.stop, device=scores.device)
            positive = scores[torch.arange(len(idx), device=scores.device), idx]
            ranks.append((scores > positive[:, None]).sum(1))
        rank = torch.cat(ranks)
        for k in ks:
            out[f"{name}_r{k}"] = (rank < k).float().mean()
    return out


@torch.no_grad()
def zero_shot_accuracy(image: torch.Tensor, class_weights: torch.Tensor, labels: torch.Tensor,
                       top_k: tuple[int, ...] = (1, 5)) -> dict[str, torch.Tensor]:
    """Top-k accuracy of classifying unit image features by their nearest class embedding.

    Samples labelled ``-1`` (no label) are left out; ``k`` is capped at the number of classes.
    Returns ``{"zeroshot_acc1": ..., "zeroshot_acc5": ...}`` (nan without labelled samples).
    """
    keep = labels >= 0
    image, labels = image[keep], labels[keep]
    logits = image @ class_weights.to(image.dtype).T
    out = {}
    for k in top_k:
        if image.shape[0] == 0:
            out[f"zeroshot_acc{k}"] = torch.tensor(float("nan"), device=image.device)
            continue
        top = logits.topk(min(k, class_weights.shape[0]), dim=-1).indices
        out[f"zeroshot_acc{k}"] = (top == labels[:, None]).any(-1).float().mean()
    return out
