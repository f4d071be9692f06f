"""Every recipe is a contract: it parses against the code's signatures and builds its model and data module.

Recipes for real data point at shards that do not exist here; their data paths are swapped for the demo
set of the same kind, which is all that differs from a user's run.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import yaml

from mmpretrain.cli import MMPretrainCLI
from mmpretrain.data.shards import ShardError, expand_pattern

RECIPES = sorted(Path(__file__).resolve().parents[2].glob("recipes/**/*.yaml"))

# stand-in data for each data module, used when a recipe's own shards are not on this machine
DEMO_DATA = {
    "mmpretrain.data.classification.ImageLabelDataModule": {"train_shards": "demo:images/train",
                                                            "val_shards": "demo:images/val"},
    "mmpretrain.data.image_text.ImageTextDataModule": {"train_shards": "demo:images/train",
                                                       "val_shards": "demo:images/val", "tokenizer": "demo"},
    "mmpretrain.data.text.TextDataModule": {"train_shards": "demo:text/train", "val_shards": "demo:text/val",
                                            "tokenizer": "demo"},
}


def data_overrides(recipe: Path) -> list[str]:
    data = yaml.safe_load(recipe.read_text()).get("data") or {}
    init = data.get("init_args") or {}
    missing = False
    for key in ("train_shards", "val_shards"):
        spec = init.get(key)
        for pattern in [spec] if isinstance(spec, str) else spec or []:
            try:
                expand_pattern(pattern)
            except ShardError:
                missing = True
    tokenizer = init.get("tokenizer")
    if tokenizer not in (None, "demo") and not Path(tokenizer).exists():
        missing = True
    if not missing:
        return []
    stand_in = DEMO_DATA[data["class_path"]]
    return [arg for key, value in stand_in.items() for arg in (f"--data.init_args.{key}", value)]


def test_there_are_recipes():
    assert any(p.name == "demo.yaml" for p in RECIPES)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_recipe_instantiates(recipe: Path, tmp_path: Path):
    args = ["--config", str(recipe), *data_overrides(recipe),
            "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false"]
    strategy = (yaml.safe_load(recipe.read_text()).get("trainer") or {}).get("strategy")
    if "deepspeed" in str(strategy).lower() and importlib.util.find_spec("deepspeed") is None:
        # a DeepSpeed recipe without the optional extra: refused before anything is built, saying what to install
        with pytest.raises((ValueError, SystemExit, RuntimeError, ImportError)) as err:
            MMPretrainCLI(args=args, run=False)
        assert "mmpretrain[deepspeed]" in str(err.value) and "trainer.strategy" in str(err.value), str(err.value)
        return
    cli = MMPretrainCLI(args=args, run=False)
    model, data = cli.model, cli.datamodule
    # what the data knows reached the model through the links
    for name in ("num_classes", "class_names", "vocab_size"):
        if hasattr(model, name) and hasattr(type(data), name):
            assert getattr(model, name) == getattr(data, name), name
    with torch.device("meta"):  # the real architecture, without spending memory on it
        module = model.build_model()
    assert sum(p.numel() for p in module.parameters()) > 0
    assert data.batch_size > 0
