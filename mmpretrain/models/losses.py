"""Contrastive image-text losses over the global batch: CLIP's symmetric InfoNCE and SigLIP's sigmoid loss.

Distributed convention
----------------------
With ``W`` ranks of ``B`` pairs each (global batch ``N = W B``), every rank gathers the features of all ranks
*with gradient* and computes only its own ``B`` rows against all ``N`` columns, so the cost per rank is
linear in ``W`` (``B x N`` logits, not ``N x N``). Pair ``i`` of rank ``r`` is global pair ``r B + i``.

Each rank returns the **mean over its own rows** (for SigLIP: the sum over its rows and all columns divided
by ``B``). Write ``L`` for the single-process loss on the global batch; then

* the mean of the ranks' losses is ``L`` (what Lightning logs with ``sync_dist=True``);
* the gradient reaching a rank's local features sums the contributions of every rank's loss (the
  gather's backward is a sum-reduce-scatter), so it is ``W * dL/d(local features)``;
* DDP *averages* parameter gradients over ranks, dividing by ``W``, which gives exactly ``dL/dθ``.

So training with these losses under DDP is training on the global-batch loss ``L`` -- the gradients equal the
single-process gradients on all ``N`` pairs. Every rank must hold the same number of pairs (the data
modules yield equal batches on every rank). Without an initialised process group (or with one rank) the
losses are the plain losses of the local batch.

Exact gradient accumulation (a global batch bigger than memory) uses the function forms: compute every
micro-batch's features without gradient, then for each micro-batch recompute its features with gradient,
put them in place of its cached rows and call ``clip_loss_from_features(all_img, all_txt, scale)`` (or the
SigLIP one) on the full set; the gradients summed over micro-batches are those of the full batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ClipLoss",
    "SigLipLoss",
    "clip_loss_from_features",
    "gather_with_grad",
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


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; backward sums every rank's gradient for this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        world = dist.get_world_size(group)
        x = x.contiguous()
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        _all_gather_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        group = ctx.group
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        grad = grad.contiguous()
        if dist.get_backend(group) == dist.Backend.NCCL:
            local = grad.new_empty((grad.shape[0] // world, *grad.shape[1:]))
            _reduce_scatter_single(local, grad, op=dist.ReduceOp.SUM, group=group)
            return local, None
        # not every backend (gloo) reduce-scatters: all-reduce the whole gradient and keep this rank's slice
        total = grad.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total.chunk(world)[rank].contiguous(), None


def gather_with_grad(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0 (rank order), differentiably; ``x`` itself on one rank."""
    _, world = _world(group)
    if world == 1:
        return x
    return _GatherWithGrad.apply(x, group)


def clip_loss_from_features(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    all_image_features: torch.Tensor | None = None,
    all_text_features: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """Symmetric InfoNCE of some rows of a batch against all of its columns, mean over the rows.

    Args:
        image_features, text_features: ``(B, D)`` unit features of the pairs ``offset .. offset+B-1``.
        logit_scale: the multiplier of the cosine similarities (``exp`` of the learnable log scale).
        all_image_features, all_text_features: ``(N, D)`` features of the whole batch (the columns);
            default: the rows themselves (then ``offset`` must be 0).
        offset: index of the first row's pair in the whole batch.

    Returns ``(CE(image rows -> texts) + CE(text rows -> images)) / 2``, each cross-entropy averaged over the
    ``B`` rows.
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
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def siglip_loss_from_features(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    all_text_features: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss of some image rows against all texts, summed and divided by the rows.

    Args:
        image_features: ``(B, D)`` unit image features of the pairs ``offset .. offset+B-1``.
        text_features: ``(B, D)`` unit text features of the same pairs (the columns when
            ``all_text_features`` is not given).
        logit_scale, logit_bias: ``logits = logit_scale * cos + logit_bias``.
        all_text_features: ``(N, D)`` text features of the whole batch (the columns).
        offset: index of the first row's pair in the whole batch.

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
    return -F.logsigmoid(signs * logits).sum() / rows


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
    ) -> torch.Tensor:
        """Unit features ``(B, D)`` of this rank's pairs -> this rank's share of the global loss."""
        if logit_bias is not None:
            raise ValueError("ClipLoss got a logit bias: a SigLIP model (siglip: true) needs SigLipLoss")
        rank, world = _world(self.group)
        if world == 1:
            return clip_loss_from_features(image_features, text_features, logit_scale)
        return clip_loss_from_features(
            image_features, text_features, logit_scale,
            all_image_features=gather_with_grad(image_features, self.group),
            all_text_features=gather_with_grad(text_features, self.group),
            offset=rank * image_features.shape[0],
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
    ) -> torch.Tensor:
        """Unit features ``(B, D)`` of this rank's pairs -> this rank's share of the global loss."""
        if logit_bias is None:
            raise ValueError("SigLipLoss needs a logit bias: build the model with siglip: true")
        rank, world = _world(self.group)
        if world == 1:
            return siglip_loss_from_features(image_features, text_features, logit_scale, logit_bias)
        return siglip_loss_from_features(
            image_features, text_features, logit_scale, logit_bias,
            all_text_features=gather_with_grad(text_features, self.group),
            offset=rank * image_features.shape[0],
        )
