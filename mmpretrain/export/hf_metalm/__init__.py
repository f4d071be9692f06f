"""Transformers remote code for exported METALM semi-causal language models.

``mmpretrain export`` copies these two files next to the weights (``auto_map`` in config.json points at
them), so the exported directory loads with ``trust_remote_code=True`` where mmpretrain is not installed.
They import torch and transformers only: keep them that way.
"""

from .configuration_mmpretrain_metalm import IMAGE_ENCODER_DEFAULTS, MetaLMConfig
from .modeling_mmpretrain_metalm import MetaLMForCausalLM, MetaLMModel

__all__ = ["IMAGE_ENCODER_DEFAULTS", "MetaLMConfig", "MetaLMForCausalLM", "MetaLMModel"]
