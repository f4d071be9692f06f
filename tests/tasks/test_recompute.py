"""Activation recomputation, the one ``grad_checkpointing`` switch of every task: the same loss and gradients
with and without it (each task's demo-size model), DeepSpeed's checkpoint function through the models' hook,
FLOP counts without the recomputation, and the DeepSpeed refusals named by field."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mmpretrain.tasks.classification import ImageClassification
from mmpretrain.tasks.contrastive import ContrastivePretraining
from mmpretrain.tasks.semicausal_lm import SemiCausalLM

VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 4}
VIM = {"img_size": 32, "patch_size": 16, "embed_dim": 48, "depth": 2, "d_state": 4}


def _images(n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def _tokens(n: int, length: int, vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (n, length), generator=torch.Generator().manual_seed(1))


CASES = {
    "vit": (lambda gc: ImageClassification(backbone="vit_tiny_patch16_224", backbone_kwargs=VIT, num_classes=5,
                                           grad_checkpointing=gc),
            lambda: {"image": _images(), "label": torch.tensor([1, 3])}),
    "vim": (lambda gc: ImageClassification(backbone="vim_tiny", backbone_kwargs=VIM, num_classes=5,
                                           grad_checkpointing=gc),
            lambda: {"image": _images(), "label": torch.tensor([0, 4])}),
    "clip": (lambda gc: ContrastivePretraining(preset="clip_demo", vocab_size=100, eot_id=99, grad_checkpointing=gc),
             lambda: {"image": _images(4, 64), "input_ids": _tokens(4, 12, 99)}),
    "metalm": (lambda gc: SemiCausalLM(preset="metalm_demo", vocab_size=64, bos_id=1, eos_id=2, pad_id=0,
                                       grad_checkpointing=gc),
               lambda: {"input_ids": _tokens(2, 24, 64),
                        # one span per row: (row, start, length) as the span sampler writes them
                        "spans": torch.tensor([[0, 4, 5], [1, 10, 6]]),
                        "span_ids": torch.stack([_tokens(1, 6, 64)[0], _tokens(1, 6, 64)[0]])}),
}


def _loss_and_grads(task, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    task.train()
    loss = task.compute_loss(task.model, batch)["loss"]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in task.model.named_parameters() if p.grad is not None}


def _built(make, gc: bool):
    torch.manual_seed(0)
    task = make(gc)
    task.configure_model()
    return task


@pytest.mark.parametrize("name", list(CASES))
def test_recomputation_changes_nothing_numerically(name: str) -> None:
    make, batch = CASES[name]
    plain, recomputed = _built(make, False), _built(make, True)
    recomputed.model.load_state_dict(plain.model.state_dict())
    assert _recomputing(recomputed.model) and not _recomputing(plain.model)
    loss, grads = _loss_and_grads(plain, batch())
    loss_gc, grads_gc = _loss_and_grads(recomputed, batch())
    torch.testing.assert_close(loss_gc, loss, rtol=0, atol=0)
    assert grads.keys() == grads_gc.keys() and len(grads) > 5
    for key in grads:
        torch.testing.assert_close(grads_gc[key], grads[key], rtol=1e-6, atol=1e-7, msg=key)


def _recomputing(model: nn.Module) -> bool:
    return any(getattr(m, "grad_checkpointing", False) for m in model.modules())


@pytest.mark.parametrize("name", ["vit", "metalm"])
def test_flops_do_not_count_the_recomputation(name: str) -> None:
    make, batch = CASES[name]
    assert _built(make, True).count_flops(batch()) == _built(make, False).count_flops(batch())




@pytest.mark.parametrize("name", ["vim", "clip", "metalm"])
def test_deepspeed_checkpoint_function_through_the_models_hook(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    deepspeed = pytest.importorskip("deepspeed")
    import mmpretrain.tasks.base as base

    make, batch = CASES[name]
    plain = _built(make, False)
    # the task picks DeepSpeed's function when the trainer's strategy is DeepSpeed
    monkeypatch.setattr(base, "deepspeed_strategy", lambda trainer: SimpleNamespace(zero_stage_3=False))
    calls = []

    def counted(function, *args):
        calls.append(type(function).__name__)
        return deepspeed.checkpointing.checkpoint(function, *args)

    monkeypatch.setattr(base.Task, "recompute_function", lambda self: counted)
    recomputed = _built(make, True)
    recomputed.model.load_state_dict(plain.model.state_dict())
    loss, grads = _loss_and_grads(plain, batch())
    loss_gc, grads_gc = _loss_and_grads(recomputed, batch())
    assert calls, "DeepSpeed's checkpoint function was not used"
    torch.testing.assert_close(loss_gc, loss, rtol=0, atol=0)
    assert grads.keys() == grads_gc.keys()
    for key in grads:
        torch.testing.assert_close(grads_gc[key], grads[key], rtol=1e-6, atol=1e-7, msg=key)


def test_recompute_function_is_torch_without_deepspeed() -> None:
    task = _built(CASES["metalm"][0], True)
    assert task.recompute_function() is None and task.model.checkpoint_fn is None


def test_a_model_without_the_switch_is_named() -> None:
    task = _built(CASES["metalm"][0], False)
    with pytest.raises(ValueError, match="model.grad_checkpointing: Linear"):
        task.apply_recomputation(nn.Linear(2, 2))


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_refusals_name_the_field(stage: int) -> None:
    pytest.importorskip("deepspeed")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    strategy = DeepSpeedStrategy(stage=stage)
    trainer = SimpleNamespace(strategy=strategy)
    ema = ImageClassification(backbone="vit_tiny_patch16_224", backbone_kwargs=VIT, num_classes=5, ema_decay=0.99)
    ema._trainer = trainer
    with pytest.raises(ValueError, match=f"model.ema_decay .* deepspeed_stage_{stage}"):
        ema.check_strategy()
    micro = ContrastivePretraining(preset="clip_demo", vocab_size=100, eot_id=99, accumulate_micro_batches=2)
    micro._trainer = SimpleNamespace(strategy=strategy, accumulate_grad_batches=1, gradient_clip_val=None)
    with pytest.raises(ValueError, match="accumulate_micro_batches=2 is not supported under trainer.strategy"):
        micro.setup("fit")
    compiled = SemiCausalLM(preset="metalm_demo", vocab_size=64, bos_id=1, eos_id=2, pad_id=0, compile=True)
    compiled._trainer = trainer
    if stage == 3:
        with pytest.raises(ValueError, match="model.compile is not supported under trainer.strategy deepspeed_stage_3"):
            compiled.check_strategy()
    else:
        compiled.check_strategy()  # compiled blocks are fine under ZeRO-2
