"""The shard stream: an IterableDataset that reads, decodes, shuffles and batches inside the workers.

Three modes:

``resampled`` (training, the pretraining default)
    Each worker draws shards at random (by source weight, then uniformly within the source) forever.
    A virtual epoch is ``samples_per_epoch`` samples; every rank yields exactly
    ``samples_per_epoch // (world_size * batch_size)`` batches.

``epoch`` (training)
    The shard list is shuffled with the same seed on every rank, split by rank, then by worker
    (when there are fewer shards than ranks or workers, shards are shared and split by sample index
    instead). Every rank yields exactly ``total_samples // (world_size * batch_size)`` batches: a worker
    whose part is short starts over on its shards (those samples repeat), one whose part is long stops
    early (the rest of its samples wait for the next epoch, where shards land elsewhere).
    :func:`epoch_tail` says how many samples repeat and drop; the data module logs it.

``eval`` (validation, test, predict)
    Shards split like ``epoch`` mode, no shuffling, no repetition, the last batch may be short: each
    sample is seen exactly once across all ranks and workers, in the same order on every run.

Randomness (shard order, shuffle buffer, augmentation in workers) derives from
``(seed, epoch, rank, worker)``, so a run is reproducible for a given seed and world size.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmpretrain.data.decode import SkipSample
from mmpretrain.data.shards import ShardReadError, iter_shard_samples
from mmpretrain.data.stats import DataStats

log = logging.getLogger("mmpretrain.data")

Mode = Literal["resampled", "epoch", "eval"]
# maps a stream of raw samples to a stream of processed items (decode, augment, tokenize, pack ...)
Process = Callable[[Iterator[dict], random.Random], Iterator[Any]]

_MAX_SKIP_WARNINGS = 5


@dataclass(frozen=True)
class Part:
    """What one (rank, worker) slot reads: shard indices, and samples ``i`` with ``i % modulus == remainder``."""

    shards: tuple[int, ...]
    modulus: int = 1
    remainder: int = 0

    def num_samples(self, counts: Sequence[int]) -> int:
        return sum(max(0, math.ceil((counts[s] - self.remainder) / self.modulus)) for s in self.shards)


def partition(num_shards: int, rank: int, world_size: int, worker: int, num_workers: int) -> Part:
    """Split ``num_shards`` by rank, then by worker; exact: every sample lands in exactly one part."""
    shards, modulus, remainder = list(range(num_shards)), 1, 0
    for index, count in ((rank, world_size), (worker, num_workers)):
        if count <= 1:
            continue
        if len(shards) >= count:
            shards = shards[index::count]
        else:  # too few shards: everyone reads them all and keeps every count-th sample
            remainder, modulus = remainder + modulus * index, modulus * count
    return Part(tuple(shards), modulus, remainder)


def worker_quota(batches: int, worker: int, num_workers: int) -> int:
    """Batches worker ``worker`` yields so that the workers of a rank yield ``batches`` in all."""
    return batches // num_workers + (1 if worker < batches % num_workers else 0)


def epoch_tail(counts: Sequence[int], world_size: int, num_workers: int, batch_size: int, batches: int) -> tuple[int, int]:
    """(samples repeated, samples left out) per epoch in ``epoch`` mode, over all ranks (shard order aside)."""
    repeated = dropped = 0
    for rank in range(world_size):
        for worker in range(num_workers):
            have = partition(len(counts), rank, world_size, worker, num_workers).num_samples(counts)
            need = worker_quota(batches, worker, num_workers) * batch_size
            repeated += max(0, need - have)
            dropped += max(0, have - need)
    return repeated, dropped


def make_rng(*parts: Any) -> random.Random:
    return random.Random("/".join(str(p) for p in parts))


class ShardStream(IterableDataset):
    """Batches of processed samples from tar shards; see the module docstring for the modes.

    Args:
        urls: shard URLs (all sources concatenated).
        counts: samples per shard (None where unknown).
        process: maps raw samples to items; raise :class:`SkipSample` per bad sample via :func:`map_samples`.
        collate: turns a list of items into a batch.
        batch_size: items per batch (per rank).
        mode: ``"resampled"``, ``"epoch"`` or ``"eval"``.
        source_ids, source_weights: for resampled mode, the source of each URL and each source's weight.
        samples_per_epoch: the virtual epoch length (all ranks together); defaults to the total count.
        shuffle_buffer: items held for shuffling in each worker (0: none); eval mode never shuffles.
        seed: base seed.
        rank, world_size: this process's place among the data-parallel ranks.
        num_workers: the DataLoader's worker count (batch quotas are split among them).
        stats: shared skip counters.
        strict: raise on the first bad sample or shard instead of skipping it.
        name: for messages (``"train"``, ``"val"``).
        start_method: the multiprocessing start method of the DataLoader's workers (shared counters
            must be made in the same context).
    """

    def __init__(
        self,
        urls: Sequence[str],
        counts: Sequence[int | None],
        process: Process,
        collate: Callable[[list], Any],
        batch_size: int,
        mode: Mode = "resampled",
        source_ids: Sequence[int] | None = None,
        source_weights: Sequence[float] | None = None,
        samples_per_epoch: int | None = None,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        stats: DataStats | None = None,
        strict: bool = False,
        name: str = "train",
        start_method: str | None = None,
    ) -> None:
        super().__init__()
        if mode not in ("resampled", "epoch", "eval"):
            raise ValueError(f"mode must be 'resampled', 'epoch' or 'eval', got {mode!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not urls:
            raise ValueError(f"{name}: no shards")
        self.urls = list(urls)
        self.counts = list(counts)
        self.process = process
        self.collate = collate
        self.batch_size = batch_size
        self.mode = mode
        self.source_ids = list(source_ids) if source_ids is not None else [0] * len(self.urls)
        self.source_weights = list(source_weights) if source_weights is not None else [1.0]
        self.shuffle_buffer = shuffle_buffer if mode != "eval" else 0
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_workers = max(1, num_workers)
        self.stats = stats if stats is not None else DataStats(start_method)
        self.strict = strict
        self.name = name
        self._epoch = mp.get_context(start_method).Value("q", -1)
        known = all(c is not None for c in self.counts)
        self.total_samples = sum(self.counts) if known else None  # type: ignore[arg-type]
        self.batches_per_rank: int | None = None
        if mode != "eval":
            samples = samples_per_epoch if samples_per_epoch is not None else self.total_samples
            if samples is None:
                raise ValueError(
                    f"{name}: the sample counts of some shards are unknown (no index.json beside them, not "
                    f"local); set samples_per_epoch"
                )
            self.batches_per_rank = samples // (world_size * batch_size)
            if self.batches_per_rank < 1:
                raise ValueError(
                    f"{name}: {samples} samples per epoch make no full batch of {batch_size} on each of "
                    f"{world_size} ranks; lower the batch size or add data"
                )
        elif known:
            self.batches_per_rank = sum(
                math.ceil(partition(len(self.urls), rank, world_size, w, self.num_workers).num_samples(self.counts) / batch_size)
                for w in range(self.num_workers)
            )

    # -- epochs ---------------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return max(0, self._epoch.value)

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration runs (each new iterator over the loader advances it by one)."""
        self._epoch.value = epoch - 1

    def next_epoch(self) -> int:
        with self._epoch.get_lock():
            self._epoch.value += 1
            return self._epoch.value

    def __len__(self) -> int:
        if self.batches_per_rank is None:
            raise TypeError(f"{self.name}: length unknown (shard sample counts unknown)")
        return self.batches_per_rank

    def shard_order(self, epoch: int) -> list[int]:
        """Epoch mode: the shard order of ``epoch``, the same on every rank (then split by rank and worker)."""
        order = list(range(len(self.urls)))
        make_rng(self.seed, epoch, "order").shuffle(order)
        return order

    def tail(self, epoch: int = 0) -> tuple[int, int]:
        """(repeated, dropped) samples in ``epoch`` over all ranks in epoch mode; (0, 0) otherwise."""
        if self.mode != "epoch" or self.total_samples is None or self.batches_per_rank is None:
            return 0, 0
        counts = [self.counts[s] for s in self.shard_order(epoch)]
        return epoch_tail(counts, self.world_size, self.num_workers, self.batch_size, self.batches_per_rank)  # type: ignore[arg-type]

    # -- iteration ------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if num_workers != self.num_workers:
            raise RuntimeError(
                f"{self.name}: stream configured for {self.num_workers} workers but runs in {num_workers}"
            )
        # eval streams are the same every time they run; training streams change with the epoch
        epoch = "eval" if self.mode == "eval" else self.epoch
        if info is not None:  # augmentations in workers draw from the global RNGs: seed them per slot
            aug_seed = make_rng(self.seed, epoch, self.rank, worker, "augment").getrandbits(63)
            torch.manual_seed(aug_seed)
            random.seed(aug_seed)
            np.random.seed(aug_seed % 2**32)
        rng = make_rng(self.seed, epoch, self.rank, worker)
        if self.mode == "eval":
            part = partition(len(self.urls), self.rank, self.world_size, worker, num_workers)
            items = self.process(self._read(part.shards, part, rng=None), rng)
            yield from self._batches(items, limit=None, keep_last=True)
            return
        quota = worker_quota(self.batches_per_rank, worker, num_workers)  # type: ignore[arg-type]
        if quota == 0:
            return
        if self.mode == "epoch":
            order = self.shard_order(epoch)
            part = partition(len(self.urls), self.rank, self.world_size, worker, num_workers)
            shards = [order[i] for i in part.shards]
            raw = self._cycle(shards, part, rng)
        else:
            raw = shuffled(self._resample(rng), self.shuffle_buffer, rng)
        yield from self._batches(self.process(raw, rng), limit=quota, keep_last=False)

    def _cycle(self, shards: list[int], part: Part, rng: random.Random) -> Iterator[dict]:
        while True:
            order = list(shards)
            rng.shuffle(order)
            got = 0
            # shuffled within the pass: a repeat starts only after every sample of the pass was yielded
            for sample in shuffled(self._read(order, part, rng), self.shuffle_buffer, rng):
                got += 1
                yield sample
            if got == 0:
                raise RuntimeError(
                    f"{self.name}: shards {[self.urls[s] for s in shards]} yielded no sample in a whole pass "
                    f"(all empty or unreadable); remove them from the shard list"
                )

    def _resample(self, rng: random.Random) -> Iterator[dict]:
        by_source: dict[int, list[int]] = {}
        for i, s in enumerate(self.source_ids):
            by_source.setdefault(s, []).append(i)
        sources = sorted(by_source)
        weights = [self.source_weights[s] for s in sources]
        empty_draws = 0
        while True:
            src = rng.choices(sources, weights)[0]
            shard = rng.choice(by_source[src])
            got = 0
            for sample in self._read([shard], Part((shard,)), rng):
                got += 1
                yield sample
            empty_draws = 0 if got else empty_draws + 1
            if empty_draws >= 100 + 10 * len(self.urls):
                raise RuntimeError(f"{self.name}: {empty_draws} shards drawn in a row yielded no sample; check the data")

    def _read(self, shards: Iterable[int], part: Part, rng: random.Random | None) -> Iterator[dict]:
        for s in shards:
            url = self.urls[s]
            n = 0
            errors = self.stats.bad_shards
            for i, sample in enumerate(iter_shard_samples(url, on_shard_error=self._shard_error)):
                n += 1
                if i % part.modulus == part.remainder:
                    yield sample
            expected = self.counts[s]
            if expected is not None and 0 < n < expected and self.stats.bad_shards == errors:
                # cut at a member boundary, a truncated tar reads as a clean short one: the index tells
                self._shard_error(url, EOFError(f"{n} samples where the index records {expected} (truncated?)"))
            if n == 0:
                self.stats.add("empty_shard")
                if self.strict:
                    raise ShardReadError(f"{self.name}: shard {url} holds no sample")
                log.warning("%s: shard %s holds no sample; skipped", self.name, url)

    def _shard_error(self, url: str, err: Exception) -> None:
        self.stats.add("corrupt_shard")
        if self.strict:
            raise ShardReadError(f"{self.name}: shard {url}: {type(err).__name__}: {err}") from err
        log.warning("%s: shard %s is corrupt or truncated (%s: %s); its remaining samples are skipped",
                    self.name, url, type(err).__name__, err)

    def _batches(self, items: Iterator[Any], limit: int | None, keep_last: bool) -> Iterator[Any]:
        count, batch = 0, []
        if limit == 0:
            return
        for item in items:
            batch.append(item)
            if len(batch) == self.batch_size:
                yield self.collate(batch)
                batch = []
                count += 1
                if limit is not None and count >= limit:
                    return
        if batch and keep_last:
            yield self.collate(batch)


