"""Reading training checkpoints safely, and pulling one part's weights out of them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message says why and what to do."""


def read_checkpoint(path: str | Path, what: str = "--checkpoint") -> dict[str, Any]:
    """Load a Lightning checkpoint with ``weights_only=True`` (no pickled code runs); ``what`` names the field."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{what} {path}: not a readable checkpoint ({type(err).__name__}: {err})") from None


def sub_state_dict(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under ``prefix`` (``"model.visual.trunk."``) with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
