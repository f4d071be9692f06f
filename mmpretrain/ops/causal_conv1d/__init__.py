"""Depthwise causal 1-d convolution with an optional SiLU, as Mamba's blocks use it (the ``causal_conv1d``
package's semantics): a plain PyTorch reference and fused Triton kernels for CUDA, chosen by ``backend``."""

from __future__ import annotations

import torch

from .._runtime import interpreter_active, triton_available
from .reference import causal_conv1d_reference

BACKENDS = ("auto", "reference", "triton")


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  activation: str | None = "silu", reverse: bool = False, backend: str = "auto") -> torch.Tensor:
    """out[:, d, t] = act(bias[d] + sum_k weight[d, k] * x[:, d, t - (K-1) + k]) (zeros before the start).

    Args:
        x: (batch, dim, L), any strides (channels-contiguous is the fast layout for the triton backend).
        weight: (dim, K), or a depthwise ``nn.Conv1d`` weight (dim, 1, K).
        bias: (dim,) or None.
        activation: "silu" or None.
        reverse: anti-causal: out_t sees x_t .. x_{t+K-1} (the causal convolution of the flipped sequence,
            flipped back), computed without flips by the triton backend.
        backend: "reference" (``F.conv1d``), "triton" (CUDA, or Triton's interpreter) or "auto" (triton on
            CUDA when triton is importable, else reference).
    """
    if backend not in BACKENDS:
        raise ValueError(f"causal_conv1d: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if weight.dim() == 3:
        weight = weight.squeeze(1)
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"causal_conv1d: x must be (batch, dim, L) and weight (dim, K); got {tuple(x.shape)} "
                         f"and {tuple(weight.shape)}")
    if backend == "auto":
        backend = "triton" if x.is_cuda and triton_available() else "reference"
    if backend == "triton" and (x.is_cuda or interpreter_active()):
        from .triton_kernels import causal_conv1d_triton

        return causal_conv1d_triton(x, weight, bias, activation, reverse)
    if backend == "triton":
        raise RuntimeError(f"causal_conv1d backend 'triton' needs CUDA tensors (got {x.device}); use 'reference'")
    return causal_conv1d_reference(x, weight, bias, activation, reverse)


__all__ = ["causal_conv1d", "causal_conv1d_reference"]
