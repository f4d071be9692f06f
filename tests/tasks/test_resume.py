"""Exact resume: a run killed with SIGKILL after a checkpoint and resumed with ``--ckpt_path last`` ends with the
weights of an uninterrupted run; the data stream resumes at the sample where it stopped."""

from __future__ import annotations

import csv
import json
import os
import signal
import signal as signal_module
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from mmpretrain.data.stats import DataStats
from mmpretrain.data.stream import SampleMapper, ShardLoader, ShardStream
from tests.conftest import write_image_shards

ROOT = Path(__file__).resolve().parents[2]

# the classification demo recipe at a reduced size: 8 batches of 16 per epoch, 12 steps, so that a run
# crosses an epoch boundary; validation every 6 steps; two workers; drop path, so that the training step
# itself draws random numbers
DEMO = [
    "--config", str(ROOT / "recipes/classification/demo.yaml"),
    "--trainer.max_steps", "12", "--trainer.val_check_interval", "6", "--trainer.limit_val_batches", "2",
    "--trainer.deterministic", "true", "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "2",
    "--data.num_workers", "2", "--data.batch_size", "16", "--data.image_size", "32", "--data.mode", "epoch",
    "--data.samples_per_epoch", "128",
    "--model.init_args.backbone_kwargs", '{"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "drop_path_rate": 0.2}',
    "--checkpoint.every_n_train_steps", "4",
]