def shuffled(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle a stream through a buffer of ``size`` items (starts yielding once the buffer is full)."""
    if size <= 1:
        yield from items
        return
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = rng.randrange(size)
        yield buffer[j]
        buffer[j] = item
    rng.shuffle(buffer)
    yield from buffer


def map_samples(
    samples: Iterator[dict],
    fn: Callable[[dict], Any],
    stats: DataStats,
    strict: bool,
    name: str = "data",
) -> Iterator[Any]:
    """Apply ``fn`` to each raw sample; a :class:`SkipSample` is counted and skipped (strict: raised with shard and key)."""
    warned = 0
    for sample in samples:
        try:
            item = fn(sample)
        except SkipSample as err:
            stats.add(err.reason)
            where = f"shard {sample.get('__url__')}, key {sample.get('__key__')!r}"
            if strict:
                raise ShardReadError(f"{name}: {where}: {err}") from None
            if warned < _MAX_SKIP_WARNINGS:
                warned += 1
                log.warning("%s: skipping sample (%s): %s%s", name, where, err,
                            "" if warned < _MAX_SKIP_WARNINGS else " (further skips are only counted)")
            continue
        yield item


class SampleMapper:
    """A picklable process function: ``decode(sample, rng)`` per raw sample, with skip counting.

    Data modules hand one to :class:`ShardStream`; it travels to the workers (fork or spawn), so it
    holds only what decoding needs, never the data module or the trainer.
    """

    def __init__(self, decode: Callable[[dict, random.Random], Any], stats: DataStats, strict: bool, name: str) -> None:
        self.decode = decode
        self.stats = stats
        self.strict = strict
        self.name = name

    def __call__(self, samples: Iterator[dict], rng: random.Random) -> Iterator[Any]:
        return map_samples(samples, lambda s: self.decode(s, rng), self.stats, self.strict, self.name)


class ShardLoader(DataLoader):
    """A DataLoader over a :class:`ShardStream` (batching happens in the workers).

    A plain DataLoader subclass rather than webdataset's ``WebLoader``: in webdataset 1.x that is a
    pipeline object wrapping a DataLoader, which hides ``len`` and the loader from Lightning.

    Each new iterator (one per epoch) advances the stream's shared epoch counter before the workers
    start (or, with persistent workers, resume), so shuffling differs per epoch either way.
    """

    def __init__(self, dataset: ShardStream, num_workers: int = 0, pin_memory: bool = False,
                 persistent_workers: bool = False, prefetch_factor: int | None = None, **kwargs: Any) -> None:
        # the signature mirrors DataLoader's, so that Lightning can rebuild the loader (it does for predict)
        if num_workers > 0:
            kwargs["persistent_workers"] = persistent_workers
            kwargs["prefetch_factor"] = prefetch_factor or 2
        kwargs.setdefault("batch_size", None)
        kwargs.pop("shuffle", None)
        super().__init__(dataset, num_workers=num_workers, pin_memory=pin_memory, **kwargs)

    def __iter__(self):
        self.dataset.next_epoch()
        return super().__iter__()
