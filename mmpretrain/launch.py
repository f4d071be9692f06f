"""Does the trainer agree with the launcher that started its processes?

``torchrun --nnodes N --nproc-per-node P`` (or ``srun`` with one task per GPU) decides how many processes
run; ``trainer.num_nodes`` and ``trainer.devices`` say how many Lightning expects. When they differ,
Lightning fails clearly in one case only (a DDP-family strategy whose ``num_nodes * devices`` differs
from ``WORLD_SIZE``). In the others it goes wrong quietly: ``--trainer.devices 1`` under a 2-process
torchrun gives each process a single-device trainer that trains alone on the whole data set, all of them
writing the same checkpoints; a node count that is wrong while the product is right splits devices wrongly.
:func:`check_trainer_matches_launch` stops such a run at start, naming both sides and what to change.

The CLI calls it once the trainer exists, before anything is trained.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["LaunchMismatchError", "LauncherWorld", "check_launch", "check_trainer_matches_launch", "launcher_world"]


class LaunchMismatchError(RuntimeError):
    """The trainer's ``num_nodes * devices`` differs from the processes the launcher started."""


@dataclass(frozen=True)
class LauncherWorld:
    """The processes a launcher started, as it told them through the environment.

    Args:
        launcher: ``"torchrun"`` or ``"srun"``.
        world_size: processes in all.
        nodes: nodes (torchrun's ``--nnodes``, srun's node count).
        per_node: processes on this node (torchrun's ``--nproc-per-node``); None when the launcher does
            not say (srun with an uneven task distribution).
    """

    launcher: str
    world_size: int
    nodes: int
    per_node: int | None

    def describe(self) -> str:
        if self.launcher == "torchrun":
            return (f"torchrun started {self.world_size} processes (--nnodes {self.nodes} x --nproc-per-node "
                    f"{self.per_node})")
        per_node = f", {self.per_node} per node" if self.per_node is not None else ""
        return f"srun started {self.world_size} tasks on {self.nodes} nodes{per_node}"


def _int(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        # SLURM writes repeated counts as "8(x2)"
        head = value.split("(", 1)[0].split(",", 1)[0]
        return int(head) if head.isdigit() else None


def launcher_world(environ: Mapping[str, str] | None = None) -> LauncherWorld | None:
    """What torchrun (``TORCHELASTIC_RUN_ID`` set) or an ``srun`` step (``SLURM_STEP_NUM_TASKS`` set) started;
    None for a plain process (a single run, or Lightning launching its own processes)."""
    env = os.environ if environ is None else environ
    if env.get("TORCHELASTIC_RUN_ID") is not None:  # how torch.distributed.is_torchelastic_launched() tells
        world, local = _int(env, "WORLD_SIZE"), _int(env, "LOCAL_WORLD_SIZE")
        if world is None or local is None:
            return None
        nodes = _int(env, "GROUP_WORLD_SIZE") or max(world // max(local, 1), 1)
        return LauncherWorld("torchrun", world, nodes, local)
    # inside an srun step (not the batch script itself), unless the job is named as an interactive one, which
    # Lightning takes as "do not use SLURM's process layout"
    if env.get("SLURM_STEP_NUM_TASKS") is not None and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        world = _int(env, "SLURM_STEP_NUM_TASKS")
        nodes = _int(env, "SLURM_STEP_NUM_NODES") or _int(env, "SLURM_NNODES") or 1
        if world is None:
            return None
        per_node = _int(env, "SLURM_STEP_TASKS_PER_NODE") or _int(env, "SLURM_NTASKS_PER_NODE")
        if world == 1:  # one task: an ordinary single-process run started through srun
            return None
        return LauncherWorld("srun", world, nodes, per_node)
    return None


def check_launch(num_nodes: int, devices_per_node: int, environ: Mapping[str, str] | None = None) -> None:
    """Raise :class:`LaunchMismatchError` when ``num_nodes`` x ``devices_per_node`` does not describe the
    processes the launcher started (total, nodes and processes per node); do nothing outside a launcher."""
    world = launcher_world(environ)
    if world is None:
        return
    expected = num_nodes * devices_per_node
    nodes_differ = world.nodes != num_nodes
    per_node_differs = world.per_node is not None and world.per_node != devices_per_node
    if world.world_size == expected and not nodes_differ and not per_node_differs:
        return
    per_node = world.per_node if world.per_node is not None else world.world_size // max(world.nodes, 1)
    if world.launcher == "torchrun":
        fix = (f"launch with --trainer.num_nodes {world.nodes} --trainer.devices {per_node}, or start torchrun with "
               f"--nnodes {num_nodes} --nproc-per-node {devices_per_node}")
    else:
        fix = (f"launch with --trainer.num_nodes {world.nodes} --trainer.devices {per_node}, or ask SLURM for "
               f"--nodes={num_nodes} --ntasks-per-node={devices_per_node}")
    why = (" (with fewer trainer devices than processes, each process would train alone on the whole data set)"
           if expected < world.world_size else "")
    raise LaunchMismatchError(
        f"{world.describe()}, but the trainer expects trainer.num_nodes {num_nodes} x trainer.devices "
        f"{devices_per_node} = {expected}: {fix}{why}."
    )


def check_trainer_matches_launch(trainer: Any, environ: Mapping[str, str] | None = None) -> None:
    """:func:`check_launch` for a Lightning ``Trainer`` (its ``num_nodes`` and ``num_devices``).

    Call it right after the trainer is built (the CLI's ``instantiate_trainer``), before ``fit``.
    """
    check_launch(int(trainer.num_nodes), int(trainer.num_devices), environ)
