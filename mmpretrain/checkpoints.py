"""Training checkpoints: written atomically, kept by step, saved when the scheduler signals, read safely.

- :class:`AtomicCheckpointIO` writes each checkpoint to a temporary file in the target directory, flushes
  it to disk and renames it into place: a crash or a kill mid-write leaves the previous file whole.
- :class:`StepCheckpoint` (the CLI's ``checkpoint.*``) is Lightning's ``ModelCheckpoint`` that saves every
  ``every_n_train_steps`` steps, at the end of training, and at the first step boundary after SIGUSR1 or
  SIGTERM, then stops; with ``monitor: step`` (the CLI's default) ``save_top_k: K`` keeps the last ``K``.
- :func:`find_last_checkpoint` is what ``--ckpt_path last`` means: the newest ``last*.ckpt`` (or SLURM
  ``hpc_ckpt_*.ckpt``) under the run directory, across logger versions; a DeepSpeed ZeRO checkpoint, which
  is a *directory* ``last.ckpt/`` (one shard of weights and optimizer state per rank, written by DeepSpeed's
  engine, not by a checkpoint IO), counts as one.
- :func:`read_checkpoint` loads with ``weights_only=True``; given a ZeRO directory it first consolidates the
  shards into one full fp32 state dict (:func:`read_zero_checkpoint`, needs ``deepspeed``);
  :func:`check_state_dict_fits` names the missing, unexpected and reshaped keys of a checkpoint from another
  model.

Under DeepSpeed, ``save_last: true`` becomes ``"link"``: ``last.ckpt`` is a symbolic link to the newest step
directory rather than a second full copy of every shard (DeepSpeed writes into the directory in place, so a
separate step directory also keeps the previous complete checkpoint should a write be cut short).

See docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

log = logging.getLogger("mmpretrain")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message says why and what to do."""


