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
    weight = _checked_weight(x, weight)
    if _use_triton(x, backend):
        from .triton_kernels import causal_conv1d_triton

        return causal_conv1d_triton(x, weight, bias, activation, reverse)
    return causal_conv1d_reference(x, weight, bias, activation, reverse)


def causal_conv1d_bidirectional(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                weight_b: torch.Tensor, bias_b: torch.Tensor | None,
                                activation: str | None = "silu", backend: str = "auto"
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Both directions of a bidirectional Mamba block's convolution over one x: ``(causal_conv1d(x, weight, bias),
    causal_conv1d(x, weight_b, bias_b, reverse=True))`` with the same activation. The triton backend computes them
    in one kernel each way: x is read once for both, and the backward writes one dx, the sum of both directions'
    (with both biases or neither; otherwise it runs the two convolutions apart)."""
    weight, weight_b = _checked_weight(x, weight), _checked_weight(x, weight_b)
    if _use_triton(x, backend) and (bias is None) == (bias_b is None):
        from .triton_kernels import causal_conv1d_bidirectional_triton

        return causal_conv1d_bidirectional_triton(x, weight, bias, weight_b, bias_b, activation)
    return (causal_conv1d(x, weight, bias, activation, False, backend),
            causal_conv1d(x, weight_b, bias_b, activation, True, backend))


def _checked_weight(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """weight as (dim, K) (a depthwise ``nn.Conv1d``'s (dim, 1, K) squeezed), checked against x's shape."""
    if weight.dim() == 3:
        weight = weight.squeeze(1)
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"causal_conv1d: x must be (batch, dim, L) and weight (dim, K); got {tuple(x.shape)} "
                         f"and {tuple(weight.shape)}")
    return weight


def _use_triton(x: torch.Tensor, backend: str) -> bool:
    """Whether ``backend`` runs the triton kernels for x (an error if it names triton and cannot)."""
    if backend not in BACKENDS:
        raise ValueError(f"causal_conv1d: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return x.is_cuda and triton_available()
    if backend == "triton" and not (x.is_cuda or interpreter_active()):
        raise RuntimeError(f"causal_conv1d backend 'triton' needs CUDA tensors (got {x.device}); use 'reference'")
    return backend == "triton"


__all__ = ["causal_conv1d", "causal_conv1d_bidirectional", "causal_conv1d_reference"]
