"""Transformers remote code for exported Vision Mamba classifiers.

``mmpretrain export`` copies these two files next to the weights (``auto_map`` in config.json points at
them), so the exported directory loads with ``trust_remote_code=True`` where mmpretrain is not installed.
They import torch and transformers only: keep them that way.
"""

from .configuration_mmpretrain_vim import VimConfig
from .modeling_mmpretrain_vim import VimForImageClassification, VimModel

__all__ = ["VimConfig", "VimForImageClassification", "VimModel"]
