"""Optimizer parameter groups and learning-rate schedules shared by the tasks."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR


def param_groups(
    module: nn.Module, no_decay_names: Iterable[str] = (), extra_no_decay: Iterable[nn.Parameter] = ()
) -> list[dict]:
    """Split trainable parameters into a decayed group and a ``weight_decay=0`` group.

    No decay for: parameters with fewer than 2 dimensions (norms, biases, scalars such as CLIP's
    logit scale), embeddings (``nn.Embedding`` weights, position embeddings, class tokens), and
    parameters whose name contains any of ``no_decay_names``. The optimizer's own ``weight_decay``
    applies to the first group.
    """
    skip = set(no_decay_names) | {"pos_embed", "cls_token", "position_embedding", "positional_embedding", "reg_token"}
    embedding_params = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    extra = {id(p) for p in extra_no_decay}
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or id(p) in embedding_params or id(p) in extra or any(s in name for s in skip):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


class WarmupCosine(LambdaLR):
    """Linear warmup from 0 to the base learning rate, then cosine decay to ``min_lr_ratio`` of it; per step.

    Args:
        optimizer: the optimizer.
        warmup_steps: optimizer steps of linear warmup.
        warmup_epochs: warmup in epochs instead (converted with the trainer's steps per epoch).
        total_steps: optimizer steps of the whole run; ``None`` lets the task fill in the trainer's
            estimate (``trainer.estimated_stepping_batches``) before training starts.
        min_lr_ratio: final learning rate as a fraction of the base rate.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_steps: int = 0,
        warmup_epochs: float | None = None,
        total_steps: int | None = None,
        min_lr_ratio: float = 0.0,
    ) -> None:
        if warmup_steps < 0 or (warmup_epochs is not None and warmup_epochs < 0):
            raise ValueError("warmup_steps and warmup_epochs must be >= 0")
        if warmup_steps and warmup_epochs:
            raise ValueError("give warmup_steps or warmup_epochs, not both")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.warmup_steps = warmup_steps
        self.warmup_epochs = warmup_epochs
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio
        super().__init__(optimizer, self.factor)

    def resolve(self, total_steps: int, steps_per_epoch: int) -> None:
        """Fill in what the config left to the trainer: the run's length, warmup given in epochs."""
        if self.total_steps is None:
            self.total_steps = int(total_steps)
        if self.warmup_epochs:
            self.warmup_steps = int(round(self.warmup_epochs * steps_per_epoch))
            self.warmup_epochs = None
        # the factor of step 0 was applied at construction, before the warmup was known
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base_lr * self.factor(self.last_epoch)

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.total_steps is None:
            return 1.0
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def state_dict(self) -> dict:
        # LambdaLR would try to pickle the bound method; our schedule is fully described by the fields
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "lr_lambdas")}

    def load_state_dict(self, state_dict: dict) -> None:
        self.__dict__.update(state_dict)
