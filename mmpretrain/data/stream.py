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

Randomness derives from ``(seed, epoch, rank, worker)``, so a run is reproducible for a given seed
and world size. The shard order and shuffle buffer draw from one generator; decoding and augmentation
draw from generators (Python, NumPy, torch CPU, and the ``rng`` handed to ``process``) reseeded for
every raw sample from its index in the worker's stream. A sample's augmentation therefore does not depend
on how many samples were decoded before it, which is what lets a resumed stream skip samples without
decoding them and still produce the same batches.

Resuming (see docs/reliability.md)
----------------------------------
Under :class:`ShardLoader` every training batch travels with its position (the worker that made it and
how many raw samples that worker had taken); the loader keeps the positions of the batches it handed
out, and its ``state_dict`` (which Lightning saves in every checkpoint, since Lightning 2.2) records,
for each rank, the epoch, the batches consumed in it and each worker's raw sample count. After
``load_state_dict`` the workers continue where they were: in ``epoch`` mode each worker regenerates its
shard order and shuffle buffer and skips the raw samples it had already delivered *before* decoding
(exact: the batches are those an uninterrupted run would have made); in ``resampled`` mode the workers
draw with fresh seeds derived from the number of batches consumed (nothing repeats, but the batches are
not those of the uninterrupted run). Either way the epoch yields exactly the batches it has left, and
the worker that continues first is the one whose turn it was, so the round-robin order of
DataLoader's workers is preserved.
"""

from __future__ import annotations

import functools
import logging
import math
import multiprocessing as mp
import random
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmpretrain.data.decode import SkipSample
from mmpretrain.data.shards import ShardReadError, iter_shard_samples
from mmpretrain.data.stats import DataStats
from mmpretrain.rng import gather_objects

log = logging.getLogger("mmpretrain.data")

Mode = Literal["resampled", "epoch", "eval"]
# maps a stream of raw samples to a stream of processed items (decode, augment, tokenize, pack ...)
Process = Callable[[Iterator[dict], random.Random], Iterator[Any]]

_MAX_SKIP_WARNINGS = 5
_MASK64 = (1 << 64) - 1


class SampleError(RuntimeError):
    """Processing a sample failed with an unexpected error (not a :class:`SkipSample`); names shard and key.

    Raised inside a dataloader worker; DataLoader re-raises it in the main process with this message.
    """


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


def batches_before(done: int, worker: int, num_workers: int) -> int:
    """Batches worker ``worker`` made among the first ``done`` of an epoch (DataLoader takes them in turn)."""
    return max(0, -(-(done - worker) // num_workers))


def make_rng(*parts: Any) -> random.Random:
    return random.Random("/".join(str(p) for p in parts))


def splitmix64(x: int) -> int:
    """A 64-bit mixing function: distinct inputs give unrelated outputs (seeds for per-sample generators)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def seed_sample(base: int, index: int, rng: random.Random) -> None:
    """Seed the generators decoding may draw from (Python's, NumPy's, torch's CPU one, and ``rng``) for the
    sample at ``index`` of a stream whose seed is ``base``."""
    s = splitmix64(base ^ (index * 0xD1B54A32D192ED03 & _MASK64))
    random.seed(s)
    np.random.seed(splitmix64(s ^ 1) & 0xFFFFFFFF)
    torch.default_generator.manual_seed(splitmix64(s ^ 2) >> 1)
    rng.seed(splitmix64(s ^ 3))


def _global_rng_state() -> tuple:
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def _set_global_rng_state(state: tuple) -> None:
    random.setstate(state[0])
    np.random.set_state(state[1])
    torch.set_rng_state(state[2])


def _keep_global_rng(items: Iterator[Any]) -> Iterator[Any]:
    """Run a generator without disturbing the caller's global generators (loading in the main process:
    the training step's dropout and mixing draws must not depend on how many samples were decoded)."""
    while True:
        outer = _global_rng_state()
        try:
            item = next(items)
        except StopIteration:
            return
        finally:
            _set_global_rng_state(outer)
        yield item


