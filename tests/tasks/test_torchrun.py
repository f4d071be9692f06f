"""The CLIP and METALM demo recipes under ``torchrun`` with 2 CPU processes (gloo): training, how the data splits
across ranks, resuming a checkpoint saved under DDP, and a two-node launch simulated on one host.

Every run is ``python -m torch.distributed.run ... -m mmpretrain fit --config recipes/<task>/demo.yaml`` with
the models and batches shrunk from the command line. Runs start in a session of their own and are killed,
the whole process tree, on timeout (torchrun starts its workers in sessions of their own, so killing its
process group would leave them behind).

What tests/tasks/test_ddp_cpu.py (uneven shards end without hanging, the classification recipe) and
tests/models/test_losses.py (the contrastive loss on 2 ranks equals the single-process one) check is not
repeated here.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from tests.conftest import write_image_shards
from tests.tasks._rank_keys import read_keys
from tests.tasks.test_resume import losses as train_losses

ROOT = Path(__file__).resolve().parents[2]

# 4 shards of 12 samples: 2 ranks x 2 workers read one shard each; 48 // (2 ranks x 4) = 6 steps per epoch
SHARD_COUNTS = [12, 12, 12, 12]
BATCH = 4
STEPS_PER_EPOCH = sum(SHARD_COUNTS) // (2 * BATCH)

CLIP_TINY = (
    '{"embed_dim": 32, "vision_kwargs": {"img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 1, '
    '"num_heads": 2}, "text_kwargs": {"context_length": 16, "width": 32, "heads": 2, "layers": 1}}'
)
METALM_TINY = (
    '{"dim": 32, "layers": 1, "heads": 2, "max_seq_len": 64, "encoder_dim": 32, "encoder_layers": 1, '
    '"encoder_heads": 2}'
)
COMMON = [
    "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.enable_progress_bar", "false",
    "--trainer.log_every_n_steps", "1", "--trainer.deterministic", "true",
]


# -- launching and cleaning up ---------------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port nobody listens on right now (the kernel's choice); callers retry if it is taken meanwhile."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (read from /proc), children before grandchildren."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(0), []):
            found.append(child)
            queue.append(child)
    return found


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launch and everything it started, by process id."""
    for pid in [*descendants(proc.pid), proc.pid]:
        with contextlib.suppress(ProcessLookupError):  # ended meanwhile
            os.kill(pid, signal.SIGKILL)
    proc.wait()


def start(torchrun_args: list[str], fit_args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", *torchrun_args, "-m", "mmpretrain", "fit", *fit_args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:  # a file, not a pipe: a chatty run never blocks on a full pipe
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)


def wait_all(procs: list[subprocess.Popen], logs: list[Path], timeout: float) -> list[str]:
    """Wait for every launch; on timeout kill them all (trees included) and fail with their output."""
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for proc in procs:
            kill_tree(proc)
        tails = "\n".join(f"--- {log}\n{log.read_text()[-3000:]}" for log in logs)
        pytest.fail(f"torchrun launches did not finish in {timeout:.0f} s; killed.\n{tails}")
    return [log.read_text() for log in logs]


def torchrun(fit_args: list[str], cwd: Path, name: str = "run", nproc: int = 2, timeout: float = 240) -> str:
    """One single-node launch of ``nproc`` processes; returns its output, fails the test if it fails."""
    log = cwd / f"{name}.log"
    proc = start(["--standalone", "--nproc-per-node", str(nproc)], fit_args, cwd, log)
    (output,) = wait_all([proc], [log], timeout)
    assert proc.returncode == 0, output[-4000:]
    return output


# -- what runs leave behind ------------------------------------------------------------------------------------
def last_checkpoint(root: Path, version: int = 0) -> dict:
    """``last.ckpt`` of a run's logger version ``version`` (a resumed run writes the next version)."""
    path = root / f"tb/version_{version}/checkpoints/last.ckpt"
    assert path.is_file(), f"no {path}"
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(got: dict, expected: dict, atol: float = 1e-6) -> None:
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=atol, msg=key)


def batches_by_step(directory: Path, rank: int) -> dict[int, list[str]]:
    """The sample keys rank ``rank`` trained on at each step (the last record of a step wins: a resumed run
    records the steps it redid)."""
    return {line["step"]: line["keys"] for line in read_keys(directory, rank)}


# -- fixtures --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_set() -> None:
    """The demo set (its tokenizer is the CLIP and METALM recipes'), generated once before any launch."""
    from mmpretrain.data.demo import ensure_demo

    ensure_demo()


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory) -> list[str]:
    return write_image_shards(tmp_path_factory.mktemp("shards"), SHARD_COUNTS, size=16)


