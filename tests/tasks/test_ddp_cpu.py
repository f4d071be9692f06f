"""Two CPU processes under DDP (gloo) on shards that do not divide evenly: training ends, nothing hangs."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_image_shards

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("mode", ["epoch", "resampled"])
def test_two_ranks_two_workers_uneven_shards(tmp_path, mode):
    # 3 training shards of different sizes for 2 ranks x 2 workers; 5 validation samples for 2 ranks
    train = write_image_shards(tmp_path / "d", [23, 9, 14], prefix="train", size=16)
    val = write_image_shards(tmp_path / "d", [5], prefix="val", size=16)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "mmpretrain", "fit", "--config", str(ROOT / "recipes/classification/demo.yaml"),
        "--data.train_shards", "[" + ",".join(train) + "]", "--data.val_shards", val[0],
        "--data.mode", mode, "--data.batch_size", "4", "--data.num_workers", "2", "--data.image_size", "16",
        "--model.init_args.backbone_kwargs", '{"img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}',
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
        "--trainer.max_epochs", "2", "--trainer.max_steps", "-1", "--trainer.val_check_interval", "null",
        "--trainer.check_val_every_n_epoch", "1", "--trainer.default_root_dir", str(tmp_path / "runs"),
        "--checkpoint.every_n_train_steps", "1000",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (metrics,) = (tmp_path / "runs").glob("csv/version_*/metrics.csv")
    with open(metrics) as f:
        rows = list(csv.DictReader(f))
    steps = max(int(r["step"]) for r in rows if r.get("step"))
    # 46 samples // (2 ranks x 4) = 5 batches per rank per epoch, two epochs
    assert steps == 2 * 5
    accs = [r["val/acc1"] for r in rows if r.get("val/acc1")]
    assert len(accs) == 2
