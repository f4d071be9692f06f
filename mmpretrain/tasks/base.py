"""What every task shares: late model construction, injected optimizers and schedules, FLOP counting."""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from lightning_utilities.core.apply_func import apply_to_collection
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mmpretrain.optim import WarmupCosine, param_groups

log = logging.getLogger("mmpretrain")


def adamw(params) -> torch.optim.Optimizer:
    """The default optimizer: AdamW with lr 1e-3 and weight decay 0.05 (on the decayed group only)."""
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)


class Task(pl.LightningModule):
    """Base LightningModule of mmpretrain tasks.

    Subclasses implement :meth:`build_model` (a plain ``nn.Module``, built in ``configure_model`` so
    that sharded strategies create parameters sharded) and :meth:`compute_loss`. Optimizer and
    schedule arrive as callables from the config (``optimizer: {class_path: torch.optim.AdamW,
    init_args: {lr: ...}}``) and are applied to the task's parameter groups.

    Args:
        optimizer: builds the optimizer from parameter groups.
        lr_scheduler: builds a per-step schedule from the optimizer (e.g. ``mmpretrain.optim.WarmupCosine``;
            its ``total_steps`` defaults to the trainer's estimate).
        lr_reference_batch: when set, the optimizer's learning rate is given for this global batch and is
            scaled linearly to the run's (``lr * global_batch / lr_reference_batch``, as DeiT does), so a
            recipe keeps its meaning on any number of GPUs.
    """

    def __init__(self, optimizer: OptimizerCallable = adamw, lr_scheduler: LRSchedulerCallable | None = None,
                 lr_reference_batch: int | None = None) -> None:
        super().__init__()
        if lr_reference_batch is not None and lr_reference_batch < 1:
            raise ValueError(f"model.lr_reference_batch must be positive, got {lr_reference_batch}")
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.lr_reference_batch = lr_reference_batch
        self.model: nn.Module | None = None
        #: model FLOPs of one training step (forward and backward) on this rank; read by ThroughputMonitor
        self.flops_per_batch: int | None = None
        self._flops_counted = False

    # -- to implement -------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def compute_loss(self, model: nn.Module, batch: Any) -> dict[str, Any]:
        """Run ``model`` on ``batch``; return a dict with at least ``loss``."""
        raise NotImplementedError

    # -- model ----------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is None:
            self.model = self.build_model()

    def parameter_groups(self) -> list[dict]:
        return param_groups(self.model)

    def configure_optimizers(self) -> Any:
        self.configure_model()
        optimizer = self.optimizer_factory(self.parameter_groups())
        if self.lr_reference_batch is not None:
            scale = self.global_batch_size() / self.lr_reference_batch
            optimizer.defaults["lr"] *= scale
            for group in optimizer.param_groups:
                group["lr"] *= scale
            log.info("learning rate scaled by %d / %d to %.3g", self.global_batch_size(), self.lr_reference_batch,
                     optimizer.defaults["lr"])
        # groups may carry "lr_scale" (layer-wise decay) and a "weight_decay" marker; the optimizer's
        # configured lr and weight decay are the base they scale
        for group in optimizer.param_groups:
            if "lr_scale" in group:
                group["lr"] = optimizer.defaults["lr"] * group["lr_scale"]
            if group.get("weight_decay") not in (0, 0.0) and "weight_decay" in optimizer.defaults:
                group["weight_decay"] = optimizer.defaults["weight_decay"]
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        if isinstance(scheduler, WarmupCosine) and self._trainer is not None:
            total = int(self.trainer.estimated_stepping_batches)
            accumulate = max(1, self.trainer.accumulate_grad_batches)
            per_epoch = max(1, int(self.trainer.num_training_batches) // accumulate) if self.trainer.num_training_batches != float("inf") else total
            scheduler.resolve(total, per_epoch)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def global_batch_size(self) -> int:
        """Samples per optimizer step over all ranks (data batch x world size x gradient accumulation)."""
        trainer = self.trainer
        per_rank = getattr(trainer.datamodule, "batch_size", None) if trainer.datamodule is not None else None
        if per_rank is None:
            raise ValueError("model.lr_reference_batch needs a data module with a batch_size")
        return int(per_rank) * trainer.world_size * max(1, trainer.accumulate_grad_batches)

    # -- checkpoints ------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # what built this checkpoint, so that `mmpretrain export` can rebuild it without the config
        checkpoint["mmpretrain"] = {"task": f"{type(self).__module__}.{type(self).__qualname__}"}

    # -- throughput -------------------------------------------------------------------------------------------
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if not self._flops_counted:
            self._flops_counted = True
            self.flops_per_batch = self.count_flops(batch)

    def count_flops(self, batch: Any) -> int | None:
        """FLOPs of one forward and backward step on ``batch``, counted on a copy of the model built on the meta device."""
        try:
            with torch.device("meta"):
                model = self.build_model()
            meta_batch = apply_to_collection(batch, torch.Tensor, lambda t: t.to("meta"))
            with FlopCounterMode(display=False) as counter:
                self.compute_loss(model, meta_batch)["loss"].backward()
            flops = int(counter.get_total_flops())
        except Exception as err:  # a model that cannot run on meta: report throughput without MFU
            rank_zero_info(f"mmpretrain: FLOPs not counted ({type(err).__name__}: {err}); MFU will not be reported")
            return None
        rank_zero_info(f"mmpretrain: {flops / 1e9:.2f} GFLOPs per training step per device")
        return flops