def clip_args(shards: list[str], root: Path, keys: Path, *extra: str) -> list[str]:
    """The CLIP demo recipe, tiny: 16 px images, 1-layer 32-wide towers, 4 samples a rank, 2 workers a rank,
    epoch mode; 8 steps (an epoch is 6) with a checkpoint every 4; records each rank's sample keys."""
    return [
        "--config", str(ROOT / "recipes/clip/demo.yaml"),
        "--data.train_shards", "[" + ",".join(shards) + "]", "--data.val_shards", "null", "--data.mode", "epoch",
        "--data.batch_size", str(BATCH), "--data.num_workers", "2", "--data.image_size", "16",
        "--data.context_length", "16", "--model.init_args.overrides", CLIP_TINY,
        "--model.init_args.lr_scheduler.init_args.warmup_steps", "2",
        *COMMON, "--trainer.max_steps", "8", "--trainer.default_root_dir", str(root),
        "--checkpoint.every_n_train_steps", "4",
        "--trainer.callbacks+=tests.tasks._rank_keys.RecordKeys", f"--trainer.callbacks.directory={keys}",
        *extra,
    ]


@pytest.fixture(scope="module")
def clip_two_ranks(demo_set, image_shards, tmp_path_factory) -> Path:
    """The reference: one launch of 2 processes, uninterrupted, 8 steps."""
    work = tmp_path_factory.mktemp("clip_two_ranks")
    torchrun(clip_args(image_shards, work / "run", work / "keys", "--trainer.devices", "2"), work)
    return work


class SignalOneRank(Callback):
    """Test helper: send SIGUSR1 to this process in the middle of step ``step`` (before its optimizer step), on
    global rank ``rank`` only."""

    def __init__(self, step: int, rank: int) -> None:
        self.step = step
        self.rank = rank

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step - 1:
            os.kill(os.getpid(), signal.SIGUSR1)


# -- tests -----------------------------------------------------------------------------------------------------
def test_clip_two_ranks_each_see_a_disjoint_part_of_every_epoch(clip_two_ranks, image_shards):
    keys = clip_two_ranks / "keys"
    per_rank = [read_keys(keys, rank) for rank in (0, 1)]
    for lines in per_rank:
        assert [line["step"] for line in lines] == list(range(8))
        assert all(len(line["keys"]) == BATCH for line in lines)
    first_epoch = [[k for line in lines if line["epoch"] == 0 for k in line["keys"]] for lines in per_rank]
    assert [len(ks) for ks in first_epoch] == [STEPS_PER_EPOCH * BATCH] * 2
    # no sample twice within a rank, none on both ranks, and together every sample of the 4 shards once
    assert all(len(set(ks)) == len(ks) for ks in first_epoch)
    assert not set(first_epoch[0]) & set(first_epoch[1])
    everything = {f"{shard}:{n:06d}" for shard, start in zip(image_shards, range(0, 48, 12))
                  for n in range(start, start + 12)}
    assert set(first_epoch[0]) | set(first_epoch[1]) == everything
    # shards split by rank first: each rank reads whole shards (2 of the 4), never a shard of the other's
    shards = [{k.rsplit(":", 1)[0] for k in ks} for ks in first_epoch]
    assert [len(s) for s in shards] == [2, 2] and not shards[0] & shards[1]
    # the second epoch reshuffles but keeps the split disjoint
    second = [[k for line in lines if line["epoch"] == 1 for k in line["keys"]] for lines in per_rank]
    assert all(second) and not set(second[0]) & set(second[1])

    losses = train_losses(clip_two_ranks / "run")
    assert sorted(losses) == list(range(8)) and all(torch.isfinite(torch.tensor(list(losses.values()))))
    assert last_checkpoint(clip_two_ranks / "run")["global_step"] == 8