class _Count:
    """How many raw samples a worker's stream has handed to ``process`` (skipped ones included)."""

    __slots__ = ("n",)

    def __init__(self, n: int = 0) -> None:
        self.n = n


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

    A ``process`` object with ``replay_on_resume = True`` (one that keeps state across samples, such as a
    packer of documents into sequences) is resumed by running it again from the start of the worker's
    stream and dropping the items already delivered, which is exact but decodes the skipped samples;
    otherwise the skipped raw samples are never decoded.
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
        #: set by ShardLoader: training batches travel as (batch, (worker, raw samples taken)) pairs
        self.emit_positions = False
        #: where this rank's workers resume: {"epoch", "batches", "raw": [per worker]}; see ShardLoader
        self.resume_point: dict[str, Any] | None = None
        self._replaying = False
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
        slot, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if num_workers != self.num_workers:
            raise RuntimeError(
                f"{self.name}: stream configured for {self.num_workers} workers but runs in {num_workers}"
            )
        items = self._iterate(slot, num_workers)
        # in the main process, decoding reseeds the global generators: keep the caller's untouched
        return items if info is not None else _keep_global_rng(items)

    def _iterate(self, slot: int, num_workers: int) -> Iterator[Any]:
        if self.mode == "eval":  # the same every time it runs
            part = partition(len(self.urls), self.rank, self.world_size, slot, num_workers)
            seeds = ("eval", self.rank, slot)
            process_rng = make_rng(self.seed, *seeds, "process")
            samples = self._seeded(self._read(part.shards, part, rng=None), seeds, process_rng, _Count())
            yield from self._batches(self.process(samples, process_rng), limit=None, keep_last=True)
            return
        epoch = self.epoch
        resume = self.resume_point if self.resume_point and self.resume_point["epoch"] == epoch else None
        done = resume["batches"] if resume else 0
        # DataLoader asks its workers in turn, from worker 0: after ``done`` batches, worker ``slot`` plays the
        # part of the worker whose turn it would have been, so the order of the batches is unchanged
        worker = (slot + done) % num_workers
        quota = worker_quota(self.batches_per_rank, worker, num_workers)  # type: ignore[arg-type]
        quota -= batches_before(done, worker, num_workers)
        if quota <= 0:
            return
        skip_raw = skip_items = 0
        if self.mode == "epoch":
            order = self.shard_order(epoch)
            part = partition(len(self.urls), self.rank, self.world_size, worker, num_workers)
            raw = self._cycle([order[i] for i in part.shards], part, make_rng(self.seed, epoch, self.rank, worker))
            seeds: tuple = (epoch, self.rank, worker)
            if resume and getattr(self.process, "replay_on_resume", False):
                skip_items = batches_before(done, worker, num_workers) * self.batch_size
            elif resume:
                skip_raw = int(resume["raw"][worker])
        else:  # resampled: after a resume, fresh draws (seeded by the batches consumed), never a replay
            again = ("resume", done) if done else ()
            rng = make_rng(self.seed, epoch, self.rank, worker, *again)
            raw = shuffled(self._resample(rng), self.shuffle_buffer, rng)
            seeds = (epoch, self.rank, worker, *again)
        count = _Count()
        process_rng = make_rng(self.seed, *seeds, "process")
        items = self.process(self._seeded(raw, seeds, process_rng, count, skip=skip_raw), process_rng)
        if skip_items:
            self._replaying = True
            for _ in islice(items, skip_items):
                pass
            self._replaying = False
        for batch in self._batches(items, limit=quota, keep_last=False):
            yield (batch, (worker, count.n)) if self.emit_positions else batch

    def _seeded(self, raw: Iterator[dict], seeds: tuple, process_rng: random.Random, count: _Count,
                skip: int = 0) -> Iterator[dict]:
        """Raw samples with the decoding generators seeded for each; the first ``skip`` are dropped undecoded."""
        raw = iter(raw)
        if skip:
            self._replaying = True
            taken = sum(1 for _ in islice(raw, skip))
            self._replaying = False
            if taken < skip:
                raise RuntimeError(f"{self.name}: cannot resume: the stream holds {taken} samples, "
                                   f"the checkpoint says {skip} were taken; were the shards changed?")
        base = make_rng(self.seed, *seeds, "samples").getrandbits(64)
        index = skip
        for sample in raw:
            seed_sample(base, index, process_rng)
            index += 1
            count.n = index
            yield sample

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
            failed: list[Exception] = []

            def on_error(url: str, err: Exception, failed: list[Exception] = failed) -> None:
                failed.append(err)
                self._shard_error(url, err)

            for i, sample in enumerate(iter_shard_samples(url, on_shard_error=on_error)):
                n += 1
                if i % part.modulus == part.remainder:
                    yield sample
            expected = self.counts[s]
            if expected is not None and 0 < n < expected and not failed:
                # cut at a member boundary, a truncated tar reads as a clean short one: the index tells
                self._shard_error(url, EOFError(f"{n} samples where the index records {expected} (truncated?)"))
            if n == 0 and not failed:
                if self._replaying:  # counted and reported when first read
                    continue
                self.stats.add("empty_shard")
                if self.strict:
                    raise ShardReadError(f"{self.name}: shard {url} holds no sample")
                log.warning("%s: shard %s holds no sample; skipped", self.name, url)

    def _shard_error(self, url: str, err: Exception) -> None:
        missing = isinstance(err, FileNotFoundError)
        if self._replaying and not self.strict:  # counted and reported when first read
            return
        self.stats.add("missing_shard" if missing else "corrupt_shard")
        what = "disappeared (no such file)" if missing else f"is corrupt or truncated ({type(err).__name__}: {err})"
        if self.strict:
            raise ShardReadError(f"{self.name}: shard {url} {what}") from err
        log.warning("%s: shard %s %s; %s", self.name, url, what,
                    "skipped" if missing else "its remaining samples are skipped")

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
    """Apply ``fn`` to each raw sample; a :class:`SkipSample` is counted and skipped (strict: raised with shard
    and key). Any other exception is a bug or an unusable setting, never bad data: it is raised as a
    :class:`SampleError` naming the shard and key (from a dataloader worker, DataLoader re-raises it in the
    main process with this message)."""
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
        except (SampleError, ShardReadError):
            raise
        except Exception as err:
            where = f"shard {sample.get('__url__')}, key {sample.get('__key__')!r}"
            raise SampleError(f"{name}: {where}: {type(err).__name__}: {err}") from err
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


