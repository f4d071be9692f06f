"""Image classification with any timm model: DeiT-style training (Mixup/CutMix, EMA, layer-wise lr decay)."""

from __future__ import annotations

from typing import Any

import timm
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from timm.data import Mixup
from timm.optim import param_groups_layer_decay
from timm.utils import ModelEmaV3
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

import mmpretrain.models  # noqa: F401  (registers our timm models: vim_tiny, vim_lru_tiny ...)
from mmpretrain.optim import param_groups
from mmpretrain.tasks.base import Task, adamw, deepspeed_strategy, deepspeed_strategy_name


class ImageClassification(Task):
    """Supervised image classification: a timm model by name, cross-entropy, top-1/top-5 accuracy.

    Args:
        backbone: a timm model name (``vit_tiny_patch16_224``, ``deit_small_patch16_224`` ...); never
            loads pretrained weights.
        backbone_kwargs: keyword arguments for ``timm.create_model`` (``img_size``, ``patch_size``,
            ``depth``, ``embed_dim``, ``drop_path_rate`` ...).
        num_classes: number of classes (linked from the data module by the CLI).
        class_names: class names in label order (linked from the data module).
        label_smoothing: label smoothing (of the hard targets, or of the mixed targets with Mixup/CutMix).
        mixup: Mixup alpha (0 disables).
        cutmix: CutMix alpha (0 disables). With either on, the loss is a soft-target cross-entropy.
        mixup_prob: probability of mixing a batch at all.
        mixup_switch_prob: probability of CutMix instead of Mixup when both are on.
        ema_decay: keep an exponential moving average of the weights with this decay (e.g. 0.99996);
            it is validated alongside the raw model (``val/ema_acc1``).
        layer_decay: layer-wise learning-rate decay for fine-tuning (e.g. 0.65): block ``i`` of ``L`` gets
            ``lr * layer_decay ** (L - i)``; None for a flat learning rate.
        init_from: start from the weights of a checkpoint: an mmpretrain CLIP checkpoint (its image
            tower; the backbone must be the same timm architecture, e.g. ``vit_base_patch16_clip_224`` for
            ``clip_vit_b16``) or a classification checkpoint. The head stays new unless ``init_head``; a
            position embedding of another grid size is resampled (prefix tokens kept as they are: Vim stores
            its middle class token's entry first, so a stride-16 Vim resamples to stride 8 correctly).
        init_head: with ``init_from``, also load the checkpoint's classifier head (a fine-tune on the same
            classes, e.g. Vim's stride-8 fine-tune). The head's shapes must match (``num_classes``); if they
            do not, or the checkpoint has no head (a CLIP checkpoint), loading fails and says so. False (the
            default) starts a new head.
        compile: ``torch.compile`` the model (in place; checkpoint keys are unchanged). Not under DeepSpeed
            ZeRO stage 3.
        compile_mode: ``torch.compile`` mode (``default``, ``max-autotune-no-cudagraphs``, ``reduce-overhead``
            ...). ``reduce-overhead`` (CUDA graphs) is the one for Vim, whose eager step waits on the host: Vim-Ti
            trained 1.55x faster with it on one H100 (docs/benchmarks.md), and 0.9x with ``default``.
        optimizer, lr_scheduler, lr_reference_batch, max_skipped_steps, grad_checkpointing: see
            :class:`~mmpretrain.tasks.base.Task`.

    Under DeepSpeed (any ZeRO stage) ``ema_decay`` is refused: the engine casts the whole module, the average
    included, to bf16, where a 0.9999-decay average stops moving, and under stage 3 a copy of the model would copy
    empty shards. Train with EMA under ``ddp``.
    """

    def __init__(
        self,
        backbone: str = "vit_tiny_patch16_224",
        backbone_kwargs: dict[str, Any] | None = None,
        num_classes: int = 1000,
        class_names: list[str] | None = None,
        label_smoothing: float = 0.0,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        ema_decay: float | None = None,
        layer_decay: float | None = None,
        init_from: str | None = None,
        init_head: bool = False,
        grad_checkpointing: bool = False,
        compile: bool = False,
        compile_mode: str = "default",
        optimizer: OptimizerCallable = adamw,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_reference_batch: int | None = None,
        max_skipped_steps: int | None = 10,
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, lr_reference_batch=lr_reference_batch,
                         max_skipped_steps=max_skipped_steps, grad_checkpointing=grad_checkpointing)
        if num_classes < 1:
            raise ValueError(f"model.num_classes must be positive, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"model.class_names has {len(class_names)} names for {num_classes} classes")
        if backbone not in timm.list_models():
            raise ValueError(f"model.backbone: {backbone!r} is not a timm model name (see timm.list_models())")
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"model.ema_decay must be in (0, 1), got {ema_decay}")
        if layer_decay is not None and not 0.0 < layer_decay <= 1.0:
            raise ValueError(f"model.layer_decay must be in (0, 1], got {layer_decay}")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.backbone = backbone
        self.backbone_kwargs = dict(backbone_kwargs or {})
        self.num_classes = num_classes
        self.class_names = class_names
        self.label_smoothing = label_smoothing
        self.ema_decay = ema_decay
        self.layer_decay = layer_decay
        self.init_from = init_from
        self.init_head = init_head
        self.compile_model = compile
        self.compile_mode = compile_mode
        self.mixup_fn = None
        if mixup > 0 or cutmix > 0:
            self.mixup_fn = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=mixup_prob,
                                  switch_prob=mixup_switch_prob, label_smoothing=label_smoothing,
                                  num_classes=num_classes)
        self.ema: ModelEmaV3 | None = None
        top_k = min(5, num_classes)
        self.val_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_acc5 = MulticlassAccuracy(num_classes, top_k=top_k, average="micro")
        self.train_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        if ema_decay is not None:
            self.ema_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
            self.ema_acc5 = MulticlassAccuracy(num_classes, top_k=top_k, average="micro")

    # -- model ------------------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        kwargs = {k: v for k, v in self.backbone_kwargs.items() if k not in ("pretrained", "num_classes")}
        try:
            model = timm.create_model(self.backbone, pretrained=False, num_classes=self.num_classes, **kwargs)
        except TypeError as err:
            raise ValueError(f"model.backbone_kwargs for {self.backbone}: {err}") from None
        return model

    def load_initial_weights(self) -> None:
        if self.init_from is not None:
            load_backbone_weights(self.model, self.init_from, init_head=self.init_head)

    def finish_model(self) -> None:
        if self.ema_decay is not None:
            self.ema = ModelEmaV3(self.model, decay=self.ema_decay)
            self.ema.requires_grad_(False)
            self.ema.train()  # it never runs in training; Lightning switches it to eval for validation
        if self.compile_model:
            self.model.compile(mode=self.compile_mode)

    def check_strategy(self) -> None:
        super().check_strategy()
        strategy = deepspeed_strategy(self._trainer)
        if strategy is not None and self.ema_decay is not None:
            raise ValueError(
                f"model.ema_decay is not supported under trainer.strategy {deepspeed_strategy_name(strategy)}: "
                f"DeepSpeed casts the whole module, the average included, to bf16 (and under ZeRO stage 3 a copy of "
                f"the model copies empty shards); set model.ema_decay null, or train with trainer.strategy ddp"
            )

    def parameter_groups(self) -> list[dict]:
        no_decay = set(getattr(self.model, "no_weight_decay", lambda: set())())
        if self.layer_decay is None:
            return param_groups(self.model, no_decay_names=no_decay)
        # weight_decay=1.0 marks the decayed groups; the optimizer's own weight decay replaces it
        return param_groups_layer_decay(self.model, weight_decay=1.0, no_weight_decay_list=no_decay,
                                        layer_decay=self.layer_decay)

    # -- steps ------------------------------------------------------------------------------------------------
    def compute_loss(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        logits = model(batch["image"])
        target = batch["label"]
        if target.is_floating_point():  # soft targets from Mixup/CutMix (smoothing already inside)
            loss = torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        else:
            loss = F.cross_entropy(logits.float(), target, label_smoothing=self.label_smoothing)
        return {"loss": loss, "logits": logits}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        hard = batch["label"]
        if self.mixup_fn is not None:
            if batch["image"].shape[0] % 2:
                raise ValueError("Mixup/CutMix needs an even batch size: set data.batch_size to an even number")
            image, soft = self.mixup_fn(batch["image"], hard)
            batch = {**batch, "image": image, "label": soft}
        out = self.compute_loss(self.model, batch)
        self.train_acc1(out["logits"].detach(), hard)
        self.log("train/loss", out["loss"], prog_bar=True)
        self.log("train/acc1", self.train_acc1, on_step=True, on_epoch=False)
        return out["loss"]

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        if self.ema is not None and (batch_idx + 1) % self.trainer.accumulate_grad_batches == 0:
            self.ema.update(self.model, step=self.global_step)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _evaluate(self, batch: dict[str, Any], stage: str) -> None:
        out = self.compute_loss(self.model, batch)
        labels = batch["label"]
        self.val_acc1(out["logits"], labels)
        self.val_acc5(out["logits"], labels)
        n = labels.shape[0]
        self.log(f"{stage}/loss", out["loss"], batch_size=n, sync_dist=True)
        self.log(f"{stage}/acc1", self.val_acc1, prog_bar=True)
        self.log(f"{stage}/acc5", self.val_acc5)
        if self.ema is not None:
            ema_logits = self.ema.module(batch["image"])
            self.ema_acc1(ema_logits, labels)
            self.ema_acc5(ema_logits, labels)
            self.log(f"{stage}/ema_acc1", self.ema_acc1, prog_bar=True)
            self.log(f"{stage}/ema_acc5", self.ema_acc5)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        probs = self.model(batch["image"]).softmax(-1)
        conf, pred = probs.max(-1)
        names = self.class_names or [str(i) for i in range(self.num_classes)]
        return {"key": batch.get("key"), "label": pred, "class_name": [names[i] for i in pred.tolist()], "prob": conf}


# where a backbone's weights sit in the checkpoints of our tasks, most specific first
BACKBONE_PREFIXES = ("model.visual.trunk.", "model.")


def load_backbone_weights(model: nn.Module, path: str, init_head: bool = False) -> None:
    """Load a backbone from an mmpretrain checkpoint (CLIP image tower or classifier) into ``model``.

    The head (``head.*``) stays new unless ``init_head``, which loads the checkpoint's head as well and
    requires it to have the model's shapes. A position embedding of another grid size (another image size
    or patch stride) is resampled over the patch grid, the model's prefix tokens' entries kept as they are
    (Vim stores its middle class token's entry first, so the same holds for it).

    Raises CheckpointError naming what does not fit when the architectures (or, with ``init_head``, the
    heads) differ.
    """
    from timm.layers import resample_abs_pos_embed

    from mmpretrain.checkpoints import CheckpointError, read_checkpoint, sub_state_dict

    state = read_checkpoint(path, what="model.init_from").get("state_dict")
    if not state:
        raise CheckpointError(f"model.init_from {path}: the checkpoint holds no state_dict")
    own = model.state_dict()
    head = {k for k in own if k.startswith("head.")}
    best = max((sub_state_dict(state, p) for p in BACKBONE_PREFIXES), key=lambda sd: len(set(sd) & set(own)))
    weights = {k: v for k, v in best.items() if k in own and k not in head}
    if init_head:
        theirs = {k: tuple(v.shape) for k, v in best.items() if k.startswith("head.")}
        ours = {k: tuple(own[k].shape) for k in head}
        if not head or theirs != ours:
            raise CheckpointError(
                f"model.init_from {path}: model.init_head is set, but the checkpoint's head {theirs or 'is absent'} "
                f"does not fit the model's {ours or '(none)'}; set model.num_classes to the checkpoint's number of "
                f"classes, or model.init_head false to start a new head"
            )
        weights.update({k: best[k] for k in head})
    if "pos_embed" in weights and weights["pos_embed"].shape != own["pos_embed"].shape:
        prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
        weights["pos_embed"] = resample_abs_pos_embed(
            weights["pos_embed"], new_size=model.patch_embed.grid_size, num_prefix_tokens=prefix
        )
    missing = sorted(set(own) - set(weights) - head)
    wrong = sorted(k for k, v in weights.items() if v.shape != own[k].shape)
    if missing or wrong or not weights:
        raise CheckpointError(
            f"model.init_from {path}: its weights do not fit {type(model).__name__} "
            f"(missing {missing[:4]}{'...' if len(missing) > 4 else ''}, other shapes {wrong[:4]}); "
            f"choose the backbone and backbone_kwargs the checkpoint was trained with"
        )
    model.load_state_dict(weights, strict=False)
