"""Counts of what the data pipeline skipped, shared between dataloader workers and the trainer.

Workers are separate processes; they add to counters in shared memory, and the
:class:`DataStatsMonitor` callback logs the totals as metrics (``data/train_skipped`` ...), so a run
that silently loses samples shows it in TensorBoard and the CSV log.
"""

from __future__ import annotations

import logging
import multiprocessing as mp

import lightning.pytorch as pl

log = logging.getLogger("mmpretrain.data")

SAMPLE_REASONS = (
    "bad_image",
    "missing_image",
    "missing_caption",
    "bad_caption",
    "missing_label",
    "bad_label",
    "missing_text",
    "bad_text",
    "bad_sample",
)
SHARD_REASONS = ("corrupt_shard", "empty_shard", "missing_shard")
REASONS = SAMPLE_REASONS + SHARD_REASONS


class DataStats:
    """Per-reason counters in shared memory (safe to pickle into dataloader workers)."""

    def __init__(self, start_method: str | None = None) -> None:
        # shared memory of the same multiprocessing context as the workers that will write to it
        self._counts = mp.get_context(start_method).Array("q", len(REASONS), lock=True)

    def add(self, reason: str, n: int = 1) -> None:
        i = REASONS.index(reason) if reason in REASONS else REASONS.index("bad_sample")
        with self._counts.get_lock():
            self._counts[i] += n

    def snapshot(self) -> dict[str, int]:
        with self._counts.get_lock():
            return {r: int(c) for r, c in zip(REASONS, self._counts[:]) if c}

    @property
    def skipped_samples(self) -> int:
        snap = self.snapshot()
        return sum(snap.get(r, 0) for r in SAMPLE_REASONS)

    @property
    def bad_shards(self) -> int:
        snap = self.snapshot()
        return sum(snap.get(r, 0) for r in SHARD_REASONS)

    def reset(self) -> None:
        with self._counts.get_lock():
            for i in range(len(REASONS)):
                self._counts[i] = 0


class DataStatsMonitor(pl.Callback):
    """Logs the data module's skip counters (``data/<split>_skipped``, ``data/<split>_bad_shards``).

    Works with any data module that has a ``stats`` mapping of split name to :class:`DataStats`. The training
    counters are logged every ``logging_interval`` steps (default: the trainer's ``log_every_n_steps``), at
    the end of each epoch and at the end of training; validation's after each validation. They are running
    totals of this rank since the start of training (restored on resume, see ``ShardLoader``), not
    per-step means. What was skipped, by reason, is also written to the log at each epoch's end and when
    training ends.

    Args:
        logging_interval: log the training counters every this many optimizer steps; None for the trainer's
            ``log_every_n_steps``.
    """

    def __init__(self, logging_interval: int | None = None) -> None:
        self.logging_interval = logging_interval

    @staticmethod
    def _stats(trainer: pl.Trainer) -> dict[str, DataStats] | None:
        return getattr(trainer.datamodule, "stats", None) if trainer.datamodule is not None else None

    def _log(self, trainer: pl.Trainer, split: str) -> None:
        stats = self._stats(trainer)
        if not stats or split not in stats:
            return
        s = stats[split]
        # logged directly to the loggers: the values are running totals, not per-step means
        metrics = {f"data/{split}_skipped": float(s.skipped_samples), f"data/{split}_bad_shards": float(s.bad_shards)}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def _report(self, trainer: pl.Trainer) -> None:
        stats = self._stats(trainer)
        if stats and "train" in stats and stats["train"].snapshot():
            log.warning("data: skipped so far in training: %s", stats["train"].snapshot())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        interval = self.logging_interval or trainer.log_every_n_steps or 50
        if trainer.global_step % interval == 0:
            self._log(trainer, "train")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._log(trainer, "train")
        self._report(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._log(trainer, "train")
        self._report(trainer)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._log(trainer, "val")
