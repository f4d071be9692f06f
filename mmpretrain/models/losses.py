"""Contrastive image-text losses over the global batch: CLIP's symmetric InfoNCE and SigLIP's sigmoid loss.

Distributed convention
----------------------
With ``W`` ranks holding ``B_0 .. B_{W-1}`` pairs (global batch ``N = sum B_r``), every rank gathers the
features of all ranks *with gradient* and computes only its own rows against all ``N`` columns, so the cost
per rank is linear in ``W`` (``B_r x N`` logits, not ``N x N``). Pair ``i`` of rank ``r`` is global pair
``B_0 + ... + B_{r-1} + i``. Ranks usually hold the same number of pairs, but need not: with
``data.decode_device: cuda`` a sample that the GPU decoder rejects is dropped after batching, so one rank's
batch can be short.

Each rank returns the sum of its own rows' losses divided by ``N / W`` (for equal batches that is the
**mean over its own rows**; for SigLIP the sum over its rows and all columns divided by ``N / W``). Write
``L`` for the single-process loss on the global batch; then

* the mean of the ranks' losses is ``L`` (what Lightning logs with ``sync_dist=True``);
* the gradient reaching a rank's local features sums the contributions of every rank's loss (the
  gather's backward is a sum-reduce-scatter), so it is ``W * dL/d(local features)``;
* DDP *averages* parameter gradients over ranks, dividing by ``W``, which gives exactly ``dL/dθ``.

So training with these losses under DDP is training on the global-batch loss ``L`` -- the gradients equal the
single-process gradients on all ``N`` pairs, whatever the number of pairs on each rank. The rank counts cost
one small all-gather per step (:func:`gather_row_counts`); given them, each feature gather is a single
``all_gather_into_tensor`` when the counts are equal, and a padded one (trimmed afterwards) when they are not.
Without an initialised process group (or with one rank) the losses are the plain losses of the local batch.

Exact gradient accumulation (a global batch bigger than memory) uses the function forms: compute every
micro-batch's features without gradient, then for each micro-batch recompute its features with gradient,
put them in place of its cached rows and call ``clip_loss_from_features(all_img, all_txt, scale)`` (or the
SigLIP one) on the full set; the gradients summed over micro-batches are those of the full batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ClipLoss",
    "SigLipLoss",
    "clip_loss_from_features",
    "gather_row_counts",
    "gather_with_grad",
    "row_divisor",
    "siglip_loss_from_features",
]


# torch 2.14 renamed these collectives (the old names warn); keep both for the supported range
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _world(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """(rank, world size) of ``group``, or (0, 1) when torch.distributed is not in use."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def _reduce_scatters(group: dist.ProcessGroup | None) -> bool:
    """Whether the group's backend has a reduce-scatter (NCCL does; gloo does not)."""
    return dist.get_backend(group) == dist.Backend.NCCL


def gather_row_counts(rows: int, group: dist.ProcessGroup | None = None,
                      device: torch.device | str | None = None) -> list[int]:
    """Every rank's number of rows, in rank order: one all-gather of a one-element integer tensor.

    Args:
        rows: this rank's number of rows.
        group: process group (default: the world).
        device: where the count tensor lives: the features' device (NCCL needs the rank's GPU).

    Collective: every rank of ``group`` must call it. ``[rows]`` without a process group.
    """
    _, world = _world(group)
    if world == 1:
        return [int(rows)]
    count = torch.tensor([int(rows)], dtype=torch.int64, device=device)
    counts = count.new_empty(world)
    _all_gather_single(counts, count, group=group)
    return [int(c) for c in counts.tolist()]


def row_divisor(sizes: Sequence[int]) -> float | None:
    """What a rank divides the sum of its rows' losses by, given every rank's row count: ``N / W``.

    Then the ranks' losses average to the global-batch mean and DDP's averaged gradients are the global-batch
    gradients (see the module docstring). ``None`` (take the mean over the rank's own rows, which is the same)
    when every rank holds the same, non-zero number of rows. A step without any rows divides by ``1 / W``: its
    loss is 0 (not the nan of a mean over nothing).
    """
    if min(sizes) == max(sizes) > 0:
        return None
    return max(sum(sizes), 1) / len(sizes)


