"""What every task shares: late model construction, injected optimizers and schedules, FLOP counting, one
activation-recomputation switch, the strategy checks (DDP, DeepSpeed ZeRO 1/2/3), and the reliability of training
(non-finite steps skipped and counted, generator states and checks in checkpoints, the data checked against the
model before training starts).

Under DeepSpeed ZeRO stage 3 Lightning calls ``configure_model`` inside ``deepspeed.zero.Init``, so the parameters
are created sharded. Whatever a task builds *besides* its model (the meta-device copy that checks the data
against the model's shape, the one FLOP counting runs) is built in ``setup`` and ``on_train_batch_start``, outside
that context, from :meth:`Task.build_model`: it never sees the sharded parameters.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities import rank_zero_info
from lightning_utilities.core.apply_func import apply_to_collection
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mmpretrain.checkpoints import check_state_dict_fits
from mmpretrain.optim import WarmupCosine, param_groups
from mmpretrain.rng import capture_rng_state, gather_objects, restore_rng_state

log = logging.getLogger("mmpretrain")


class NonFiniteError(FloatingPointError):
    """Too many consecutive training steps with a non-finite loss or gradient norm; names the step and batch."""


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
        max_skipped_steps: a step whose loss or gradient norm is not finite (on any rank) is skipped: no
            parameter and no optimizer-state update (the step still counts in ``global_step`` and the
            schedule). Skips are counted (``train/skipped_steps``) and logged with the batch's sample keys;
            after this many *consecutive* skips the next non-finite step raises :class:`NonFiniteError`
            naming the step and the keys. 0 raises at the first; None never raises. Under fp16 with a
            gradient scaler, non-finite gradients are the scaler's business (it lowers the scale), only a
            non-finite loss counts. Under DeepSpeed the gradients live in the ZeRO optimizer's partitions
            (``p.grad`` is empty), and DeepSpeed itself skips a step whose gradients are not finite (ZeRO
            1/2: ``bf16.check_grad_overflow``, on by default, and fp16's loss scaler; ZeRO 3: always); the task
            then leaves the step to DeepSpeed and counts the steps the engine skipped (``engine.skipped_steps``)
            against this limit, the same way. A non-finite loss whose step DeepSpeed applied anyway (its overflow
            check switched off) raises :class:`NonFiniteError` at once.
        grad_checkpointing: activation recomputation, the one switch for every model: each block's activations
            are recomputed in the backward pass instead of kept (less memory, about one more forward pass of
            compute). Our own blocks (METALM decoder and span encoder, Vim blocks, the CLIP text tower) use
            non-reentrant ``torch.utils.checkpoint``, or DeepSpeed's ``deepspeed.checkpointing.checkpoint``
            under the DeepSpeed strategy (so that its ``activation_checkpointing`` settings, such as
            ``cpu_checkpointing``, apply); timm's blocks (ViT classifiers, the CLIP image tower) use timm's
            per-block checkpointing (non-reentrant). Numerically the same training either way.

    Subclasses overriding ``on_train_batch_start``, ``on_before_backward``, ``on_before_optimizer_step``,
    ``on_save_checkpoint``, ``on_load_checkpoint`` or ``on_fit_start`` call ``super()``.
    """

    def __init__(self, optimizer: OptimizerCallable = adamw, lr_scheduler: LRSchedulerCallable | None = None,
                 lr_reference_batch: int | None = None, max_skipped_steps: int | None = 10,
                 grad_checkpointing: bool = False) -> None:
        super().__init__()
        if lr_reference_batch is not None and lr_reference_batch < 1:
            raise ValueError(f"model.lr_reference_batch must be positive, got {lr_reference_batch}")
        if max_skipped_steps is not None and max_skipped_steps < 0:
            raise ValueError(f"model.max_skipped_steps must be >= 0 (or null for no limit), got {max_skipped_steps}")
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.lr_reference_batch = lr_reference_batch
        self.max_skipped_steps = max_skipped_steps
        self.grad_checkpointing = grad_checkpointing
        self.model: nn.Module | None = None
        #: model FLOPs of one training step (forward and backward) on this rank; read by ThroughputMonitor
        self.flops_per_batch: int | None = None
        self._flops_counted = False
        #: training steps skipped for a non-finite loss or gradient norm (all of them, and in a row)
        self.skipped_steps = 0
        self.consecutive_skipped_steps = 0
        self._losses_finite: torch.Tensor | None = None  # all losses backpropagated since the last step
        self._step_keys: list[str] = []  # sample keys of the batches since the last optimizer step
        self._rng_to_restore: dict[str, Any] | None = None
        self._data_checked = False
        self._prepared = False
        self._deepspeed_skips_before: int | None = None  # the engine's skip count before its step
        self._deepspeed_step_losses: tuple[bool, list[str]] | None = None

    # -- to implement -------------------------------------------------------------------------------------
    def _datamodule(self) -> Any:
        """The trainer's data module, or None (no trainer yet, or data given as bare loaders)."""
        trainer = self._trainer
        return getattr(trainer, "datamodule", None) if trainer is not None else None

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def compute_loss(self, model: nn.Module, batch: Any) -> dict[str, Any]:
        """Run ``model`` on ``batch``; return a dict with at least ``loss``."""
        raise NotImplementedError

    def prepare_build(self) -> None:
        """Take what the model needs from the data (vocabulary size, special ids) and check that they fit; may
        build a copy of the model on the meta device. Runs once, in ``setup`` under a trainer (outside
        DeepSpeed's ``zero.Init``), else at the start of ``configure_model``."""

    def _prepare_once(self) -> None:
        if not self._prepared:
            self._prepared = True
            self.prepare_build()

    # -- model ----------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Build the model once (Lightning calls this inside the strategy's sharding context): what the data
        tells (:meth:`prepare_build`), :meth:`build_model`, ZeRO-3 registrations, the task's initial weights
        (:meth:`load_initial_weights`), activation recomputation, then :meth:`finish_model`."""
        if self.model is not None:
            return
        self._prepare_once()
        self.model = self.build_model()
        self.register_zero3_parameters()
        self.load_initial_weights()
        if self.grad_checkpointing:
            self.apply_recomputation(self.model)
        self.finish_model()

    def load_initial_weights(self) -> None:
        """Load weights from elsewhere into the freshly built ``self.model`` (a task's ``init_from``); none by
        default."""

    def finish_model(self) -> None:
        """Last touches after recomputation is set up (compilation, a moving average); none by default."""

    def external_parameters(self) -> list[tuple[nn.Module, nn.Parameter]]:
        """``(module, parameter)`` pairs where ``module``'s forward uses a parameter another module owns (a tied
        output projection): ZeRO stage 3 must gather it for that forward too. Registered with DeepSpeed by
        :meth:`register_zero3_parameters`; none by default."""
        return []

    def register_zero3_parameters(self) -> None:
        """Under ZeRO stage 3, tell DeepSpeed about :meth:`external_parameters` (its
        ``zero.register_external_parameter``); nothing otherwise. Call right after building the model."""
        strategy = deepspeed_strategy(self._trainer)
        if strategy is None or not strategy.zero_stage_3:
            return
        import deepspeed

        for module, parameter in self.external_parameters():
            deepspeed.zero.register_external_parameter(module, parameter)

    def apply_recomputation(self, model: nn.Module) -> None:
        """Switch ``model`` to activation recomputation (``model.grad_checkpointing``): its
        ``set_grad_checkpointing(True)``, with DeepSpeed's checkpoint function for the models that take one
        when the strategy is DeepSpeed."""
        setter = getattr(model, "set_grad_checkpointing", None)
        if setter is None:
            raise ValueError(f"model.grad_checkpointing: {type(model).__name__} has no set_grad_checkpointing; "
                             "set model.grad_checkpointing false for this model")
        fn = self.recompute_function()
        if fn is not None and "checkpoint_fn" in inspect.signature(setter).parameters:
            setter(True, checkpoint_fn=fn)
        else:
            setter(True)

    def recompute_function(self) -> Callable[..., torch.Tensor] | None:
        """The block recomputation function for our models: DeepSpeed's under the DeepSpeed strategy (reentrant;
        it honours the strategy's ``activation_checkpointing`` section: ``cpu_checkpointing``,
        ``partition_activations``), None (non-reentrant ``torch.utils.checkpoint``) otherwise."""
        if deepspeed_strategy(self._trainer) is None:
            return None
        import deepspeed

        return deepspeed.checkpointing.checkpoint

    # -- strategy ---------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        self.check_strategy()
        self._prepare_once()

    def check_strategy(self) -> None:
        """Refuse what the trainer's strategy cannot do with this task, before anything is built; subclasses
        extend it (call ``super()``)."""
        strategy = deepspeed_strategy(self._trainer)
        if strategy is None:
            return
        config = strategy.config if isinstance(strategy.config, dict) else None
        if config is not None and "train_micro_batch_size_per_gpu" not in config:
            # Lightning would read it from the loader's batch sampler, which streaming loaders (ours batch in
            # the dataset) do not have; DeepSpeed uses it for its throughput log and its batch arithmetic
            per_rank = getattr(self._datamodule(), "batch_size", None)
            config["train_micro_batch_size_per_gpu"] = int(per_rank) if per_rank else 1
        if not self.automatic_optimization:
            raise ValueError(f"trainer.strategy {deepspeed_strategy_name(strategy)}: {type(self).__name__} is "
                             f"configured for manual optimization, which mmpretrain does not run under DeepSpeed; "
                             f"use trainer.strategy ddp for it")
        if getattr(self, "compile_model", False) and strategy.zero_stage_3:
            raise ValueError(f"model.compile is not supported under trainer.strategy "
                             f"{deepspeed_strategy_name(strategy)} (ZeRO stage 3 gathers each parameter in hooks "
                             f"that break compiled graphs): set model.compile false, or use deepspeed_stage_2")

    def parameter_groups(self) -> list[dict]:
        return param_groups(self.model)

    def configure_optimizers(self) -> Any:
        self.configure_model()
        optimizer = self.optimizer_factory(self.parameter_groups())
        strategy = deepspeed_strategy(self._trainer)
        if strategy is not None:
            optimizer = cpu_optimizer_for_offload(optimizer, strategy)
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
        # what built this checkpoint, so that `mmpretrain export` can rebuild it without the config; the
        # generator states of every rank (collective: Lightning dumps checkpoints on every rank) and the
        # skip counters, so that a resumed run continues the same random draws. Plain types only.
        checkpoint["mmpretrain"] = {
            "task": f"{type(self).__module__}.{type(self).__qualname__}",
            "rng": gather_objects(capture_rng_state()),
            "skipped_steps": self.skipped_steps,
            "consecutive_skipped_steps": self.consecutive_skipped_steps,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        ours = checkpoint.get("mmpretrain") or {}
        state = checkpoint.get("state_dict")
        if self.model is not None and isinstance(state, dict) and state:
            path = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
            check_state_dict_fits(
                self.state_dict(), state, what=f"--ckpt_path {path}" if path else "checkpoint",
                saved_by=ours.get("task"),
                hint="Resume with the configuration it was trained with (its hyperparameters are inside: "
                     "torch.load(path, weights_only=True)['hyper_parameters']); to start another model from its "
                     "weights, use the task's init_from instead of --ckpt_path.",
            )
        self.skipped_steps = int(ours.get("skipped_steps", 0))
        self.consecutive_skipped_steps = int(ours.get("consecutive_skipped_steps", 0))
        states = ours.get("rng") or []
        rank = self._trainer.global_rank if self._trainer is not None else 0
        world = self._trainer.world_size if self._trainer is not None else 1
        if len(states) == world:
            # applied at the first training batch, after whatever setup draws in between
            self._rng_to_restore = states[rank]
        elif states:
            log.warning("the checkpoint holds generator states of %d ranks, this run has %d: random draws continue "
                        "from this run's seed instead", len(states), world)

    # -- the data against the model, before training starts ----------------------------------------------
    def on_fit_start(self) -> None:
        self.check_data()

    def on_validation_start(self) -> None:
        self.check_data()

    def on_test_start(self) -> None:
        self.check_data()

    def on_predict_start(self) -> None:
        self.check_data()

    def check_data(self) -> None:
        """Fail with a message naming the fields when the data module's images or tokens do not fit the model:
        an image size the patch embedding does not tile (or that differs from a fixed input size), a
        tokenizer vocabulary larger than the model's. Runs once, before the first step."""
        if self._data_checked or self.model is None or self._trainer is None:
            return
        self._data_checked = True
        data = getattr(self._trainer, "datamodule", None)
        if data is None:
            return
        image_size = getattr(data, "image_size", None)
        if isinstance(image_size, int):
            for name, module in self.model.named_modules():
                check_patch_embedding(name, module, image_size)
        tokenizer = getattr(data, "tokenizer", None)
        vocab = getattr(tokenizer, "vocab_size", None)
        own = getattr(self, "vocab_size", None)
        if isinstance(vocab, int) and isinstance(own, int) and own < vocab:
            raise ValueError(
                f"model.vocab_size ({own}) is smaller than the vocabulary of the data's tokenizer "
                f"({getattr(data, 'tokenizer_path', tokenizer)}: {vocab} tokens): token ids >= {own} would index "
                f"past the embedding; leave model.vocab_size to the data (the CLI links data.vocab_size) or use "
                f"a tokenizer of at most {own} tokens"
            )

    # -- every training batch ---------------------------------------------------------------------------------
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if not self._flops_counted:
            self._flops_counted = True
            self.flops_per_batch = self.count_flops(batch)
        keys = batch.get("key") if isinstance(batch, dict) else None
        if isinstance(keys, (list, tuple)):
            self._step_keys.extend(str(k) for k in keys)
        if self._rng_to_restore is not None:  # resumed: continue the random draws of the run we continue
            restore_rng_state(self._rng_to_restore)
            self._rng_to_restore = None

    # -- non-finite steps -------------------------------------------------------------------------------------
    def on_before_backward(self, loss: torch.Tensor) -> None:
        # every loss backpropagated before the next optimizer step (micro-batches, accumulation); no sync here
        finite = torch.isfinite(loss.detach()).all()
        self._losses_finite = finite if self._losses_finite is None else self._losses_finite & finite

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if deepspeed_strategy(self._trainer) is not None:
            self._before_deepspeed_step()
        else:
            self.guard_optimizer_step(optimizer)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self._deepspeed_skips_before is not None:
            self._after_deepspeed_step()

    # under DeepSpeed the step is the engine's: it skips steps whose gradients are not finite; we count them
    def _before_deepspeed_step(self) -> None:
        engine = self.trainer.strategy.deepspeed_engine
        bad_loss = self._losses_finite is not None and not bool(self._losses_finite.all().item())
        self._deepspeed_step_losses = (bad_loss, self._step_keys)
        self._step_keys, self._losses_finite = [], None
        self._deepspeed_skips_before = int(getattr(engine, "skipped_steps", 0))

    def _after_deepspeed_step(self) -> None:
        engine = self.trainer.strategy.deepspeed_engine
        skipped = int(getattr(engine, "skipped_steps", 0)) > (self._deepspeed_skips_before or 0)
        local_bad, keys = self._deepspeed_step_losses or (False, [])
        self._deepspeed_skips_before, self._deepspeed_step_losses = None, None
        bad_loss = local_bad
        if self.trainer.world_size > 1:
            bad_loss = self.trainer.strategy.reduce_boolean_decision(local_bad, all=False)
        if bad_loss and not skipped:
            raise NonFiniteError(
                f"training step {self.global_step}: non-finite loss (batch keys {_listed_keys(keys)}) and DeepSpeed "
                f"applied the step anyway: its overflow check is off; remove bf16.check_grad_overflow: false from the "
                f"DeepSpeed config (trainer.strategy), and resume from the last checkpoint"
            )
        self.record_step(skipped, counts=skipped and (bad_loss or not self._fp16()), keys=keys, local_bad=local_bad,
                         why="DeepSpeed skipped it: non-finite gradients")

    def _fp16(self) -> bool:
        return str(self.trainer.precision) in ("16", "16-mixed", "16-true")

    def _scaler_active(self) -> bool:
        plugin = getattr(self._trainer, "precision_plugin", None) if self._trainer is not None else None
        return getattr(plugin, "scaler", None) is not None

    def guard_optimizer_step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Skip the coming optimizer step when a loss since the last step or the gradient norm is not finite on
        any rank: the gradients are dropped, so the optimizer updates neither parameters nor its state. Called
        after backward and before the optimizer step (Lightning's ``on_before_optimizer_step``, in automatic and
        manual optimization alike). Returns True when the step is skipped; raises :class:`NonFiniteError` past
        ``max_skipped_steps`` consecutive skips."""
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        checks = [] if self._losses_finite is None else [self._losses_finite]
        if params and not self._scaler_active():
            checks.append(torch.isfinite(torch.nn.utils.get_total_norm([p.grad for p in params])).to(checks[0].device
                          if checks else params[0].device))
        local_bad = bool(not torch.stack(checks).all().item()) if checks else False
        trainer = self._trainer
        bad = local_bad
        if trainer is not None and trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(local_bad, all=False)
        keys, self._step_keys, self._losses_finite = self._step_keys, [], None
        if bad:
            for p in params:
                p.grad = None
        self.record_step(bad, counts=bad, keys=keys, local_bad=local_bad,
                         why="non-finite loss or gradient norm")
        return bad

    def record_step(self, skipped: bool, counts: bool, keys: list[str], local_bad: bool, why: str) -> None:
        """Count a skipped step (``train/skipped_steps``) and, where ``counts``, its consecutive run against
        ``max_skipped_steps``; log which batch. Collective when the limit is passed (gathers the culprits' keys)."""
        trainer = self._trainer
        if not skipped:
            self.consecutive_skipped_steps = 0
            if trainer is not None:
                self.log("train/skipped_steps", float(self.skipped_steps))
            return
        self.skipped_steps += 1
        if counts:
            self.consecutive_skipped_steps += 1
        step = self.global_step
        where = f"its batch held keys {_listed_keys(keys)}" if local_bad else "another rank's batch was"
        if trainer is not None:
            self.log("train/skipped_steps", float(self.skipped_steps))
        limit = self.max_skipped_steps
        if counts and limit is not None and self.consecutive_skipped_steps > limit:
            culprits = [k for ks in gather_objects(keys if local_bad else []) for k in ks]
            raise NonFiniteError(
                f"training step {step}: non-finite loss or gradient norm in {self.consecutive_skipped_steps} "
                f"consecutive steps (more than model.max_skipped_steps={limit}); the last offending batch held keys "
                f"{_listed_keys(culprits)}. Lower the learning rate, clip gradients (trainer.gradient_clip_val), "
                f"use bf16 rather than fp16, or inspect these samples (python -m data_tools.inspect_shards)"
            )
        log.warning("training step %d skipped: %s (%s); %d skipped in all, %d in a row", step, why, where,
                    self.skipped_steps, self.consecutive_skipped_steps)

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


def deepspeed_strategy(trainer: Any) -> DeepSpeedStrategy | None:
    """The trainer's strategy when it is Lightning's DeepSpeed strategy, else None (no trainer included)."""
    strategy = getattr(trainer, "strategy", None) if trainer is not None else None
    return strategy if isinstance(strategy, DeepSpeedStrategy) else None


# torch's per-group switches that DeepSpeed's CPU Adam has no use for
_TORCH_ADAM_SWITCHES = ("foreach", "fused", "capturable", "differentiable", "maximize", "amsgrad",
                        "decoupled_weight_decay")


def cpu_optimizer_for_offload(optimizer: torch.optim.Optimizer, strategy: DeepSpeedStrategy) -> torch.optim.Optimizer:
    """The optimizer to hand DeepSpeed: ``optimizer`` itself, or, when the strategy offloads the optimizer to the
    CPU (``deepspeed_stage_*_offload``, or ``zero_optimization.offload_optimizer`` in a JSON config), the same
    Adam or AdamW as DeepSpeed's ``DeepSpeedCPUAdam`` over the same parameter groups. DeepSpeed refuses a PyTorch
    optimizer there (its CPU step would be the slow path) unless the config sets
    ``zero_force_ds_cpu_optimizer: false``; other optimizers fail here with what to do.

    ``DeepSpeedCPUAdam`` is compiled on first use (DeepSpeed's C++ extension, about a minute; it needs a C++
    compiler and ninja)."""
    config = strategy.config if isinstance(strategy.config, dict) else {}
    offload = (config.get("zero_optimization") or {}).get("offload_optimizer") or {}
    if offload.get("device", "none") in ("none", None) or config.get("zero_force_ds_cpu_optimizer") is False:
        return optimizer
    name = deepspeed_strategy_name(strategy)
    kind = type(optimizer)
    defaults = optimizer.defaults
    if kind not in (torch.optim.Adam, torch.optim.AdamW) or defaults.get("amsgrad") or defaults.get("maximize"):
        raise ValueError(
            f"trainer.strategy {name} offloads the optimizer to the CPU, where DeepSpeed runs its own Adam only; "
            f"model.optimizer is {kind.__module__}.{kind.__qualname__}"
            f"{' with amsgrad or maximize' if kind in (torch.optim.Adam, torch.optim.AdamW) else ''}. Use "
            "torch.optim.AdamW or Adam (they become deepspeed.ops.adam.DeepSpeedCPUAdam with the same settings), a "
            "strategy without offload, or a DeepSpeed JSON config with \"zero_force_ds_cpu_optimizer\": false"
        )
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    groups = [{k: v for k, v in group.items() if k not in _TORCH_ADAM_SWITCHES} for group in optimizer.param_groups]
    return DeepSpeedCPUAdam(groups, lr=defaults["lr"], betas=defaults["betas"], eps=defaults["eps"],
                            weight_decay=defaults["weight_decay"],
                            adamw_mode=kind is torch.optim.AdamW or bool(defaults.get("decoupled_weight_decay")))


def deepspeed_strategy_name(strategy: DeepSpeedStrategy) -> str:
    """``deepspeed_stage_3`` (and ``_offload``) as the CLI spells it, from the strategy's configuration."""
    config = strategy.config if isinstance(strategy.config, dict) else {}
    zero = config.get("zero_optimization") or {}
    stage = zero.get("stage", "?")
    offload = "offload_optimizer" in zero or "offload_param" in zero
    return f"deepspeed_stage_{stage}" + ("_offload" if offload else "")


def _listed_keys(keys: list[str], most: int = 8) -> str:
    if not keys:
        return "(unknown: the batches carry no 'key')"
    return "[" + ", ".join(keys[:most]) + (f", ... ({len(keys)} in all)" if len(keys) > most else "") + "]"


def check_patch_embedding(name: str, module: nn.Module, image_size: int) -> None:
    """Raise ValueError when ``image_size`` square images do not fit a patch embedding module (timm's
    ``PatchEmbed`` or any module with ``patch_size`` and ``img_size`` and a convolution ``proj``)."""
    patch = getattr(module, "patch_size", None)
    if patch is None or not hasattr(module, "img_size"):
        return
    proj = getattr(module, "proj", None)
    kernel = tuple(proj.kernel_size) if isinstance(proj, nn.Conv2d) else tuple(_pair(patch))
    stride = tuple(proj.stride) if isinstance(proj, nn.Conv2d) else kernel
    padded = bool(getattr(module, "dynamic_img_pad", False))  # pads inputs up to whole patches itself
    bad = [d for d, (k, s) in enumerate(zip(kernel, stride)) if image_size < k or ((image_size - k) % s and not padded)]
    if bad:
        k, s = kernel[bad[0]], stride[bad[0]]
        fit = max(k, k + s * math.floor((image_size - k) / s))
        raise ValueError(
            f"data.image_size ({image_size}) does not tile into the model's patches ({name}: patch {k}, stride "
            f"{s}): choose an image size such as {fit} or {fit + s} (patch + a multiple of the stride), or "
            f"another patch_size in the model's arguments"
        )
    fixed = getattr(module, "img_size", None)
    if fixed is not None and getattr(module, "strict_img_size", True) and tuple(_pair(fixed)) != (image_size, image_size):
        raise ValueError(
            f"data.image_size ({image_size}) differs from the model's input size {tuple(_pair(fixed))} ({name}): set "
            f"them equal (the model's img_size argument, e.g. model.init_args.backbone_kwargs.img_size for "
            f"classification, or data.init_args.image_size)"
        )


def _pair(x: Any) -> tuple[int, int]:
    return (int(x), int(x)) if isinstance(x, int) else tuple(int(v) for v in x)  # type: ignore[return-value]