# -- reading -----------------------------------------------------------------------------------------------
def is_zero_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a DeepSpeed checkpoint directory (Lightning's ``x.ckpt/`` under DeepSpeed): it holds a
    ``latest`` file naming its tag, or a tag directory with ``*model_states.pt`` shards."""
    path = Path(path)
    if not path.is_dir():
        return False
    if (path / "latest").is_file():
        return True
    return any(path.glob("*/*model_states.pt"))


def read_zero_checkpoint(path: str | Path, what: str = "--checkpoint") -> dict[str, Any]:
    """Consolidate a DeepSpeed ZeRO checkpoint directory (stage 1, 2 or 3, any number of ranks) into one
    Lightning-style checkpoint dict with the full fp32 ``state_dict`` (Lightning's
    ``convert_zero_checkpoint_to_fp32_state_dict``, written to a temporary file and removed).

    DeepSpeed's shards are pickles (``weights_only=False``): consolidate only directories you trust. Needs the
    ``deepspeed`` package (``pip install 'mmpretrain[deepspeed]'``), not a GPU."""
    path = Path(path)
    if not is_zero_checkpoint(path):
        raise CheckpointError(f"{what} {path}: a directory, but not a DeepSpeed checkpoint (no 'latest' file and no "
                              f"*model_states.pt shards inside); pass a .ckpt file or a ZeRO checkpoint directory")
    if importlib.util.find_spec("deepspeed") is None:
        raise CheckpointError(f"{what} {path}: a DeepSpeed ZeRO checkpoint directory; consolidating its shards needs "
                              f"DeepSpeed: pip install 'mmpretrain[deepspeed]' (no GPU needed)")
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    with tempfile.TemporaryDirectory(prefix="mmpretrain-zero-") as tmp:
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # it prints the temporary path
                checkpoint = convert_zero_checkpoint_to_fp32_state_dict(path, Path(tmp) / "consolidated.ckpt")
        except Exception as err:  # DeepSpeed raises anything from a missing shard to an unreadable pickle
            raise CheckpointError(f"{what} {path}: the DeepSpeed checkpoint cannot be consolidated "
                                  f"({type(err).__name__}: {err}); is a rank's shard missing or cut short?") from None
    log.info("%s %s: ZeRO shards consolidated into %d fp32 tensors", what, path, len(checkpoint["state_dict"]))
    return checkpoint


def read_checkpoint(path: str | Path, what: str = "--checkpoint") -> dict[str, Any]:
    """Load a Lightning checkpoint with ``weights_only=True`` (no pickled code runs); ``what`` names the field.
    A DeepSpeed ZeRO checkpoint directory is consolidated first (:func:`read_zero_checkpoint`)."""
    path = Path(path)
    if path.is_dir():
        return read_zero_checkpoint(path, what)
    if not path.is_file():
        raise CheckpointError(f"{what} {path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{what} {path}: not a readable checkpoint ({type(err).__name__}: {err})") from None


def sub_state_dict(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under ``prefix`` (``"model.visual.trunk."``) with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _listed(keys: list[str], most: int = 5) -> str:
    return ", ".join(keys[:most]) + (f" ... ({len(keys)} in all)" if len(keys) > most else "")


def check_state_dict_fits(own: dict[str, torch.Tensor], saved: dict[str, Any], what: str, saved_by: str | None = None,
                          hint: str = "") -> None:
    """Raise :class:`CheckpointError` naming the keys in which ``saved`` does not fit ``own`` (missing,
    unexpected, other shapes); ``what`` names the field the checkpoint came from (``--ckpt_path x.ckpt``)."""
    missing = sorted(set(own) - set(saved))
    unexpected = sorted(set(saved) - set(own))
    reshaped = sorted(
        f"{k} {tuple(saved[k].shape)} in the checkpoint, {tuple(own[k].shape)} here"
        for k in set(own) & set(saved)
        if isinstance(saved[k], torch.Tensor) and isinstance(own[k], torch.Tensor) and saved[k].shape != own[k].shape
    )
    if not (missing or unexpected or reshaped):
        return
    parts = []
    if missing:
        parts.append(f"missing keys: {_listed(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_listed(unexpected)}")
    if reshaped:
        parts.append(f"other shapes: {_listed(reshaped, 3)}")
    origin = f" (saved by {saved_by})" if saved_by else ""
    raise CheckpointError(f"{what}: the checkpoint{origin} does not fit this model; " + "; ".join(parts) + ". " + hint)


# -- writing -----------------------------------------------------------------------------------------------
class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``torch.save`` checkpoint IO, made crash-safe on local file systems.

    A checkpoint is written to a temporary file beside its target, flushed and fsynced, then renamed over
    the target with ``os.replace`` (atomic on POSIX), and the directory entry is fsynced: a reader sees
    either the previous complete file or the new complete file, never a partial one, whatever happens
    mid-write (SIGKILL, node failure, full disk). Remote URLs (``s3://`` ...) go through Lightning's own
    writer. Loading uses ``weights_only=True`` unless the caller asks otherwise, and refuses ``http(s)``
    URLs: nothing is downloaded at run time.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        fs = get_filesystem(path)
        if storage_options is not None or "file" not in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(str(path).removeprefix("file://"))
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(target, lambda f: torch.save(checkpoint, f))

    def load_checkpoint(self, path: Any, map_location: Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        if str(path).startswith(("http://", "https://")):
            raise CheckpointError(f"checkpoint {path}: mmpretrain downloads nothing at run time; download the file "
                                  f"and pass its local path")
        return super().load_checkpoint(path, map_location=map_location,
                                       weights_only=True if weights_only is None else weights_only)


def write_atomically(target: Path, write: Any) -> None:
    """Call ``write(file)`` on a temporary file beside ``target``, fsync it and rename it to ``target``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    try:  # the rename itself survives a power cut only once the directory is on disk
        dir_fd = os.open(target.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def install_atomic_checkpoint_io(trainer: Trainer) -> None:
    """Make the trainer write checkpoints with :class:`AtomicCheckpointIO` where it uses plain ``torch.save``
    (strategies with their own IO are left alone: DeepSpeed saves through its engine, a user's plugin its way)."""
    strategy = trainer.strategy
    if isinstance(strategy, DeepSpeedStrategy):
        return
    if type(getattr(strategy, "checkpoint_io", None)) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


# -- finding -----------------------------------------------------------------------------------------------
def _is_checkpoint(path: Path) -> bool:
    return path.is_file() or is_zero_checkpoint(path)


def checkpoint_mtime(path: Path) -> int:
    """When a checkpoint was last written (ns): a file's mtime; for a ZeRO directory (or a link to one), the
    newest of the files inside it (DeepSpeed rewrites the files of a directory in place)."""
    if path.is_file():
        return path.stat().st_mtime_ns
    times = [p.stat().st_mtime_ns for p in path.resolve().rglob("*") if p.is_file()]
    return max(times, default=path.stat().st_mtime_ns)


def find_last_checkpoint(*roots: str | Path | None) -> Path | None:
    """The most recently written ``last*.ckpt`` under ``roots`` (searched recursively: every logger version
    of a run) or SLURM ``hpc_ckpt_*.ckpt`` directly in them; a ``last.ckpt`` may be a DeepSpeed checkpoint
    directory (or a link to one). None when there is none."""
    found: list[Path] = []
    for root in roots:
        if root is None or not Path(root).is_dir():
            continue
        root = Path(root)
        found.extend(p for p in root.rglob("last*.ckpt") if _is_checkpoint(p))
        found.extend(p for p in root.glob("hpc_ckpt_*.ckpt") if _is_checkpoint(p))
    if not found:
        return None
    return max(found, key=lambda p: (checkpoint_mtime(p), str(p)))


# -- saving on schedule and on signals ----------------------------------------------------------------------
class StepCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` for step-based pretraining; takes the same arguments.

    In addition to what ``ModelCheckpoint`` does:

    - at the end of training it saves a checkpoint of the final step (and ``last.ckpt``) if the last
      scheduled one was earlier;
    - on SIGUSR1 (or the requeue signal of a SLURM environment) and on SIGTERM it saves a checkpoint at the
      next step boundary (all ranks agree on the step) and stops training cleanly. Under SLURM with
      Lightning's auto-requeue, Lightning's own requeue handler runs at that boundary instead of from the
      signal handler (it writes ``hpc_ckpt_N.ckpt``, which Lightning restores on the requeued job, and
      calls ``scontrol requeue``). SIGTERM is received through Lightning's handler
      (``trainer.received_sigterm``); one arriving during validation saves from ``on_exception``;
    - manual optimization saves like automatic optimization (the weights after the step).

    The CLI's defaults: ``every_n_train_steps: 1000``, ``filename: step{step:08d}``, ``monitor: step``,
    ``mode: max``, ``save_top_k: -1`` (keep all; ``K`` keeps the last ``K``), ``save_last: true``.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._signal_received: int | None = None
        self._previous_handlers: dict[int, Any] = {}

    # -- signals -------------------------------------------------------------------------------------------
    @staticmethod
    def _requeue_environment(trainer: Trainer) -> SLURMEnvironment | None:
        # where Lightning's signal connector looks (single-device strategies hold no cluster environment)
        connector = getattr(trainer, "_accelerator_connector", None)
        env = getattr(connector, "cluster_environment", None) or getattr(trainer.strategy, "cluster_environment", None)
        return env if isinstance(env, SLURMEnvironment) and env.auto_requeue else None

    def _signals(self, trainer: Trainer) -> set[int]:
        signals = set()
        if hasattr(signal, "SIGUSR1"):
            signals.add(int(signal.SIGUSR1))
        env = self._requeue_environment(trainer)
        if env is not None and env.requeue_signal is not None:
            signals.add(int(env.requeue_signal))
        return signals

    def _on_signal(self, signum: int, frame: Any) -> None:
        # only note it: the checkpoint is written at the next step boundary, never from inside a step
        self._signal_received = signum

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if isinstance(trainer.strategy, DeepSpeedStrategy) and self.save_last is True and self.save_top_k != 0:
            # a link to the newest step directory instead of a second full write of every shard
            self.save_last = "link"
        # registered before Lightning registers its own (after the setup hooks): Lightning then leaves the
        # requeue signal to us, and we call its requeue handler at a step boundary
        if stage == "fit" and threading.current_thread() is threading.main_thread():
            for signum in self._signals(trainer):
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._previous_handlers.items():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous_handlers = {}
        super().teardown(trainer, pl_module, stage)

    def _stop_requested(self, trainer: Trainer) -> bool:
        local = self._signal_received is not None or bool(trainer.received_sigterm)
        if trainer.world_size > 1:
            return trainer.strategy.reduce_boolean_decision(local, all=False)
        return local

    # -- saving --------------------------------------------------------------------------------------------
    def _save_now(self, trainer: Trainer) -> None:
        """Save a checkpoint of the current step (top-k bookkeeping included) and ``last.ckpt``."""
        if self._should_skip_saving_checkpoint(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        if self.monitor is None or self.monitor in candidates:
            self._save_topk_checkpoint(trainer, candidates)
        if self._last_global_step_saved != trainer.global_step:  # not a top-k save: write it anyway
            self._save_checkpoint(trainer, self.format_checkpoint_name(candidates))
        self._save_last_checkpoint(trainer, candidates)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._stop_requested(trainer):
            self._preempted(trainer)
            return
        if self.monitor not in (None, "step", "epoch") and pl_module.automatic_optimization:
            # a logged metric: Lightning's logic, which defers a save to validation when the metric is due then
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        # ranked by step (or not ranked) the metric is always there: save on schedule, never deferred (Lightning
        # would defer the save of an epoch's last step to a validation that may not come); under manual
        # optimization, the step's weights as with automatic optimization (Lightning's own manual branch warns at
        # every save about a pre-step copy of the weights that we do not want)
        due = self._every_n_train_steps >= 1 and trainer.global_step % self._every_n_train_steps == 0
        interval = self._train_time_interval
        if interval is not None:
            now = time.monotonic()
            elapsed = self._last_time_checked is not None and now - self._last_time_checked >= interval.total_seconds()
            if trainer.strategy.broadcast(elapsed):
                self._last_time_checked = now
                due = True
        if not due or self._should_skip_saving_checkpoint(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        if self.monitor is not None and self.monitor not in candidates:
            self._defer_save_until_validation = True
            return
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    def _preempted(self, trainer: Trainer) -> None:
        signum = self._signal_received
        if signum is not None:
            name = signal.Signals(signum).name
        elif trainer.received_sigterm:
            name = "SIGTERM"
        else:  # this rank saw no signal: another rank did, and all stop together
            name = "a stop signal on another rank"
        env = self._requeue_environment(trainer)
        if env is not None and signum is not None and signum == env.requeue_signal:
            rank_zero_info(f"mmpretrain: {name} at step {trainer.global_step}: saving and requeueing through "
                           f"Lightning's SLURM handler")
            trainer._signal_connector._slurm_sigusr_handler_fn(signum, None)
        else:
            self._save_now(trainer)
            rank_zero_info(f"mmpretrain: {name} received; saved step {trainer.global_step} "
                           f"({self.last_model_path or self._last_checkpoint_saved}) and stopping; resume with "
                           f"--ckpt_path last")
        self._signal_received = None
        trainer.should_stop = True

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # the final step, when the schedule did not fall on it
        if trainer.global_step > 0 and self._last_global_step_saved != trainer.global_step:
            self._save_now(trainer)
        super().on_train_end(trainer, pl_module)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # Lightning raises SIGTERMException at a step boundary (or inside validation, between steps)
        if isinstance(exception, SIGTERMException) and not trainer.sanity_checking:
            self._save_now(trainer)
            return
        super().on_exception(trainer, pl_module, exception)
