"""Image classification with any timm model."""

from __future__ import annotations

from typing import Any

import timm
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from mmpretrain.tasks.base import Task, adamw


class ImageClassification(Task):
    """Supervised image classification: a timm model by name, cross-entropy, top-1/top-5 accuracy.

    Args:
        backbone: a timm model name (``vit_tiny_patch16_224``, ``deit_small_patch16_224`` ...); never
            loads pretrained weights.
        backbone_kwargs: keyword arguments for ``timm.create_model`` (``img_size``, ``patch_size``,
            ``depth``, ``embed_dim``, ``drop_path_rate`` ...).
        num_classes: number of classes (linked from the data module by the CLI).
        class_names: class names in label order (linked from the data module).
        label_smoothing: cross-entropy label smoothing.
        grad_checkpointing: recompute each block's activations in the backward pass.
        optimizer, lr_scheduler: see :class:`~mmpretrain.tasks.base.Task`.
    """

    def __init__(
        self,
        backbone: str = "vit_tiny_patch16_224",
        backbone_kwargs: dict[str, Any] | None = None,
        num_classes: int = 1000,
        class_names: list[str] | None = None,
        label_smoothing: float = 0.0,
        grad_checkpointing: bool = False,
        optimizer: OptimizerCallable = adamw,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler)
        if num_classes < 1:
            raise ValueError(f"model.num_classes must be positive, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"model.class_names has {len(class_names)} names for {num_classes} classes")
        if backbone not in timm.list_models():
            raise ValueError(f"model.backbone: {backbone!r} is not a timm model name (see timm.list_models())")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.backbone = backbone
        self.backbone_kwargs = dict(backbone_kwargs or {})
        self.num_classes = num_classes
        self.class_names = class_names
        self.label_smoothing = label_smoothing
        self.grad_checkpointing = grad_checkpointing
        top_k = min(5, num_classes)
        self.val_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_acc5 = MulticlassAccuracy(num_classes, top_k=top_k, average="micro")
        self.train_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")

    def build_model(self) -> nn.Module:
        kwargs = {k: v for k, v in self.backbone_kwargs.items() if k not in ("pretrained", "num_classes")}
        try:
            model = timm.create_model(self.backbone, pretrained=False, num_classes=self.num_classes, **kwargs)
        except TypeError as err:
            raise ValueError(f"model.backbone_kwargs for {self.backbone}: {err}") from None
        if self.grad_checkpointing:
            model.set_grad_checkpointing(True)
        return model

    def compute_loss(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        logits = model(batch["image"])
        loss = F.cross_entropy(logits, batch["label"], label_smoothing=self.label_smoothing)
        return {"loss": loss, "logits": logits}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = self.compute_loss(self.model, batch)
        self.train_acc1(out["logits"].detach(), batch["label"])
        self.log("train/loss", out["loss"], prog_bar=True)
        self.log("train/acc1", self.train_acc1, on_step=True, on_epoch=False)
        return out["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _evaluate(self, batch: dict[str, Any], stage: str) -> None:
        out = self.compute_loss(self.model, batch)
        self.val_acc1(out["logits"], batch["label"])
        self.val_acc5(out["logits"], batch["label"])
        n = batch["label"].shape[0]
        self.log(f"{stage}/loss", out["loss"], batch_size=n, sync_dist=True)
        self.log(f"{stage}/acc1", self.val_acc1, prog_bar=True)
        self.log(f"{stage}/acc5", self.val_acc5)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        probs = self.model(batch["image"]).softmax(-1)
        conf, pred = probs.max(-1)
        names = self.class_names or [str(i) for i in range(self.num_classes)]
        return {"key": batch.get("key"), "label": pred, "class_name": [names[i] for i in pred.tolist()], "prob": conf}
