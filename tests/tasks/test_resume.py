"""Exact resume: a run killed with SIGKILL after a checkpoint and resumed with ``--ckpt_path last`` ends with the
weights of an uninterrupted run; the data stream resumes at the sample where it stopped."""

from __future__ import annotations

import csv
import json
import os
import signal
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


@pytest.mark.parametrize("kill_after", [4, 8])  # mid-epoch, and the last step of the first epoch
def test_killed_run_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path, uninterrupted, kill_after):
    run = tmp_path / "run"
    killed = fit(run, "--trainer.callbacks+=tests.tasks.test_resume.KillAfterCheckpoint",
                 f"--trainer.callbacks.step={kill_after}")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
    checkpoints = run / "tb/version_0/checkpoints"
    assert (checkpoints / f"step{kill_after:08d}.ckpt").is_file()
    assert not (checkpoints / f"step{kill_after + 4:08d}.ckpt").exists()

    resumed = fit(run, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resuming from {checkpoints / 'last.ckpt'}" in resumed.stderr + resumed.stdout

    expected = weights(uninterrupted / "tb/version_0/checkpoints/last.ckpt")
    got = weights(run / "tb/version_1/checkpoints/last.ckpt")
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=key)
    # the steps after the resume saw the same batches: same losses
    after = {s: v for s, v in losses(run).items() if s > kill_after}
    reference = losses(uninterrupted)
    assert after and all(abs(v - reference[s]) < 1e-5 for s, v in after.items())


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
