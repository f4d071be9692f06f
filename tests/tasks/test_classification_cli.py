"""The classification demo recipe runs end to end through the real ``mmpretrain`` command."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def mmpretrain_command() -> list[str]:
    exe = shutil.which("mmpretrain")
    return [exe] if exe else [sys.executable, "-m", "mmpretrain"]


def read_metrics(root: Path) -> list[dict[str, str]]:
    (path,) = root.glob("csv/version_*/metrics.csv")
    with open(path) as f:
        return list(csv.DictReader(f))


def test_classification_demo_trains_and_logs_validation_accuracy(tmp_path):
    cmd = mmpretrain_command() + [
        "fit", "--config", str(ROOT / "recipes/classification/demo.yaml"),
        "--trainer.max_steps", "12", "--trainer.val_check_interval", "6",
        "--trainer.default_root_dir", str(tmp_path), "--data.num_workers", "2", "--data.batch_size", "16",
        "--checkpoint.every_n_train_steps", "6",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = read_metrics(tmp_path)
    accs = [float(r["val/acc1"]) for r in rows if r.get("val/acc1")]
    assert len(accs) == 2 and all(0.0 <= a <= 1.0 for a in accs)
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert losses and all(loss == loss for loss in losses)  # finite, logged
    assert any(r.get("data/train_skipped") for r in rows)  # the data health counters reach the logs
    ckpts = sorted(p.name for p in tmp_path.glob("tb/version_*/checkpoints/*.ckpt"))
    assert "last.ckpt" in ckpts and "step00000006.ckpt" in ckpts and "step00000012.ckpt" in ckpts


def test_classification_demo_learns_in_a_short_run(tmp_path):
    """The whole path learns: the demo recipe fits 64 demo images (no augmentation) in 100 steps (chance is 1/8).

    (On the full demo set the small ViT needs far longer: see the recipe for the figures.)
    """
    from itertools import islice

    from mmpretrain.data.demo import demo_shards
    from mmpretrain.data.shards import iter_shard_samples
    from mmpretrain.data.writer import ShardWriter, read_index

    source = demo_shards("images/train")[0]
    with ShardWriter(tmp_path / "subset", prefix="s", shard_size=64,
                     metadata={"classes": read_index(Path(source).parent)["classes"]}) as w:
        for sample in islice(iter_shard_samples(source), 64):
            w.write({k: v for k, v in sample.items() if k in ("__key__", "jpg", "cls")})
    shard = str(tmp_path / "subset" / "s-000000.tar")
    cmd = mmpretrain_command() + [
        "fit", "--config", str(ROOT / "recipes/classification/demo.yaml"),
        "--data.train_shards", shard, "--data.val_shards", shard, "--data.batch_size", "32",
        "--data.samples_per_epoch", "3200",  # the shard, redrawn: one epoch of 100 steps
        "--data.num_workers", "1",
        "--data.train_transform", '{"scale": [1.0, 1.0], "ratio": [1.0, 1.0], "hflip": 0.0, "color_jitter": 0.0}',
        "--model.init_args.optimizer.init_args.lr", "0.002",
        "--model.init_args.label_smoothing", "0.0", "--model.init_args.lr_scheduler.init_args.warmup_steps", "10",
        "--trainer.max_steps", "100", "--trainer.val_check_interval", "100",
        "--trainer.default_root_dir", str(tmp_path), "--checkpoint.every_n_train_steps", "1000",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = read_metrics(tmp_path)
    accs = [float(r["val/acc1"]) for r in rows if r.get("val/acc1")]
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert accs[-1] > 0.5, accs  # 4x chance
    assert losses[-1] < 0.7 * losses[0], losses


def test_predict_runs_through_the_cli(tmp_path):
    cmd = mmpretrain_command() + [
        "predict", "--config", str(ROOT / "recipes/classification/demo.yaml"),
        "--data.num_workers", "0", "--data.batch_size", "8", "--trainer.limit_predict_batches", "2",
        "--trainer.default_root_dir", str(tmp_path),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
