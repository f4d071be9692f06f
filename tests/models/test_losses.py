"""Contrastive losses: against plain references, in chunks, under accumulation, and over 2 gloo ranks
(equal and unequal numbers of rows per rank, the gloo and the reduce-scatter backward)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import mmpretrain.models.losses as losses
from mmpretrain.models.losses import (
    ClipLoss,
    SigLipLoss,
    clip_loss_from_features,
    gather_with_grad,
    row_divisor,
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


def test_uneven_row_chunks_divided_by_the_mean_share_sum_to_the_full_loss():
    """Ranks of 3 and 5 rows: each divides its rows' sum by N / W = 4, and the two shares average to the
    single-process loss (what the ranks' losses do under DDP)."""
    img, txt = unit(8, 16, 6), unit(8, 16, 7)
    scale, bias = 12.0, -4.0
    sizes = [3, 5]
    assert row_divisor(sizes) == 4.0 and row_divisor([4, 4]) is None and row_divisor([0, 0]) == 0.5
    starts = [0, 3]
    clip_parts = [clip_loss_from_features(img[a:a + n], txt[a:a + n], scale, img, txt, offset=a,
                                          divide_by=4.0) for a, n in zip(starts, sizes)]
    torch.testing.assert_close(torch.stack(clip_parts).mean(), clip_reference(img, txt, scale))
    sig_parts = [siglip_loss_from_features(img[a:a + n], txt[a:a + n], scale, bias, txt, offset=a,
                                           divide_by=4.0) for a, n in zip(starts, sizes)]
    torch.testing.assert_close(torch.stack(sig_parts).mean(), siglip_reference(img, txt, scale, bias))
    # a rank without rows contributes nothing
    empty = img[:0]
    assert clip_loss_from_features(empty, empty, scale, img, txt, offset=8, divide_by=4.0).item() == 0.0
    assert siglip_loss_from_features(empty, empty, scale, bias, txt, offset=8, divide_by=4.0).item() == 0.0


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

WORLD, IN_DIM, DIM = 2, 10, 6
# rows per rank: equal (the usual case), one short (a sample dropped after batching), one rank without any
SHARES = ((4, 4), (3, 2), (3, 0))


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


class CountingGather:
    """Wraps the module's all-gather collective and counts its calls."""

    def __init__(self, gather) -> None:
        self.gather, self.calls = gather, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.gather(*args, **kwargs)


def _emulated_reduce_scatter(out, inp, op, group):
    """NCCL's reduce-scatter on gloo (which has none): sum over ranks, keep this rank's block of rows."""
    total = inp.clone()
    dist.all_reduce(total, op=op, group=group)
    out.copy_(total.chunk(dist.get_world_size(group))[dist.get_rank(group)])


def _check_global_batch(rank: int, shares: tuple[int, int], backward: str) -> None:
    total = sum(shares)
    g = torch.Generator().manual_seed(1)
    x_img = torch.randn(total, IN_DIM, generator=g, dtype=torch.float64)
    x_txt = torch.randn(total, IN_DIM, generator=g, dtype=torch.float64)
    start = sum(shares[:rank])
    local = slice(start, start + shares[rank])
    for loss_fn in (ClipLoss(), SigLipLoss()):
        siglip = isinstance(loss_fn, SigLipLoss)
        ref_loss, ref_img_grad, ref_txt_grad, ref_grads = _single_process(siglip, x_img, x_txt)

        model = Towers(siglip)
        ddp = nn.parallel.DistributedDataParallel(model)
        img, txt = ddp(x_img[local], x_txt[local])
        img.retain_grad()
        txt.retain_grad()
        gathers = losses._all_gather_single = CountingGather(losses._all_gather_single)
        try:
            loss = loss_fn(img, txt, model.logit_scale.exp(), model.logit_bias)
        finally:
            losses._all_gather_single = gathers.gather
        # the counts once, then one gather per tower the loss needs, padded or not
        assert gathers.calls == (2 if siglip else 3), gathers.calls
        loss.backward()  # DDP averages the parameter gradients over the ranks

        name = f"{type(loss_fn).__name__} {shares} {backward}"
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


def _check_gather(rank: int) -> None:
    """gather_with_grad on its own: the rows in rank order, each rank's summed gradient, one collective when
    the sizes are given, and wrong sizes named."""
    shares = (3, 1)
    x = torch.arange(shares[rank] * 2, dtype=torch.float64).view(-1, 2).add(10 * rank).requires_grad_()
    gathers = losses._all_gather_single = CountingGather(losses._all_gather_single)
    try:
        out = gather_with_grad(x, sizes=shares)
    finally:
        losses._all_gather_single = gathers.gather
    assert gathers.calls == 1
    expected = torch.cat([torch.arange(6.0).view(3, 2), torch.arange(2.0).view(1, 2) + 10]).double()
    torch.testing.assert_close(out, expected)
    weights = torch.arange(1.0, 9.0, dtype=torch.float64).view(4, 2) * (rank + 1)  # differs per rank
    (out * weights).sum().backward()
    summed = torch.arange(1.0, 9.0, dtype=torch.float64).view(4, 2) * 3  # (1 + 2) x the shared pattern
    torch.testing.assert_close(x.grad, summed[:3] if rank == 0 else summed[3:])
    try:
        gather_with_grad(x.detach(), sizes=(2, 2))
    except ValueError as err:
        assert "sizes [2, 2]" in str(err) and "gather_row_counts" in str(err), str(err)
    else:
        raise AssertionError("expected a ValueError for sizes that do not match this rank's rows")


def _worker(rank: int, init_file: str) -> None:
    torch.set_num_threads(1)  # two ranks on a 2-core machine: more threads only contend
    with gloo_group(rank, WORLD, init_file):
        _check_gather(rank)
        reduce_scatters, reduce_scatter = losses._reduce_scatters, losses._reduce_scatter_single
        for backward in ("all-reduce", "reduce-scatter"):
            if backward == "reduce-scatter":  # NCCL's backward (padded, scattered, trimmed), emulated on gloo
                losses._reduce_scatters = lambda group: True
                losses._reduce_scatter_single = _emulated_reduce_scatter
            try:
                for shares in SHARES:
                    _check_global_batch(rank, shares, backward)
            finally:
                losses._reduce_scatters, losses._reduce_scatter_single = reduce_scatters, reduce_scatter


def test_two_gloo_ranks_match_the_single_process_global_batch(tmp_path):
    """2 ranks holding 4+4, 3+2 and 3+0 pairs: the mean of their CLIP and SigLIP losses, their features'
    gradients and DDP's parameter gradients equal one process's on all the pairs, with the gloo backward and
    the reduce-scatter (NCCL) one."""
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"),), nprocs=WORLD, join=True)
