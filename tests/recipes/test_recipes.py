"""Every recipe is a contract: it parses against the code's signatures and builds its model and data module."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmpretrain.cli import MMPretrainCLI

RECIPES = sorted(Path(__file__).resolve().parents[2].glob("recipes/**/*.yaml"))


def test_there_are_recipes():
    assert any(p.name == "demo.yaml" for p in RECIPES)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_recipe_instantiates(recipe: Path, tmp_path: Path):
    cli = MMPretrainCLI(
        args=["--config", str(recipe), "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false"],
        run=False,
    )
    model, data = cli.model, cli.datamodule
    # what the data knows reached the model through the links
    for name in ("num_classes", "class_names", "vocab_size"):
        if hasattr(model, name) and hasattr(type(data), name):
            assert getattr(model, name) == getattr(data, name), name
    with torch.device("meta"):  # build the real architecture without spending memory on it
        module = model.build_model()
    assert sum(p.numel() for p in module.parameters()) > 0
    assert data.batch_size > 0