def test_metalm_demo_recipe_two_ranks_train_on_disjoint_shards(demo_set, tmp_path):
    root, keys = tmp_path / "run", tmp_path / "keys"
    output = torchrun([
        "--config", str(ROOT / "recipes/metalm/demo.yaml"),
        "--data.init_args.seq_len", "64", "--data.init_args.spans", '{"min_len": 4, "max_len": 8, "coverage": 0.25}',
        "--data.batch_size", "2", "--data.num_workers", "2", "--data.mode", "epoch",
        "--model.init_args.overrides", METALM_TINY, *COMMON, "--trainer.devices", "2",
        "--trainer.max_steps", "4", "--trainer.limit_val_batches", "0",
        "--trainer.default_root_dir", str(root), "--checkpoint.every_n_train_steps", "2",
        "--trainer.callbacks+=tests.tasks._rank_keys.RecordKeys", f"--trainer.callbacks.directory={keys}",
    ], tmp_path)
    assert "max_steps=4" in output
    # the demo text set has 4 training shards: with 2 ranks x 2 workers, each rank reads 2 of them
    shards = []
    for rank in (0, 1):
        lines = read_keys(keys, rank)
        assert [line["step"] for line in lines] == [0, 1, 2, 3]
        shards.append({k.rsplit(":", 1)[0] for line in lines for k in line["keys"]})
    assert shards[0] and shards[1] and not shards[0] & shards[1]
    assert all(s.endswith(".tar") for s in shards[0] | shards[1])

    losses = train_losses(root)
    assert sorted(losses) == [0, 1, 2, 3] and all(v == v and v < 20 for v in losses.values())
    checkpoint = last_checkpoint(root)
    assert checkpoint["global_step"] == 4
    assert any(name.startswith("model.") for name in checkpoint["state_dict"])


def test_a_checkpoint_saved_under_ddp_resumes_on_two_ranks_to_the_uninterrupted_weights(
        clip_two_ranks, image_shards, tmp_path):
    """SIGUSR1 reaches rank 1 only, in the middle of step 5 (not a scheduled checkpoint step): both ranks agree to
    stop, step 5 is saved, the run exits cleanly; ``--ckpt_path last`` on 2 ranks then ends at the weights of
    the uninterrupted run, having trained on the same batches for steps 5 to 7 on each rank."""
    root, keys = tmp_path / "run", tmp_path / "keys"
    stopped = torchrun(clip_args(
        image_shards, root, keys, "--trainer.devices", "2",
        "--trainer.callbacks+=tests.tasks.test_torchrun.SignalOneRank", "--trainer.callbacks.step=5",
        "--trainer.callbacks.rank=1"), tmp_path, "stopped")
    # rank 0 saves; it names the signal only when it got it itself (else "SIGTERM", the only other cause)
    assert "received; saved step 5" in stopped
    assert last_checkpoint(root)["global_step"] == 5

    resumed = torchrun(clip_args(image_shards, root, keys, "--trainer.devices", "2", "--ckpt_path", "last"),
                       tmp_path, "resumed")
    assert "--ckpt_path last: resuming from" in resumed
    reference = clip_two_ranks
    got = last_checkpoint(root, version=1)
    assert got["global_step"] == 8
    assert_same_weights(got["state_dict"], last_checkpoint(reference / "run")["state_dict"])
    for rank in (0, 1):
        assert batches_by_step(keys, rank) == batches_by_step(reference / "keys", rank)


def test_a_two_node_launch_on_one_host_trains_like_one_node(clip_two_ranks, image_shards, tmp_path):
    """Two torchrun launches (--nnodes 2, node ranks 0 and 1, 1 process each, c10d rendezvous on one endpoint)
    with trainer.num_nodes 2 and trainer.devices 1: the same losses, weights and per-rank samples as the
    one-node, 2-process run of the same global batch."""
    root, keys = tmp_path / "run", tmp_path / "keys"
    fit_args = clip_args(image_shards, root, keys, "--trainer.num_nodes", "2", "--trainer.devices", "1")
    for attempt in range(3):  # another test may take the port between free_port() and the rendezvous
        endpoint = f"127.0.0.1:{free_port()}"
        logs = [tmp_path / f"node{node}-{attempt}.log" for node in (0, 1)]
        procs = [
            start(["--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                   "--rdzv-endpoint", endpoint, "--rdzv-id", f"two-node-{attempt}", "--rdzv-conf",
                   "join_timeout=120", "--max-restarts", "0"], fit_args, tmp_path, log)
            for node, log in zip((0, 1), logs)
        ]
        outputs = wait_all(procs, logs, timeout=300)
        if all(p.returncode == 0 for p in procs):
            break
        if "address already in use" not in "".join(outputs).lower():
            pytest.fail("two-node launch failed:\n" + "\n".join(f"--- node {n}\n{o[-3000:]}"
                                                                 for n, o in enumerate(outputs)))
    else:
        pytest.fail("two-node launch: the rendezvous port was taken three times")

    reference = clip_two_ranks
    got, expected = train_losses(root), train_losses(reference / "run")
    assert sorted(got) == sorted(expected) == list(range(8))
    for step in expected:
        assert abs(got[step] - expected[step]) <= 1e-5, (step, got[step], expected[step])
    assert_same_weights(last_checkpoint(root)["state_dict"], last_checkpoint(reference / "run")["state_dict"])
    for rank in (0, 1):
        assert batches_by_step(keys, rank) == batches_by_step(reference / "keys", rank)
