"""Faults during training: non-finite steps are skipped and counted (automatic and manual optimization, fp32 and
bf16), a run that keeps diverging stops naming the step and the samples; bad data is skipped and counted in the
logs, a failing or dying dataloader worker surfaces its error instead of hanging, a shard that disappears is
reported by name."""

from __future__ import annotations

import csv
import os
import signal
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from mmpretrain.data.classification import ImageLabelDataModule, ImageLabelDecoder
from mmpretrain.data.shards import ShardReadError
from mmpretrain.data.stats import DataStatsMonitor
from mmpretrain.data.stream import SampleError
from mmpretrain.data.writer import ShardWriter
from mmpretrain.tasks.base import NonFiniteError, Task
from mmpretrain.tasks.classification import ImageClassification
from mmpretrain.tasks.contrastive import ContrastivePretraining
from tests.conftest import jpeg_bytes, write_image_shards

TINY_VIT = {"img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}
TINY_CLIP = dict(embed_dim=16, vision_kwargs=dict(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2),
                 text_kwargs=dict(context_length=8, width=32, heads=2, layers=1))


def classifier(**kw) -> ImageClassification:
    torch.manual_seed(0)
    return ImageClassification(backbone="vit_tiny_patch16_224", backbone_kwargs=TINY_VIT, num_classes=4, **kw)


def contrastive(**kw) -> ContrastivePretraining:
    torch.manual_seed(0)
    return ContrastivePretraining(preset="clip_demo", overrides=TINY_CLIP, vocab_size=50, eot_id=3, **kw)


def batches(count: int, poisoned: set[int]) -> list[dict]:
    """Batches of 4 images (labels, token rows, sample keys); the images of the ``poisoned`` ones are NaN."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(count):
        image = torch.randn(4, 3, 16, 16, generator=g)
        if i in poisoned:
            image[1] = float("nan")
        tokens = torch.full((4, 8), 2)
        tokens[:, 0], tokens[:, 1:4], tokens[:, 4] = 1, torch.randint(4, 50, (4, 3), generator=g), 3
        out.append({"image": image, "label": torch.tensor([0, 1, 2, 3]), "input_ids": tokens,
                    "key": [f"shard-{i}.tar:{i:03d}{j}" for j in range(4)]})
    return out


class Snapshots(pl.Callback):
    """The parameters after each training batch."""

    def __init__(self) -> None:
        self.params: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, task, *args) -> None:
        self.params.append({n: p.detach().clone() for n, p in task.model.named_parameters()})


def fit(task, data: list[dict], root: Path, **trainer_kwargs) -> tuple[pl.Trainer, Snapshots]:
    snapshots = Snapshots()
    trainer = pl.Trainer(max_steps=len(data), logger=CSVLogger(root), log_every_n_steps=1, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                         accelerator="cpu", num_sanity_val_steps=0, callbacks=[snapshots], **trainer_kwargs)
    trainer.fit(task, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    return trainer, snapshots


def metric_rows(root: Path) -> list[dict[str, str]]:
    (path,) = root.glob("**/metrics.csv")
    with open(path) as f:
        return list(csv.DictReader(f))


def adam_steps(trainer: pl.Trainer) -> set[int]:
    return {int(s["step"]) for s in trainer.optimizers[0].state.values()}


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("make", [classifier, lambda: contrastive(accumulate_micro_batches=2)],
                         ids=["automatic", "manual"])
def test_a_nan_loss_step_is_skipped_and_counted(tmp_path, make, precision):
    task = make()
    trainer, snaps = fit(task, batches(5, poisoned={2}), tmp_path, precision=precision)
    assert task.automatic_optimization == (make is classifier)
    assert trainer.global_step == 5 and task.skipped_steps == 1 and task.consecutive_skipped_steps == 0
    before, skipped, after = snaps.params[1], snaps.params[2], snaps.params[3]
    for name in before:  # no update at the poisoned step, updates around it
        assert torch.equal(skipped[name], before[name]), name
    assert any(not torch.equal(after[n], skipped[n]) for n in after)
    assert adam_steps(trainer) == {4}  # the optimizer state skipped the step too
    assert all(torch.isfinite(p).all() for p in task.model.parameters())
    logged = [float(r["train/skipped_steps"]) for r in metric_rows(tmp_path) if r.get("train/skipped_steps")]
    assert logged == [0.0, 0.0, 1.0, 1.0, 1.0]


def test_a_non_finite_gradient_with_a_finite_loss_is_skipped(tmp_path):
    task = classifier()
    task.configure_model()
    hits = []

    def blow_up(grad: torch.Tensor) -> torch.Tensor:
        hits.append(1)
        return grad * float("inf") if len(hits) == 2 else grad

    task.model.head.weight.register_hook(blow_up)
    trainer, snaps = fit(task, batches(3, poisoned=set()), tmp_path)
    assert task.skipped_steps == 1
    assert all(torch.equal(snaps.params[1][n], snaps.params[0][n]) for n in snaps.params[0])
    assert adam_steps(trainer) == {2}


@pytest.mark.parametrize("make", [classifier, lambda: contrastive(accumulate_micro_batches=2)],
                         ids=["automatic", "manual"])
def test_too_many_consecutive_skips_stop_training_naming_the_step_and_the_samples(tmp_path, make):
    task = make()
    task.max_skipped_steps = 2
    with pytest.raises(NonFiniteError) as err:
        fit(task, batches(6, poisoned={1, 2, 3, 4, 5}), tmp_path)
    message = str(err.value)
    assert "training step 3" in message and "max_skipped_steps=2" in message
    assert "shard-3.tar:0030" in message  # the keys of the batch that broke the limit
    assert task.skipped_steps == 3


def test_a_good_step_resets_the_consecutive_count(tmp_path):
    task = classifier()
    task.max_skipped_steps = 1
    trainer, _ = fit(task, batches(6, poisoned={1, 3, 5}), tmp_path)
    assert trainer.global_step == 6 and task.skipped_steps == 3


def test_the_limit_is_a_task_argument():
    assert Task().max_skipped_steps == 10
    with pytest.raises(ValueError, match="model.max_skipped_steps must be >= 0"):
        Task(max_skipped_steps=-1)


# -- data faults, end to end ----------------------------------------------------------------------------------
def faulty_shards(root: Path) -> str:
    """One shard of 24 samples, 3 of them broken (truncated JPEG, missing label, label out of range)."""
    good = jpeg_bytes((200, 10, 10))
    with ShardWriter(root, prefix="f", shard_size=100, metadata={"classes": ["a", "b", "c", "d"]}) as w:
        for i in range(24):
            sample = {"__key__": f"{i:04d}", "jpg": good, "cls": i % 4}
            if i == 5:
                sample["jpg"] = good[: len(good) // 3]
            if i == 11:
                del sample["cls"]
            if i == 17:
                sample["cls"] = 9
            w.write(sample)
    return str(root / "f-000000.tar")


def image_data(train: str | list[str], **kw) -> ImageLabelDataModule:
    kw.setdefault("num_workers", 2)
    return ImageLabelDataModule(train_shards=train, image_size=16, batch_size=4, mode="epoch", shuffle_buffer=0,
                                worker_start_method="fork", **kw)


def train(task, data, root: Path, steps: int, **kw) -> pl.Trainer:
    trainer = pl.Trainer(max_steps=steps, logger=CSVLogger(root), log_every_n_steps=1, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                         accelerator="cpu", callbacks=[DataStatsMonitor(logging_interval=1)], **kw)
    trainer.fit(task, datamodule=data)
    return trainer


def test_skipped_samples_are_counted_in_the_logs(tmp_path):
    data = image_data(faulty_shards(tmp_path / "d"), num_workers=1)
    train(classifier(), data, tmp_path, steps=10)  # 21 good samples: 5 batches per epoch, 2 epochs
    assert data.stats["train"].snapshot() == {"bad_image": 2, "missing_label": 2, "bad_label": 2}
    rows = [r for r in metric_rows(tmp_path) if r.get("data/train_skipped")]
    assert float(rows[-1]["data/train_skipped"]) == 6.0  # 3 per pass, 2 passes
    assert float(rows[0]["data/train_skipped"]) < 6.0  # a running total, logged as it grows


class RaisingDecoder(ImageLabelDecoder):
    """Raises an unexpected error (a bug, not bad data) for sample 000007, or kills its worker."""

    def __init__(self, base: ImageLabelDecoder, kill: bool) -> None:
        self.__dict__.update(base.__dict__)
        self.kill = kill

    def __call__(self, sample, rng):
        if sample["__key__"] == "000007":
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise KeyError("a bug in a transform")
        return super().__call__(sample, rng)


class RaisingData(ImageLabelDataModule):
    def __init__(self, kill: bool = False, **kw) -> None:
        super().__init__(**kw)
        self.kill = kill

    def process(self, split):
        mapper = super().process(split)
        mapper.decode = RaisingDecoder(mapper.decode, self.kill)
        return mapper


def test_a_worker_that_raises_surfaces_its_error_naming_the_shard(tmp_path):
    shard = write_image_shards(tmp_path / "d", [16])[0]
    data = RaisingData(train_shards=shard, image_size=16, batch_size=4, num_workers=2, mode="epoch",
                       worker_start_method="fork")
    with pytest.raises(SampleError) as err:
        train(classifier(), data, tmp_path, steps=8)
    assert "train0-000000.tar" in str(err.value) and "'000007'" in str(err.value) and "a bug in a transform" in str(err.value)


def test_a_worker_that_dies_is_reported_instead_of_hanging(tmp_path):
    shard = write_image_shards(tmp_path / "d", [16])[0]
    data = RaisingData(kill=True, train_shards=shard, image_size=16, batch_size=4, num_workers=2, mode="epoch",
                       worker_start_method="fork")
    with pytest.raises(RuntimeError, match="DataLoader worker .* (killed by signal|exited unexpectedly)"):
        train(classifier(), data, tmp_path, steps=8)


class DeleteShard(pl.Callback):
    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_epoch_end(self, trainer, task) -> None:
        if os.path.exists(self.path):
            os.remove(self.path)


@pytest.mark.parametrize("strict", [False, True])
def test_a_shard_that_disappears_mid_run_is_reported_by_name(tmp_path, strict, caplog):
    shards = write_image_shards(tmp_path / "d", [8, 8])
    data = image_data(shards, num_workers=0, strict=strict)
    kw = {"callbacks": [DataStatsMonitor(logging_interval=1), DeleteShard(shards[1])]}
    trainer = pl.Trainer(max_steps=8, logger=CSVLogger(tmp_path), log_every_n_steps=1, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         accelerator="cpu", **kw)
    if strict:
        with pytest.raises(ShardReadError, match="train1-000000.tar disappeared"):
            trainer.fit(classifier(), datamodule=data)
        return
    with caplog.at_level("WARNING", logger="mmpretrain.data"):
        trainer.fit(classifier(), datamodule=data)
    assert trainer.global_step == 8  # the epoch still ends: the remaining shard is read again
    # counted at each attempt to read it: the second epoch, a shard short, makes two passes over the list
    assert data.stats["train"].snapshot() == {"missing_shard": 2}
    assert "train1-000000.tar disappeared (no such file)" in caplog.text
    rows = [r for r in metric_rows(tmp_path) if r.get("data/train_bad_shards")]
    assert float(rows[-1]["data/train_bad_shards"]) == 2.0


# -- checkpoint writes ------------------------------------------------------------------------------------------
def test_a_failure_while_writing_leaves_the_last_checkpoint_whole(tmp_path, monkeypatch):
    from mmpretrain.checkpoints import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # the partial temporary file is gone


WRITER = """
import sys, torch
from mmpretrain.checkpoints import AtomicCheckpointIO
io, step = AtomicCheckpointIO(), 0
while True:
    step += 1
    io.save_checkpoint({"global_step": step, "w": torch.full((2_000_000,), float(step))}, sys.argv[1])
    print(step, flush=True)
"""


def test_a_kill_mid_write_never_corrupts_the_checkpoint(tmp_path):
    import subprocess
    import sys
    import time

    path = tmp_path / "last.ckpt"
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(root)})
    try:
        for _ in range(3):  # a few complete writes, then a kill at an arbitrary point of the next ones
            proc.stdout.readline()
        time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    checkpoint = torch.load(path, weights_only=True)
    step = checkpoint["global_step"]
    assert step >= 3 and torch.equal(checkpoint["w"], torch.full((2_000_000,), float(step)))
