"""The launch check: a trainer whose num_nodes x devices differs from what torchrun or srun started fails at
start, naming both sides."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from lightning.pytorch import Trainer

from mmpretrain.launch import LaunchMismatchError, check_launch, check_trainer_matches_launch, launcher_world

ROOT = Path(__file__).resolve().parents[1]


def torchrun_env(nnodes: int, nproc: int, node: int = 0, local: int = 0) -> dict[str, str]:
    """The variables torchrun's agent sets for one worker."""
    return {
        "TORCHELASTIC_RUN_ID": "test", "WORLD_SIZE": str(nnodes * nproc), "LOCAL_WORLD_SIZE": str(nproc),
        "GROUP_WORLD_SIZE": str(nnodes), "GROUP_RANK": str(node), "RANK": str(node * nproc + local),
        "LOCAL_RANK": str(local), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
    }


def test_outside_a_launcher_nothing_is_checked():
    assert launcher_world({}) is None
    check_launch(1, 1, {})
    check_launch(4, 8, {})  # Lightning launching its own processes: nothing to compare with


@pytest.mark.parametrize(("nnodes", "nproc"), [(1, 1), (1, 2), (2, 1), (2, 8)])
def test_a_matching_torchrun_world_passes(nnodes, nproc):
    world = launcher_world(torchrun_env(nnodes, nproc))
    assert (world.launcher, world.world_size, world.nodes, world.per_node) == ("torchrun", nnodes * nproc, nnodes, nproc)
    check_launch(nnodes, nproc, torchrun_env(nnodes, nproc, node=nnodes - 1, local=nproc - 1))


@pytest.mark.parametrize(
    ("nnodes", "nproc", "num_nodes", "devices"),
    [
        (1, 2, 1, 1),  # the silent case: each process would train alone
        (1, 2, 2, 2),  # Lightning's own check covers this one under DDP
        (1, 2, 2, 1),  # the product matches, the layout does not
        (2, 4, 1, 8),
    ],
)
def test_a_torchrun_mismatch_names_both_sides_and_the_fix(nnodes, nproc, num_nodes, devices):
    with pytest.raises(LaunchMismatchError) as err:
        check_launch(num_nodes, devices, torchrun_env(nnodes, nproc))
    message = str(err.value)
    assert f"torchrun started {nnodes * nproc} processes (--nnodes {nnodes} x --nproc-per-node {nproc})" in message
    assert f"trainer.num_nodes {num_nodes} x trainer.devices {devices} = {num_nodes * devices}" in message
    assert f"--trainer.num_nodes {nnodes} --trainer.devices {nproc}" in message


def test_srun_steps_are_checked_and_single_tasks_and_interactive_jobs_are_not():
    step = {"SLURM_STEP_NUM_TASKS": "16", "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_TASKS_PER_NODE": "8(x2)",
            "SLURM_JOB_NAME": "train"}
    world = launcher_world(step)
    assert (world.launcher, world.world_size, world.nodes, world.per_node) == ("srun", 16, 2, 8)
    check_launch(2, 8, step)
    with pytest.raises(LaunchMismatchError, match=r"srun started 16 tasks on 2 nodes, 8 per node, but the trainer "
                                                  r"expects trainer.num_nodes 2 x trainer.devices 4 = 8"):
        check_launch(2, 4, step)
    assert launcher_world({**step, "SLURM_STEP_NUM_TASKS": "1", "SLURM_STEP_NUM_NODES": "1"}) is None
    assert launcher_world({**step, "SLURM_JOB_NAME": "interactive"}) is None
    # torchrun inside an srun step (one task per node): torchrun's world is what counts
    inner = {**step, "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_TASKS_PER_NODE": "1(x2)", **torchrun_env(2, 8)}
    check_launch(2, 8, inner)


def test_the_check_reads_a_lightning_trainer(monkeypatch):
    for name, value in torchrun_env(1, 2).items():
        monkeypatch.setenv(name, value)
    quiet = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    check_trainer_matches_launch(Trainer(devices=2, strategy="ddp", **quiet))
    with pytest.raises(LaunchMismatchError, match=r"trainer.num_nodes 1 x trainer.devices 1 = 1"):
        check_trainer_matches_launch(Trainer(devices=1, **quiet))


def test_under_a_real_torchrun(tmp_path):
    """The variables as torchrun really sets them: 2 processes pass with devices 2 and fail with devices 1."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    def launch(num_nodes: int, devices: int) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "tests.tasks._rank_keys", str(num_nodes), str(devices)]
        return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)

    ok = launch(1, 2)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "rank 0: launch matches" in ok.stdout and "rank 1: launch matches" in ok.stdout
    bad = launch(1, 1)
    assert bad.returncode != 0
    assert ("torchrun started 2 processes (--nnodes 1 x --nproc-per-node 2), but the trainer expects "
            "trainer.num_nodes 1 x trainer.devices 1 = 1") in bad.stderr


CLI_CHECKS_LAUNCH = "check_trainer_matches_launch" in (ROOT / "mmpretrain/cli.py").read_text()


@pytest.mark.skipif(not CLI_CHECKS_LAUNCH, reason="mmpretrain/cli.py does not call check_trainer_matches_launch yet")
def test_mmpretrain_fit_refuses_devices_1_under_a_2_process_torchrun(tmp_path):
    from tests.conftest import write_image_shards

    train = write_image_shards(tmp_path / "d", [8], size=16)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "mmpretrain", "fit", "--config", str(ROOT / "recipes/classification/demo.yaml"),
           "--data.train_shards", train[0], "--data.val_shards", "null", "--data.image_size", "16",
           "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.max_steps", "1",
           "--trainer.default_root_dir", str(tmp_path / "runs")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode != 0
    assert "trainer.num_nodes 1 x trainer.devices 1 = 1" in out.stderr
    assert not list((tmp_path / "runs").glob("**/*.ckpt"))  # nothing trained, nothing written