def _kept_rows(sizes: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Indices of the real rows in a gather padded to ``max(sizes)`` rows per rank."""
    most = max(sizes)
    return torch.cat([torch.arange(r * most, r * most + s) for r, s in enumerate(sizes)]).to(device)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 of ``sizes[r]`` rows from rank ``r``; backward sums every rank's gradient for
    this rank's rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup | None,
                sizes: tuple[int, ...]) -> torch.Tensor:
        ctx.group, ctx.sizes = group, sizes
        world, most, rest = len(sizes), max(sizes), x.shape[1:]
        if most == 0:  # no rank has a row: nothing to exchange (every rank knows it)
            return x.new_empty((0, *rest))
        x = x.contiguous()
        if min(sizes) == most:  # equal shares: one gather straight into the result
            out = x.new_empty((world * most, *rest))
            _all_gather_single(out, x, group=group)
            return out
        padded = x.new_zeros((most, *rest))
        padded[: x.shape[0]] = x
        out = x.new_empty((world * most, *rest))
        _all_gather_single(out, padded, group=group)
        return out.index_select(0, _kept_rows(sizes, x.device))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        group, sizes = ctx.group, ctx.sizes
        rank = dist.get_rank(group)
        world, most, rest = len(sizes), max(sizes), grad.shape[1:]
        if most == 0:
            return grad.new_zeros((0, *rest)), None, None
        grad = grad.contiguous()
        if _reduce_scatters(group):
            if min(sizes) != most:  # back to the padded layout of the forward gather, zeros in the padding
                padded = grad.new_zeros((world * most, *rest))
                padded.index_copy_(0, _kept_rows(sizes, grad.device), grad)
                grad = padded
            local = grad.new_empty((most, *rest))
            _reduce_scatter_single(local, grad, op=dist.ReduceOp.SUM, group=group)
            return local[: sizes[rank]].contiguous(), None, None
        # not every backend (gloo) reduce-scatters: all-reduce the whole gradient and keep this rank's rows
        total = grad.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        start = sum(sizes[:rank])
        return total[start:start + sizes[rank]].contiguous(), None, None


def gather_with_grad(x: torch.Tensor, group: dist.ProcessGroup | None = None,
                     sizes: Sequence[int] | None = None) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0 (rank order), differentiably; ``x`` itself on one rank.

    Args:
        x: this rank's rows ``(B_r, ...)``; ranks may hold different numbers of rows (none included), the
            other dimensions must agree.
        group: process group (default: the world).
        sizes: every rank's number of rows, from :func:`gather_row_counts`. Give them when gathering several
            tensors of the same step (features of both towers, micro-batches): each gather is then one
            collective. ``None``: gathered here first (one more small collective).

    The backward pass gives this rank the sum over all ranks of the gradient of its own rows. Collective in
    both passes: every rank of ``group`` must call it and backpropagate through the result.
    """
    rank, world = _world(group)
    if world == 1:
        return x
    if sizes is None:
        sizes = gather_row_counts(x.shape[0], group, x.device)
    sizes = tuple(int(s) for s in sizes)
    if len(sizes) != world or sizes[rank] != x.shape[0] or min(sizes) < 0:
        raise ValueError(f"gather_with_grad: sizes {list(sizes)} must give the rows of each of the {world} "
                         f"ranks (this rank, {rank}, holds {x.shape[0]}): pass gather_row_counts(rows) of "
                         f"this step")
    return _GatherWithGrad.apply(x, group, sizes)


def clip_loss_from_features(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    all_image_features: torch.Tensor | None = None,
    all_text_features: torch.Tensor | None = None,
    offset: int = 0,
    divide_by: float | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE of some rows of a batch against all of its columns, mean over the rows.

    Args:
        image_features, text_features: ``(B, D)`` unit features of the pairs ``offset .. offset+B-1``.
        logit_scale: the multiplier of the cosine similarities (``exp`` of the learnable log scale).
        all_image_features, all_text_features: ``(N, D)`` features of the whole batch (the columns);
            default: the rows themselves (then ``offset`` must be 0).
        offset: index of the first row's pair in the whole batch.
        divide_by: divide the sum over the rows by this instead of ``B`` (a rank's share of a global batch
            whose ranks hold different numbers of rows: :func:`row_divisor`). ``None``: the mean.

    Returns ``(CE(image rows -> texts) + CE(text rows -> images)) / 2``, each cross-entropy averaged over the
    ``B`` rows (or summed and divided by ``divide_by``).
    """
    all_image = image_features if all_image_features is None else all_image_features
    all_text = text_features if all_text_features is None else all_text_features
    rows = image_features.shape[0]
    if text_features.shape[0] != rows or offset < 0 or offset + rows > min(all_image.shape[0], all_text.shape[0]):
        raise ValueError(
            f"clip loss: {rows} image rows and {text_features.shape[0]} text rows at offset {offset} do not fit "
            f"{all_image.shape[0]} image and {all_text.shape[0]} text columns"
        )
    labels = torch.arange(offset, offset + rows, device=image_features.device)
    logits_per_image = logit_scale * image_features @ all_text.T
    logits_per_text = logit_scale * text_features @ all_image.T
    if divide_by is None:
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
    total = F.cross_entropy(logits_per_image, labels, reduction="sum") + F.cross_entropy(
        logits_per_text, labels, reduction="sum")
    return total / (2 * divide_by)


def siglip_loss_from_features(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    all_text_features: torch.Tensor | None = None,
    offset: int = 0,
    divide_by: float | None = None,
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss of some image rows against all texts, summed and divided by the rows.

    Args:
        image_features: ``(B, D)`` unit image features of the pairs ``offset .. offset+B-1``.
        text_features: ``(B, D)`` unit text features of the same pairs (the columns when
            ``all_text_features`` is not given).
        logit_scale, logit_bias: ``logits = logit_scale * cos + logit_bias``.
        all_text_features: ``(N, D)`` text features of the whole batch (the columns).
        offset: index of the first row's pair in the whole batch.
        divide_by: divide the sum by this instead of ``B`` (see :func:`row_divisor`). ``None``: ``B``.

    Returns ``-sum(log sigmoid(z * logits)) / B`` with ``z = +1`` for matching pairs and ``-1`` otherwise.
    """
    all_text = text_features if all_text_features is None else all_text_features
    rows = image_features.shape[0]
    if text_features.shape[0] != rows or offset < 0 or offset + rows > all_text.shape[0]:
        raise ValueError(
            f"siglip loss: {rows} image rows and {text_features.shape[0]} text rows at offset {offset} do not "
            f"fit {all_text.shape[0]} text columns"
        )
    logits = logit_scale * image_features @ all_text.T + logit_bias
    signs = torch.full_like(logits, -1.0)
    idx = torch.arange(rows, device=logits.device)
    signs[idx, idx + offset] = 1.0
    return -F.logsigmoid(signs * logits).sum() / (rows if divide_by is None else divide_by)


class ClipLoss(nn.Module):
    """CLIP's symmetric InfoNCE over the global batch (see the module docstring for the DDP convention).

    Args:
        group: process group to gather over (default: the world).
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.group = group

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        sizes: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Unit features ``(B_r, D)`` of this rank's pairs -> this rank's share of the global loss.

        ``sizes``: every rank's number of pairs when the caller already has them (:func:`gather_row_counts`);
        ``None``: gathered here (one small collective). Ranks may hold different numbers of pairs.
        """
        if logit_bias is not None:
            raise ValueError("ClipLoss got a logit bias: a SigLIP model (siglip: true) needs SigLipLoss")
        rank, world = _world(self.group)
        if world == 1:
            return clip_loss_from_features(image_features, text_features, logit_scale)
        if sizes is None:
            sizes = gather_row_counts(image_features.shape[0], self.group, image_features.device)
        return clip_loss_from_features(
            image_features, text_features, logit_scale,
            all_image_features=gather_with_grad(image_features, self.group, sizes),
            all_text_features=gather_with_grad(text_features, self.group, sizes),
            offset=sum(sizes[:rank]),
            divide_by=row_divisor(sizes),
        )


class SigLipLoss(nn.Module):
    """SigLIP's sigmoid loss over the global batch: local images against all ranks' texts.

    Args:
        group: process group to gather over (default: the world).
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.group = group

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None,
        sizes: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Unit features ``(B_r, D)`` of this rank's pairs -> this rank's share of the global loss.

        ``sizes``: every rank's number of pairs when the caller already has them (:func:`gather_row_counts`);
        ``None``: gathered here (one small collective). Ranks may hold different numbers of pairs.
        """
        if logit_bias is None:
            raise ValueError("SigLipLoss needs a logit bias: build the model with siglip: true")
        rank, world = _world(self.group)
        if world == 1:
            return siglip_loss_from_features(image_features, text_features, logit_scale, logit_bias)
        if sizes is None:
            sizes = gather_row_counts(image_features.shape[0], self.group, image_features.device)
        return siglip_loss_from_features(
            image_features, text_features, logit_scale, logit_bias,
            all_text_features=gather_with_grad(text_features, self.group, sizes),
            offset=sum(sizes[:rank]),
            divide_by=row_divisor(sizes),
        )
