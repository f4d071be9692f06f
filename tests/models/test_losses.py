"""Contrastive losses: against plain references, in chunks, under accumulation, and over 2 gloo ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from mmpretrain.models.losses import (
    ClipLoss,
    SigLipLoss,
    clip_loss_from_features,
    siglip_loss_from_features,
)
from tests.distributed import gloo_group


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)


def clip_reference(img, txt, scale):
    logits = scale * img @ txt.T
    labels = torch.arange(len(img))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def siglip_reference(img, txt, scale, bias):
    n = len(img)
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            total = total - F.logsigmoid(z * (scale * img[i] @ txt[j] + bias))
    return total / n


def test_clip_loss_equals_cross_entropy_reference():
    img, txt = unit(8, 16, 0), unit(8, 16, 1)
    scale = torch.tensor(14.3, dtype=torch.float64)
    torch.testing.assert_close(ClipLoss()(img, txt, scale), clip_reference(img, txt, scale))
    torch.testing.assert_close(clip_loss_from_features(img, txt, scale), clip_reference(img, txt, scale))


def test_siglip_loss_equals_reference():
    img, txt = unit(6, 16, 2), unit(6, 16, 3)
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    torch.testing.assert_close(SigLipLoss()(img, txt, scale, bias), siglip_reference(img, txt, scale, bias))


def test_row_chunks_with_offsets_average_to_the_full_loss():
    img, txt = unit(8, 16, 4), unit(8, 16, 5)
    scale, bias = 10.0, -5.0
    clip_parts = [clip_loss_from_features(img[i:i + 2], txt[i:i + 2], scale, img, txt, offset=i) for i in range(0, 8, 2)]
    torch.testing.assert_close(torch.stack(clip_parts).mean(), clip_reference(img, txt, scale))
    sig_parts = [siglip_loss_from_features(img[i:i + 2], txt[i:i + 2], scale, bias, txt, offset=i) for i in range(0, 8, 2)]
    torch.testing.assert_close(torch.stack(sig_parts).mean(), siglip_loss_from_features(img, txt, scale, bias))


def test_exact_gradient_accumulation_with_the_function_form():
    torch.manual_seed(0)
    encoder = nn.Linear(12, 8).double()
    x_img, x_txt = torch.randn(8, 12, dtype=torch.float64), torch.randn(8, 12, dtype=torch.float64)

    def features(x):
        return F.normalize(encoder(x), dim=-1)

    clip_loss_from_features(features(x_img), features(x_txt), 20.0).backward()
    full = encoder.weight.grad.clone()
    encoder.zero_grad()
    with torch.no_grad():
        cached_img, cached_txt = features(x_img), features(x_txt)
    for lo in range(0, 8, 4):  # two micro-batches of 4
        img, txt = cached_img.clone(), cached_txt.clone()
        img[lo:lo + 4], txt[lo:lo + 4] = features(x_img[lo:lo + 4]), features(x_txt[lo:lo + 4])
        clip_loss_from_features(img, txt, 20.0).backward()
    torch.testing.assert_close(encoder.weight.grad, full)


def test_mismatched_rows_name_the_problem():
    img, txt = unit(4, 8, 0), unit(4, 8, 1)
    try:
        clip_loss_from_features(img, txt[:3], 1.0)
    except ValueError as err:
        assert "rows" in str(err)
    else:
        raise AssertionError("expected a ValueError")


# ------------------------------------------------------------------------------ two gloo ranks

WORLD, BATCH, IN_DIM, DIM = 2, 8, 10, 6


class Towers(nn.Module):
    """Two linear 'towers' and the learnable scale/bias: enough to check gradients end to end."""

    def __init__(self, siglip: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.img = nn.Linear(IN_DIM, DIM).double()
        self.txt = nn.Linear(IN_DIM, DIM).double()
        self.logit_scale = nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
        # no unused parameter: DDP would wait for its gradient
        self.logit_bias = nn.Parameter(torch.tensor(-3.0, dtype=torch.float64)) if siglip else None

    def forward(self, x_img, x_txt):
        return F.normalize(self.img(x_img), dim=-1), F.normalize(self.txt(x_txt), dim=-1)


def _single_process(siglip: bool, x_img, x_txt):
    """The reference: one process, the whole batch, the plain function forms."""
    model = Towers(siglip)
    img, txt = model(x_img, x_txt)
    img.retain_grad()
    txt.retain_grad()
    if siglip:
        loss = siglip_loss_from_features(img, txt, model.logit_scale.exp(), model.logit_bias)
    else:
        loss = clip_loss_from_features(img, txt, model.logit_scale.exp())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), img.grad, txt.grad, grads


def _worker(rank: int, init_file: str) -> None:
    with gloo_group(rank, WORLD, init_file):
        g = torch.Generator().manual_seed(1)
        x_img = torch.randn(BATCH, IN_DIM, generator=g, dtype=torch.float64)
        x_txt = torch.randn(BATCH, IN_DIM, generator=g, dtype=torch.float64)
        local = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        for loss_fn in (ClipLoss(), SigLipLoss()):
            siglip = isinstance(loss_fn, SigLipLoss)
            ref_loss, ref_img_grad, ref_txt_grad, ref_grads = _single_process(siglip, x_img, x_txt)

            model = Towers(siglip)
            ddp = nn.parallel.DistributedDataParallel(model)
            img, txt = ddp(x_img[local], x_txt[local])
            img.retain_grad()
            txt.retain_grad()
            loss = loss_fn(img, txt, model.logit_scale.exp(), model.logit_bias)
            loss.backward()  # DDP averages the parameter gradients over the ranks

            name = type(loss_fn).__name__
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            torch.testing.assert_close(mean_loss / WORLD, ref_loss, msg=f"{name}: mean of the ranks' losses")
            # averaged like DDP, the features' gradients are the global-batch gradients
            torch.testing.assert_close(img.grad / WORLD, ref_img_grad[local], msg=f"{name}: image feature grads")
            torch.testing.assert_close(txt.grad / WORLD, ref_txt_grad[local], msg=f"{name}: text feature grads")
            grads = {pname: p.grad for pname, p in model.named_parameters()}
            assert grads.keys() == ref_grads.keys()
            for pname, grad in grads.items():
                torch.testing.assert_close(grad, ref_grads[pname], msg=f"{name}: DDP grad of {pname}")


def test_two_gloo_ranks_match_the_single_process_global_batch(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"),), nprocs=WORLD, join=True)
