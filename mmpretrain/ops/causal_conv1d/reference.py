"""The depthwise causal convolution in plain PyTorch: ``F.conv1d`` with left padding, any device and dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                            activation: str | None = "silu", reverse: bool = False) -> torch.Tensor:
    """out[:, d, t] = act(bias[d] + sum_k weight[d, k] * x[:, d, t - (K-1) + k]), zeros before the start.

    ``reverse``: anti-causal, out[:, d, t] sees x[:, d, t .. t+K-1] (the causal convolution of the flipped
    sequence, flipped back). x (batch, dim, L) with any strides; weight (dim, K); bias (dim,) or None.
    """
    K = weight.shape[-1]
    if reverse:
        x = x.flip(-1)
    out = F.conv1d(F.pad(x, (K - 1, 0)), weight.unsqueeze(1).to(x.dtype),
                   bias.to(x.dtype) if bias is not None else None, groups=x.shape[1])
    if activation == "silu":
        out = F.silu(out)
    elif activation is not None:
        raise ValueError(f"causal_conv1d: activation must be 'silu' or None, got {activation!r}")
    return out.flip(-1) if reverse else out