def _init_worker(user_init: Callable[[int], None] | None, worker_id: int) -> None:
    """Workers ignore SIGUSR1: it asks the training process to save and stop (mmpretrain.checkpoints), and a
    scheduler that signals every process of a job (SLURM's --signal without B:) would otherwise kill the
    workers with it, and the run with them."""
    if hasattr(signal, "SIGUSR1"):
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    if user_init is not None:
        user_init(worker_id)


class ShardLoader(DataLoader):
    """A DataLoader over a :class:`ShardStream` (batching happens in the workers), resumable mid-epoch.

    A plain DataLoader subclass rather than webdataset's ``WebLoader``: in webdataset 1.x that is a
    pipeline object wrapping a DataLoader, which hides ``len`` and the loader from Lightning.

    Each new iterator (one per epoch) advances the stream's shared epoch counter before the workers
    start (or, with persistent workers, resume), so shuffling differs per epoch either way.

    Data position: training batches arrive with their position (worker, raw samples taken), which the
    loader strips and remembers for its recent batches. :meth:`state_dict` reports the position after the
    last batch *consumed*, which ``consumed_fn`` tells (the data module points it at the trainer's count
    of processed batches of the epoch; batches fetched ahead by the trainer do not count), for every rank
    (gathered: every rank must call it, as Lightning does when it saves a checkpoint). Lightning saves it
    in checkpoints and calls :meth:`load_state_dict` on resume before the workers start. The loader draws
    its workers' base seed from a generator of its own, never from the global one, so making an iterator
    (validation makes one each time) leaves the training step's random draws alone.
    """

    def __init__(self, dataset: ShardStream, num_workers: int = 0, pin_memory: bool = False,
                 persistent_workers: bool = False, prefetch_factor: int | None = None, **kwargs: Any) -> None:
        # the signature mirrors DataLoader's, so that Lightning can rebuild the loader (it does for predict)
        if num_workers > 0:
            kwargs["persistent_workers"] = persistent_workers
            kwargs["prefetch_factor"] = prefetch_factor or 2
        kwargs.setdefault("batch_size", None)
        kwargs.pop("shuffle", None)
        if kwargs.get("generator") is None:
            kwargs["generator"] = torch.Generator().manual_seed(dataset.seed)
        if num_workers > 0:
            kwargs["worker_init_fn"] = functools.partial(_init_worker, kwargs.get("worker_init_fn"))
        super().__init__(dataset, num_workers=num_workers, pin_memory=pin_memory, **kwargs)
        self.stream = dataset
        # positions travel with the batches only in training streams, and only through this loader
        dataset.emit_positions = dataset.mode != "eval"
        #: returns the batches consumed so far in the current epoch (set by the data module)
        self.consumed_fn: Callable[[], int] | None = None
        # (epoch, batches handed out, raw samples taken by each worker) after each recent batch
        self._positions: deque[tuple[int, int, tuple[int, ...]]] = deque(maxlen=4 * dataset.num_workers + 64)

    def __iter__(self):
        stream = self.stream
        stream.next_epoch()
        iterator = super().__iter__()
        if not stream.emit_positions:
            return iterator
        return self._track(iterator, stream.epoch)

    def _track(self, iterator: Iterator[Any], epoch: int) -> Iterator[Any]:
        resume = self.stream.resume_point
        if resume is not None and resume["epoch"] == epoch:
            handed, raw = int(resume["batches"]), [int(r) for r in resume["raw"]]
        else:
            handed, raw = 0, [0] * self.stream.num_workers
        self._positions.clear()
        self._positions.append((epoch, handed, tuple(raw)))
        for batch, (worker, taken) in iterator:
            raw[worker] = taken
            handed += 1
            self._positions.append((epoch, handed, tuple(raw)))
            yield batch

    # -- Lightning's stateful dataloader protocol ----------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The data position of every rank after the batches consumed so far (collective under DDP)."""
        stream = self.stream
        if stream.mode == "eval":
            return {}
        local = self._local_position()
        ranks = gather_objects(local)
        return {
            "version": 1,
            "mode": stream.mode,
            "seed": stream.seed,
            "world_size": stream.world_size,
            "num_workers": stream.num_workers,
            "batch_size": stream.batch_size,
            "batches_per_rank": stream.batches_per_rank,
            "ranks": ranks,
        }

    def _local_position(self) -> dict[str, Any]:
        stream = self.stream
        stats = stream.stats.snapshot()
        if not self._positions:  # nothing iterated yet: the start of the stream's next epoch
            resume = stream.resume_point
            if resume is not None:
                return {**resume, "stats": stats}
            return {"epoch": stream._epoch.value + 1, "batches": 0, "raw": [0] * stream.num_workers,
                    "stats": stats}
        consumed = self.consumed_fn() if self.consumed_fn is not None else None
        if consumed is None:
            log.warning("%s: the loader does not know how many batches were consumed (no consumed_fn); the "
                        "checkpoint records no data position", stream.name)
            return {}
        for epoch, handed, raw in reversed(self._positions):
            if handed == consumed:
                return {"epoch": epoch, "batches": handed, "raw": list(raw), "stats": stats}
        log.warning("%s: batch %d of the epoch is no longer among the loader's recent positions (%s); the "
                    "checkpoint records no data position", stream.name, consumed,
                    [h for _, h, _ in self._positions])
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from a saved data position (before the workers start); warns and starts the epoch over
        when the position cannot apply (another world size, worker count, batch size, mode or seed)."""
        stream = self.stream
        if not state_dict or stream.mode == "eval":
            return
        ranks = state_dict.get("ranks") or []
        setting = {"mode": stream.mode, "seed": stream.seed, "world_size": stream.world_size,
                   "num_workers": stream.num_workers, "batch_size": stream.batch_size,
                   "batches_per_rank": stream.batches_per_rank}
        changed = {k: (state_dict.get(k), v) for k, v in setting.items() if state_dict.get(k) != v}
        if changed or len(ranks) <= stream.rank or not ranks[stream.rank]:
            log.warning(
                "%s: the checkpoint's data position does not apply (%s); the data stream starts its epoch "
                "over, so some samples of this epoch repeat and others are left out", stream.name,
                ", ".join(f"{k} was {a}, now {b}" for k, (a, b) in changed.items()) or "no position recorded",
            )
            return
        mine = ranks[stream.rank]
        epoch, done = int(mine["epoch"]), int(mine["batches"])
        if done >= (stream.batches_per_rank or 0):  # the epoch was complete: the next one starts afresh
            stream.set_epoch(epoch + 1)
            stream.resume_point = None
        else:
            stream.set_epoch(epoch)
            stream.resume_point = {"epoch": epoch, "batches": done, "raw": [int(r) for r in mine["raw"]]}
        stream.stats.reset()
        for reason, n in (mine.get("stats") or {}).items():
            stream.stats.add(reason, int(n))
        log.info("%s: resuming the data stream at epoch %d, batch %d of %s", stream.name, epoch, done,
                 stream.batches_per_rank)

