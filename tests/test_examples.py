"""The SLURM examples parse as bash, and every flag they pass to torchrun and to ``mmpretrain fit`` exists."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLURM = sorted((ROOT / "examples/slurm").glob("*.sbatch"))
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def code_lines(path: Path) -> str:
    """The script without comments (an ``#SBATCH`` line is a comment to bash but not to sbatch: kept)."""
    lines = []
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") and not stripped.startswith("#SBATCH"):
            continue
        lines.append(line.split(" # ", 1)[0] if not stripped.startswith("#SBATCH") else line)
    return "\n".join(lines)


def help_text(*args: str) -> str:
    out = subprocess.run([sys.executable, *args, "--help"], env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.fixture(scope="module")
def fit_help() -> str:
    return help_text("-m", "mmpretrain", "fit")


def test_there_are_two_slurm_examples():
    assert {p.name for p in SLURM} == {"train.sbatch", "train_srun.sbatch"}


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("script", SLURM, ids=lambda p: p.name)
def test_the_script_parses(script):
    out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("script", SLURM, ids=lambda p: p.name)
def test_the_mmpretrain_flags_exist(script, fit_help):
    code = code_lines(script)
    assert "mmpretrain fit --config" in code
    flags = set(re.findall(r"(--(?:trainer|checkpoint|data|model)\.[A-Za-z_.]+|--ckpt_path|--config)\b", code))
    assert {"--trainer.num_nodes", "--trainer.devices", "--ckpt_path"} <= flags
    for flag in flags:
        assert re.search(rf"{re.escape(flag)}\b", fit_help), f"{script.name}: `mmpretrain fit` has no {flag}"
    # resuming is on by default, and into the same directory on every requeue
    assert re.search(r"--ckpt_path last\b", code)
    assert "--checkpoint.dirpath" in flags and "--trainer.default_root_dir" in flags


def test_the_torchrun_flags_exist():
    code = code_lines(ROOT / "examples/slurm/train.sbatch")
    start = re.search(r"^\s*torchrun ", code, re.M)
    assert start, "train.sbatch: no torchrun command"
    command = code[start.start() : code.index("-m mmpretrain fit")]
    flags = set(re.findall(r"--[a-z][a-z-]+", command))
    assert {"--nnodes", "--nproc-per-node", "--rdzv-backend", "--rdzv-endpoint"} <= flags
    torchrun_help = help_text("-m", "torch.distributed.run")
    for flag in flags:
        assert flag in torchrun_help, f"train.sbatch: torchrun has no {flag}"
    assert "--rdzv-backend c10d" in command


@pytest.mark.parametrize("script", SLURM, ids=lambda p: p.name)
def test_the_time_limit_signal_reaches_the_batch_script_and_is_passed_on(script):
    code = code_lines(script)
    assert re.search(r"^#SBATCH --signal=B:USR1@\d+", code, re.M)
    assert re.search(r"^#SBATCH --requeue", code, re.M)
    assert re.search(r"^trap forward_usr1 USR1", code, re.M)
    assert "kill -USR1" in code or "pkill -USR1 -P" in code
    # a signal interrupts `wait`; the script must wait again for the training step to end
    assert re.search(r"while true; do\s+wait", code)
