"""Under a DeepSpeed strategy that offloads the optimizer to the CPU, the task hands DeepSpeed its CPU Adam with the
configured settings (DeepSpeed refuses a PyTorch optimizer there); runs on CPU where deepspeed is installed."""

from __future__ import annotations

import pytest
import torch

deepspeed = pytest.importorskip("deepspeed")
from lightning.pytorch.strategies import DeepSpeedStrategy  # noqa: E402

from mmpretrain.tasks.base import cpu_optimizer_for_offload  # noqa: E402


def groups(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    decay = torch.nn.Parameter(torch.randn(5, 3, generator=g))
    no_decay = torch.nn.Parameter(torch.randn(3, generator=g))
    return [{"params": [decay]}, {"params": [no_decay], "weight_decay": 0.0}]


@pytest.mark.parametrize("kind", [torch.optim.AdamW, torch.optim.Adam])
def test_offload_takes_deepspeeds_cpu_adam_with_the_same_steps(kind):
    strategy = DeepSpeedStrategy(stage=2, offload_optimizer=True)
    ours, theirs = groups(), groups()
    torch_opt = kind(theirs, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt = cpu_optimizer_for_offload(kind(ours, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1), strategy)
    assert type(opt).__name__ == "DeepSpeedCPUAdam"
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    g = torch.Generator().manual_seed(1)
    for _ in range(3):  # the same gradients into both: the same parameters after each step
        for a, b in zip(ours, theirs):
            grad = torch.randn(a["params"][0].shape, generator=g)
            a["params"][0].grad, b["params"][0].grad = grad.clone(), grad.clone()
        opt.step()
        torch_opt.step()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a["params"][0], b["params"][0], rtol=1e-5, atol=1e-6)


def test_without_offload_the_optimizer_is_kept():
    opt = torch.optim.AdamW(groups(), lr=1e-3)
    assert cpu_optimizer_for_offload(opt, DeepSpeedStrategy(stage=2)) is opt
    config = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
              "zero_force_ds_cpu_optimizer": False}
    assert cpu_optimizer_for_offload(opt, DeepSpeedStrategy(config=config)) is opt


def test_offload_with_another_optimizer_names_the_setting():
    opt = torch.optim.SGD(groups(), lr=1e-3)
    with pytest.raises(ValueError, match=r"deepspeed_stage_3_offload .*model.optimizer is torch.optim.sgd.SGD"):
        cpu_optimizer_for_offload(opt, DeepSpeedStrategy(stage=3, offload_optimizer=True, offload_parameters=True))
