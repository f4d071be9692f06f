"""Configuration of Vision Mamba (Vim) classifiers exported by mmpretrain (transformers remote code).

Self-contained: needs torch and transformers only, never mmpretrain.
"""

from __future__ import annotations

from typing import Any

try:  # transformers 5 spells it PreTrainedConfig and keeps the old name as an alias
    from transformers import PreTrainedConfig as _BaseConfig
except ImportError:  # transformers 4
    from transformers import PretrainedConfig as _BaseConfig


class VimConfig(_BaseConfig):
    """Vision Mamba classifier configuration.

    Args:
        image_size: input (height, width) or one int for squares; inputs must have this size.
        patch_size: patch-embedding kernel size.
        stride: patch-embedding stride (smaller than patch_size: overlapping patches).
        num_channels: image channels.
        hidden_size: token width.
        num_hidden_layers: number of blocks.
        mixer: "mamba" (bidirectional Mamba, Vim v2) or "lru" (bidirectional Linear Recurrent Unit).
        d_state: Mamba state size per channel (mixer "mamba"); complex state channels (mixer "lru").
        expand: inner width = expand * hidden_size.
        d_conv: Mamba causal convolution width.
        dt_rank: Mamba dt projection rank.
        mixer_bias: biases on the mixers' input and output projections.
        conv_bias: biases on the Mamba convolutions.
        norm_eps: RMSNorm epsilon.
        residual_in_fp32: keep the residual stream in float32 when the model runs in lower precision.
        global_pool: "token" reads the class token in the middle of the sequence; "avg" averages all tokens.
        scan_chunk_size: chunk length of the plain-PyTorch scans (memory grows with its square).
    """

    model_type = "mmpretrain_vim"

    def __init__(
        self,
        image_size: int | list[int] = 224,
        patch_size: int = 16,
        stride: int = 16,
        num_channels: int = 3,
        hidden_size: int = 192,
        num_hidden_layers: int = 24,
        mixer: str = "mamba",
        d_state: int = 16,
        expand: int = 2,
        d_conv: int = 4,
        dt_rank: int = 12,
        mixer_bias: bool = False,
        conv_bias: bool = True,
        norm_eps: float = 1e-5,
        residual_in_fp32: bool = True,
        global_pool: str = "token",
        scan_chunk_size: int = 16,
        **kwargs: Any,
    ) -> None:
        if mixer not in ("mamba", "lru"):
            raise ValueError(f"VimConfig.mixer must be 'mamba' or 'lru', got {mixer!r}")
        if global_pool not in ("token", "avg"):
            raise ValueError(f"VimConfig.global_pool must be 'token' or 'avg', got {global_pool!r}")
        self.image_size = list(image_size) if isinstance(image_size, (list, tuple)) else [image_size, image_size]
        self.patch_size = patch_size
        self.stride = stride
        self.num_channels = num_channels
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.mixer = mixer
        self.d_state = d_state
        self.expand = expand
        self.d_conv = d_conv
        self.dt_rank = dt_rank
        self.mixer_bias = mixer_bias
        self.conv_bias = conv_bias
        self.norm_eps = norm_eps
        self.residual_in_fp32 = residual_in_fp32
        self.global_pool = global_pool
        self.scan_chunk_size = scan_chunk_size
        super().__init__(**kwargs)
