from mmpretrain.models import vim as vim  # noqa: F401  (registers vim_tiny, vim_small, ... with timm)
