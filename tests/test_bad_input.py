"""Bad input fails before training starts, with a message that names the field and the fix."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from mmpretrain.checkpoints import AtomicCheckpointIO, CheckpointError
from mmpretrain.cli import MMPretrainCLI
from mmpretrain.data.classification import ImageLabelDataModule
from mmpretrain.data.shards import ShardError
from mmpretrain.tasks.base import Task
from mmpretrain.tasks.classification import ImageClassification

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "recipes/classification/demo.yaml")


def cli_error(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        MMPretrainCLI(args=["--config", DEMO, *args], run=False)
    assert exit_.value.code != 0
    return capsys.readouterr().err


def test_an_unknown_config_key_is_named(capsys):
    err = cli_error(capsys, "--model.init_args.labelsmoothing", "0.1")
    assert "Option 'labelsmoothing' is not accepted" in err


def test_an_unknown_key_in_a_config_file_is_named(tmp_path, capsys):
    extra = tmp_path / "extra.yaml"
    extra.write_text("data:\n  init_args:\n    batchsize: 8\n")
    err = cli_error(capsys, "--config", str(extra))
    assert 'Parser key "data"' in err and "batchsize" in err


def test_a_value_of_the_wrong_type_is_named(capsys):
    err = cli_error(capsys, "--data.init_args.batch_size", "many")
    assert "batch_size" in err and "many" in err
    err = cli_error(capsys, "--trainer.max_steps", "1.5")
    assert "max_steps" in err


def test_a_shard_pattern_matching_nothing_names_the_field_and_the_pattern(tmp_path):
    pattern = str(tmp_path / "shards/train-{000000..000009}.tar")
    with pytest.raises(ShardError) as err:
        MMPretrainCLI(args=["--config", DEMO, "--data.train_shards", pattern], run=False)
    assert "data.train_shards" in str(err.value) and pattern in str(err.value)
    assert "check the path and the brace range" in str(err.value)


# -- the data against the model ---------------------------------------------------------------------------------
def fit_classifier(tmp_path: Path, image_shards, model_size: int, patch: int, data_size: int) -> pl.Trainer:
    shards = image_shards([8], size=data_size)
    data = ImageLabelDataModule(train_shards=shards, image_size=data_size, batch_size=4, num_workers=0)
    task = ImageClassification(backbone="vit_tiny_patch16_224", num_classes=3, backbone_kwargs={
        "img_size": model_size, "patch_size": patch, "embed_dim": 32, "depth": 1, "num_heads": 2})
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         accelerator="cpu", default_root_dir=tmp_path)
    trainer.fit(task, datamodule=data)
    return trainer


def test_an_image_size_the_patches_do_not_tile_fails_before_the_first_step(tmp_path, image_shards):
    with pytest.raises(ValueError) as err:
        fit_classifier(tmp_path, image_shards, model_size=30, patch=8, data_size=30)
    message = str(err.value)
    assert "data.image_size (30) does not tile" in message and "patch 8" in message
    assert "such as 24 or 32" in message


def test_an_image_size_other_than_the_models_names_both(tmp_path, image_shards):
    with pytest.raises(ValueError) as err:
        fit_classifier(tmp_path, image_shards, model_size=32, patch=8, data_size=16)
    message = str(err.value)
    assert "data.image_size (16) differs from the model's input size (32, 32)" in message
    assert "backbone_kwargs.img_size" in message


class TinyLM(Task):
    """A task with a vocabulary, as the language-model tasks have."""

    def __init__(self, vocab_size: int = 10) -> None:
        super().__init__()
        self.vocab_size = vocab_size

    def build_model(self) -> nn.Module:
        return nn.Embedding(self.vocab_size, 4)


def test_a_tokenizer_larger_than_the_model_vocabulary_is_named():
    task = TinyLM(vocab_size=10)
    task.configure_model()
    data = SimpleNamespace(tokenizer=SimpleNamespace(vocab_size=300), tokenizer_path="tokenizers/bpe-300")
    task._trainer = SimpleNamespace(datamodule=data)
    with pytest.raises(ValueError) as err:
        task.check_data()
    message = str(err.value)
    assert "model.vocab_size (10) is smaller" in message and "bpe-300: 300 tokens" in message
    assert "leave model.vocab_size to the data" in message


# -- checkpoints from another model --------------------------------------------------------------------------
def tiny_classifier(depth: int) -> ImageClassification:
    return ImageClassification(backbone="vit_tiny_patch16_224", num_classes=3, backbone_kwargs={
        "img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": depth, "num_heads": 2})


def test_resuming_from_another_models_checkpoint_names_the_keys(tmp_path, image_shards):
    shards = image_shards([8])
    data = ImageLabelDataModule(train_shards=shards, image_size=16, batch_size=4, num_workers=0)

    def trainer(root: Path) -> pl.Trainer:
        t = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                       accelerator="cpu", default_root_dir=root)
        t.strategy.checkpoint_io = AtomicCheckpointIO()
        return t

    first = trainer(tmp_path / "a")
    first.fit(tiny_classifier(depth=1), datamodule=data)
    path = tmp_path / "depth1.ckpt"
    first.save_checkpoint(path)
    assert torch.load(path, weights_only=True)["mmpretrain"]["task"].endswith("ImageClassification")

    with pytest.raises(CheckpointError) as err:
        trainer(tmp_path / "b").fit(tiny_classifier(depth=2), datamodule=data, ckpt_path=str(path))
    message = str(err.value)
    assert f"--ckpt_path {path}" in message
    assert "saved by mmpretrain.tasks.classification.ImageClassification" in message
    assert "missing keys: model.blocks.1." in message
    assert "configuration it was trained with" in message and "init_from" in message


def test_init_from_a_missing_file_names_the_field(tmp_path):
    task = tiny_classifier(depth=1)
    task.init_from = str(tmp_path / "nothing.ckpt")
    with pytest.raises(CheckpointError, match=r"model.init_from .*nothing.ckpt: no such file"):
        task.configure_model()


def test_checkpoints_are_never_downloaded():
    with pytest.raises(CheckpointError, match="downloads nothing"):
        AtomicCheckpointIO().load_checkpoint("https://example.com/model.ckpt")
