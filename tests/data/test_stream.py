"""Shard streams split across ranks and workers: equal batch counts in training, exact coverage in eval."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import torch

from mmpretrain.data.stats import DataStats
from mmpretrain.data.stream import SampleMapper, ShardLoader, ShardStream, partition


def sample_number(sample: dict, rng: random.Random) -> int:
    return json.loads(sample["json"])["n"]


def collate_numbers(items: list[int]) -> torch.Tensor:
    return torch.tensor(items)


def make_stream(urls, counts, rank, world, workers, mode, batch_size=2, **kw) -> ShardStream:
    stats = DataStats()
    return ShardStream(urls, counts, SampleMapper(sample_number, stats, False, "t"), collate_numbers,
                       batch_size=batch_size, mode=mode, rank=rank, world_size=world, num_workers=workers,
                       stats=stats, shuffle_buffer=4, **kw)


def run_epochs(stream: ShardStream, workers: int, epochs: int = 1) -> list[list[torch.Tensor]]:
    loader = ShardLoader(stream, num_workers=workers, persistent_workers=workers > 0)
    return [list(loader) for _ in range(epochs)]


@pytest.mark.parametrize("shard_counts", [[7, 3, 5], [4, 9, 1, 6, 2]])
@pytest.mark.parametrize("mode", ["epoch", "resampled"])
def test_training_ranks_yield_equal_batch_counts(image_shards, shard_counts, mode):
    urls = image_shards(shard_counts)
    world, workers, batch = 2, 2, 2
    total = sum(shard_counts)
    expected = total // (world * batch)
    per_rank = []
    for rank in range(world):
        stream = make_stream(urls, shard_counts, rank, world, workers, mode, batch)
        assert len(stream) == expected
        epochs = run_epochs(stream, workers, epochs=2)
        for batches in epochs:
            assert len(batches) == expected
            assert all(len(b) == batch for b in batches)
        per_rank.append(epochs)
    if mode == "epoch":
        # within one epoch the two ranks read disjoint shards; repeats are bounded by the computed tail
        seen = Counter(int(n) for rank_epochs in per_rank for b in rank_epochs[0] for n in b)
        repeated, dropped = make_stream(urls, shard_counts, 0, world, workers, mode, batch).tail(epoch=0)
        assert sum(seen.values()) == expected * world * batch
        assert sum(c - 1 for c in seen.values()) <= repeated
        assert total - len(seen) <= dropped + repeated
        # a new epoch reshuffles
        first = [int(n) for b in per_rank[0][0] for n in b]
        second = [int(n) for b in per_rank[0][1] for n in b]
        assert first != second


@pytest.mark.parametrize("shard_counts", [[7, 3, 5], [4, 9, 1, 6, 2], [11]])
def test_eval_sees_each_sample_exactly_once(image_shards, shard_counts):
    urls = image_shards(shard_counts)
    world, workers = 2, 2
    seen = []
    for rank in range(world):
        stream = make_stream(urls, shard_counts, rank, world, workers, "eval", batch_size=3)
        runs = run_epochs(stream, workers, epochs=2)
        assert [torch.cat(b).tolist() for b in [runs[0]]] == [torch.cat(b).tolist() for b in [runs[1]]]
        assert len(runs[0]) == len(stream)  # the advertised length is exact
        seen.extend(int(n) for b in runs[0] for n in b)
    assert sorted(seen) == list(range(sum(shard_counts)))


def test_partition_is_exact_for_any_shape():
    counts = [5, 0, 7, 2]
    for world in (1, 2, 3, 8):
        for workers in (1, 2, 3):
            got = Counter()
            for rank in range(world):
                for w in range(workers):
                    part = partition(len(counts), rank, world, w, workers)
                    for s in part.shards:
                        got.update((s, i) for i in range(counts[s]) if i % part.modulus == part.remainder)
            assert got == Counter((s, i) for s, c in enumerate(counts) for i in range(c))


def test_resampled_weights_follow_sources(image_shards):
    a = image_shards([20, 20])  # labels cycle, numbers 0..39
    b = image_shards([20, 20])
    counts = [20] * 4
    stream = ShardStream(a + b, counts, SampleMapper(sample_number, DataStats(), False, "t"), collate_numbers,
                         batch_size=10, mode="resampled", source_ids=[0, 0, 1, 1], source_weights=[0.9, 0.1],
                         samples_per_epoch=4000, shuffle_buffer=0, seed=3)
    # the two sets hold the same numbers; tell them apart through the URL instead
    urls_seen = Counter()
    for sample in stream._resample(random.Random(0)):
        urls_seen[sample["__url__"] in a] += 1
        if sum(urls_seen.values()) >= 2000:
            break
    assert 0.8 < urls_seen[True] / 2000 < 0.97


def test_same_seed_same_stream_different_seed_differs(image_shards):
    counts = [6, 6, 6]
    urls = image_shards(counts)

    def numbers(seed):
        stream = make_stream(urls, counts, 0, 1, 0, "epoch", batch_size=3, seed=seed)
        return torch.cat(run_epochs(stream, 0)[0]).tolist()

    assert numbers(1) == numbers(1)
    assert numbers(1) != numbers(2)


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGUSR1"), reason="no SIGUSR1 on this platform")
def test_workers_ignore_sigusr1(image_shards):
    """SIGUSR1 asks the trainer to save and stop; a scheduler that signals every process of the job must not kill
    the data workers with it (they would die, and the run with them)."""
    import os
    import signal

    shard_counts = [5, 3]
    stream = make_stream(image_shards(shard_counts), shard_counts, 0, 1, 1, "eval", batch_size=1)
    loader = ShardLoader(stream, num_workers=1)
    iterator = iter(loader)
    first = next(iterator)
    (worker,) = iterator._workers
    os.kill(worker.pid, signal.SIGUSR1)
    rest = list(iterator)
    assert worker.exitcode in (None, 0)
    assert 1 + len(rest) == sum(shard_counts)
    assert first.numel() == 1