class KillAfterCheckpoint(Callback):
    """Test helper: SIGKILL the whole run (workers included) in the middle of the step after ``step``, i.e. after
    the checkpoint of step ``step`` was written and while the next step's gradients are being applied."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == self.step:
            os.killpg(0, signal.SIGKILL)


class SignalDuringStep(Callback):
    """Test helper: send ``signal`` to the run in the middle of step ``step`` (before its optimizer step)."""

    def __init__(self, step: int, signal: str) -> None:
        self.step = step
        self.signum = getattr(signal_module, signal)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == self.step - 1:
            os.kill(os.getpid(), self.signum)


def fit(root: Path, *extra: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mmpretrain", "fit", *DEMO, "--trainer.default_root_dir", str(root), *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    # a session of its own: the kill takes the run's process group and nothing else
    return subprocess.run(cmd, cwd=root.parent, env=env, capture_output=True, text=True, timeout=timeout,
                          start_new_session=True)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def losses(root: Path) -> dict[int, float]:
    out = {}
    for path in sorted(root.glob("csv/version_*/metrics.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                if row.get("train/loss"):
                    out[int(row["step"])] = float(row["train/loss"])
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("uninterrupted") / "run"
    full = fit(root)
    assert full.returncode == 0, full.stderr[-4000:]
    return root


def assert_resumed_like_the_uninterrupted_run(run: Path, uninterrupted: Path, stopped_at: int) -> None:
    checkpoints = run / "tb/version_0/checkpoints"
    assert (checkpoints / f"step{stopped_at:08d}.ckpt").is_file()
    assert not (checkpoints / "step00000012.ckpt").exists()
    resumed = fit(run, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resuming from {checkpoints / 'last.ckpt'}" in resumed.stderr + resumed.stdout

    expected = weights(uninterrupted / "tb/version_0/checkpoints/last.ckpt")
    got = weights(run / "tb/version_1/checkpoints/last.ckpt")
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=key)
    # the steps after the resume saw the same batches and the same drop-path draws: the same losses
    after = {s: v for s, v in losses(run).items() if s > stopped_at}
    reference = losses(uninterrupted)
    assert after and all(abs(v - reference[s]) < 1e-5 for s, v in after.items())


def test_a_run_killed_mid_epoch_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path, uninterrupted):
    run = tmp_path / "run"
    # SIGKILL in the middle of step 5, after the checkpoint of step 4
    killed = fit(run, "--trainer.callbacks+=tests.tasks.test_resume.KillAfterCheckpoint",
                 "--trainer.callbacks.step=4")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
    assert_resumed_like_the_uninterrupted_run(run, uninterrupted, stopped_at=4)


@pytest.mark.parametrize(("signal_name", "step"), [("SIGUSR1", 8), ("SIGTERM", 7)])
def test_a_signal_saves_at_the_next_step_boundary_and_stops(tmp_path, uninterrupted, signal_name, step):
    """SIGUSR1 during the last step of the first epoch; SIGTERM during step 7 (neither on the checkpoint schedule,
    SIGTERM through Lightning's own handler): the run saves that step, stops cleanly, and resumes exactly."""
    run = tmp_path / "run"
    stopped = fit(run, "--trainer.callbacks+=tests.tasks.test_resume.SignalDuringStep",
                  f"--trainer.callbacks.step={step}", f"--trainer.callbacks.signal={signal_name}")
    assert stopped.returncode == 0, stopped.stderr[-4000:]
    assert f"{signal_name} received; saved step {step}" in stopped.stderr + stopped.stdout
    last = torch.load(run / "tb/version_0/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == step
    assert_resumed_like_the_uninterrupted_run(run, uninterrupted, stopped_at=step)


# -- the data position alone, at the stream level --------------------------------------------------------------
def sample_number(sample: dict, rng) -> tuple[int, float, float]:
    # the sample, and draws from the global torch generator and from ``rng`` (what augmentations do)
    return json.loads(sample["json"])["n"], float(torch.rand(())), rng.random()


def collate(items: list) -> dict[str, torch.Tensor]:
    numbers, draws, rng_draws = zip(*items)
    return {"n": torch.tensor(numbers), "draw": torch.tensor(draws), "rng": torch.tensor(rng_draws)}


def make_loader(urls: list[str], counts: list[int], mode: str, workers: int) -> ShardLoader:
    stats = DataStats()
    stream = ShardStream(urls, counts, SampleMapper(sample_number, stats, False, "train"), collate, batch_size=3,
                         mode=mode, num_workers=workers, stats=stats, shuffle_buffer=5, seed=1)
    return ShardLoader(stream, num_workers=workers)


@pytest.mark.parametrize("workers", [2, 0])
@pytest.mark.parametrize("consumed", [0, 3, 4, 9])
def test_stream_resumes_with_exactly_the_remaining_samples(tmp_path, consumed, workers):
    counts = [7, 11, 5, 9]  # 32 samples: 10 batches of 3 per epoch, a shuffle buffer
    urls = write_image_shards(tmp_path, counts)
    reference = list(make_loader(urls, counts, "epoch", workers))

    first = make_loader(urls, counts, "epoch", workers)
    iterator = iter(first)
    fetched = [next(iterator) for _ in range(consumed + 1)]  # the trainer fetches a batch ahead
    first.consumed_fn = lambda: consumed
    state = first.state_dict()
    del iterator
    assert state["ranks"][0]["batches"] == consumed

    second = make_loader(urls, counts, "epoch", workers)
    second.load_state_dict(state)
    rest = list(second)
    assert len(rest) == len(reference) - consumed
    before = [int(n) for b in fetched[:consumed] for n in b["n"]]
    after = [int(n) for b in rest for n in b["n"]]
    assert not set(before) & set(after)  # no repeats
    assert before + after == [int(n) for b in reference for n in b["n"]]  # none lost, same order
    for got, want in zip(fetched[:consumed] + rest, reference):  # same augmentation draws
        assert torch.equal(got["draw"], want["draw"]) and torch.equal(got["rng"], want["rng"])


def test_resampled_stream_continues_with_fresh_draws(tmp_path):
    counts = [7, 11, 5, 9]
    urls = write_image_shards(tmp_path, counts)
    reference = list(make_loader(urls, counts, "resampled", 2))
    first = make_loader(urls, counts, "resampled", 2)
    iterator = iter(first)
    fetched = [next(iterator) for _ in range(5)]
    first.consumed_fn = lambda: 4
    state = first.state_dict()
    del iterator
    second = make_loader(urls, counts, "resampled", 2)
    second.load_state_dict(state)
    rest = list(second)
    assert len(fetched[:4]) + len(rest) == len(reference)  # the epoch keeps its length
    # not a replay of the batches already trained on, nor of what the uninterrupted run drew next
    assert [b["n"].tolist() for b in rest] != [b["n"].tolist() for b in reference[4:]]
    assert [b["n"].tolist() for b in rest[:4]] != [b["n"].tolist() for b in fetched[:4]]


def test_a_complete_epoch_resumes_at_the_next_one(tmp_path):
    counts = [7, 11, 5, 9]
    urls = write_image_shards(tmp_path, counts)
    reference = make_loader(urls, counts, "epoch", 2)
    epochs = [list(reference), list(reference)]
    first = make_loader(urls, counts, "epoch", 2)
    done = list(first)
    first.consumed_fn = lambda: len(done)
    second = make_loader(urls, counts, "epoch", 2)
    second.load_state_dict(first.state_dict())
    assert [b["n"].tolist() for b in second] == [b["n"].tolist() for b in epochs[1]]


def test_position_from_another_setting_is_refused_with_a_warning(tmp_path, caplog):
    counts = [7, 11, 5, 9]
    urls = write_image_shards(tmp_path, counts)
    first = make_loader(urls, counts, "epoch", 0)
    iterator = iter(first)
    next(iterator)
    first.consumed_fn = lambda: 1
    state = first.state_dict()
    state["num_workers"] = 4
    second = make_loader(urls, counts, "epoch", 0)
    with caplog.at_level("WARNING"):
        second.load_state_dict(state)
    assert "num_workers was 4, now 1" in caplog.text
    assert len(list(second)) == len(second)  # the epoch starts over


# -- checkpoint schedule and retention, in process ----------------------------------------------------------------
def test_checkpoints_keep_the_last_k_and_the_final_step(tmp_path, image_shards):
    import lightning.pytorch as pl

    from mmpretrain.checkpoints import AtomicCheckpointIO, StepCheckpoint
    from mmpretrain.data.classification import ImageLabelDataModule
    from mmpretrain.tasks.classification import ImageClassification

    data = ImageLabelDataModule(train_shards=image_shards([16]), image_size=16, batch_size=4, num_workers=0,
                                mode="epoch")
    task = ImageClassification(backbone="vit_tiny_patch16_224", num_classes=3, backbone_kwargs={
        "img_size": 16, "patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 2})
    checkpoint = StepCheckpoint(dirpath=tmp_path / "ckpt", filename="step{step:08d}", monitor="step", mode="max",
                                save_top_k=2, every_n_train_steps=2, save_last=True, auto_insert_metric_name=False)
    trainer = pl.Trainer(max_steps=7, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", default_root_dir=tmp_path, callbacks=[checkpoint])
    trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    trainer.fit(task, datamodule=data)
    # steps 2, 4, 6 on schedule (2 kept), 7 at the end (a step of its own, which ranks first)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["last.ckpt", "step00000006.ckpt",
                                                                      "step00000007.ckpt"]
    last = torch.load(tmp_path / "ckpt/last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 7
    # what mmpretrain adds is plain: the task, per-rank generator states, the data position
    assert last["mmpretrain"]["task"] == "mmpretrain.tasks.classification.ImageClassification"
    assert len(last["mmpretrain"]["rng"]) == 1 and last["mmpretrain"]["skipped_steps"] == 0
    (position,) = last["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert position["ranks"][0]["batches"] == 3  # 4 batches per epoch: 7 steps = one epoch and 3 batches


def tiny_fit(tmp_path: Path, image_shards, callbacks: list, max_steps: int = 8, **trainer_kwargs):
    import lightning.pytorch as pl

    from mmpretrain.checkpoints import AtomicCheckpointIO, StepCheckpoint
    from mmpretrain.data.classification import ImageLabelDataModule
    from mmpretrain.tasks.classification import ImageClassification

    data = ImageLabelDataModule(train_shards=image_shards([16]), val_shards=image_shards([8]), image_size=16,
                                batch_size=4, num_workers=0, mode="epoch")
    task = ImageClassification(backbone="vit_tiny_patch16_224", num_classes=3, backbone_kwargs={
        "img_size": 16, "patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 2})
    checkpoint = StepCheckpoint(dirpath=tmp_path / "ckpt", filename="step{step:08d}", monitor="step", mode="max",
                                every_n_train_steps=100, save_last=True, auto_insert_metric_name=False)
    trainer = pl.Trainer(max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", default_root_dir=tmp_path, callbacks=[checkpoint, *callbacks],
                         num_sanity_val_steps=0, **trainer_kwargs)
    trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    trainer.fit(task, datamodule=data)
    return trainer


class SignalDuringValidation(Callback):
    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_during_validation_saves_the_step_before_it(tmp_path, image_shards):
    with pytest.raises(SystemExit):  # Lightning ends the run with SIGTERMException between validation batches
        tiny_fit(tmp_path, image_shards, [SignalDuringValidation()], val_check_interval=3,
                 check_val_every_n_epoch=None, limit_val_batches=2)
    saved = torch.load(tmp_path / "ckpt/last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 3 and (tmp_path / "ckpt/step00000003.ckpt").is_file()


def test_under_slurm_the_requeue_signal_runs_lightnings_requeue_at_a_step_boundary(tmp_path, image_shards,
                                                                                   monkeypatch):
    from lightning.fabric.plugins.environments import SLURMEnvironment
    from lightning.pytorch.trainer.connectors import signal_connector

    for name, value in {"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
                        "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "pretrain"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    requeued = []
    monkeypatch.setattr(signal_connector, "call", lambda cmd, **kw: requeued.append(cmd) or 0)
    trainer = tiny_fit(tmp_path, image_shards, [SignalDuringStep(step=3, signal="SIGUSR1")],
                       plugins=[SLURMEnvironment(auto_requeue=True)])
    assert requeued == [["scontrol", "requeue", "4242"]]
    hpc = torch.load(tmp_path / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=True)
    assert hpc["global_step"] == 3 and trainer.global_step == 3  # saved at the boundary, then stopped
