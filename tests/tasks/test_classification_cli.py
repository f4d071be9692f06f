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
