"""The shared LightningDataModule over tar shards; one subclass per sample kind says how to decode and batch."""

from __future__ import annotations

import logging
import multiprocessing as mp
import weakref
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import default_collate

from mmpretrain.data.shards import ShardSource, read_index_metadata, resolve_sources
from mmpretrain.data.stats import DataStats
from mmpretrain.data.stream import SampleMapper, ShardLoader, ShardStream

log = logging.getLogger("mmpretrain.data")

Split = Literal["train", "val", "test", "predict"]


class ShardDataModule(pl.LightningDataModule):
    """Reads webdataset shards for training, validation, test and prediction.

    Args:
        train_shards: training shards: a brace pattern (``"shards/train-{000000..000099}.tar"``), a glob,
            a directory, ``pipe:``/``file:`` URLs, ``"demo:<set>/<split>"``, or a list of these (one source each).
        val_shards: validation shards (read exactly once per validation, same order every run).
        test_shards: test shards (as validation); ``mmpretrain test`` falls back to ``val_shards``.
        predict_shards: shards for ``mmpretrain predict`` (falls back to ``val_shards``).
        batch_size: samples per batch on each rank.
        val_batch_size: for validation/test/predict; defaults to ``batch_size``.
        num_workers: dataloader worker processes per rank (0: load in the main process).
        mode: ``"resampled"`` (an endless stream of shards drawn at random, cut into virtual epochs of
            ``samples_per_epoch``; the pretraining default) or ``"epoch"`` (each shard once per epoch).
        samples_per_epoch: virtual epoch length over all ranks; default: the samples in ``train_shards``.
        train_weights: sampling weight of each source of ``train_shards`` (a list), resampled mode only;
            default: sources weighted by their shard counts.
        shuffle_buffer: samples each worker holds for shuffling.
        seed: seeds shard order, shuffling and augmentation (with the epoch, rank and worker).
        strict: raise on the first corrupt sample or shard (naming shard and key) instead of skipping it.
        pin_memory: pin batches in page-locked memory; default: when CUDA is available.
        persistent_workers: keep workers alive between epochs.
        prefetch_factor: batches each worker prepares ahead.
        worker_start_method: how worker processes start: ``"forkserver"`` (the default where available),
            ``"spawn"`` or ``"fork"``. Forking a process that already runs threads (DDP's communication,
            loggers) can deadlock a worker at birth; workers started from a fork server cannot.
    """

    def __init__(
        self,
        train_shards: str | list[str] | None = None,
        val_shards: str | list[str] | None = None,
        test_shards: str | list[str] | None = None,
        predict_shards: str | list[str] | None = None,
        batch_size: int = 64,
        val_batch_size: int | None = None,
        num_workers: int = 4,
        mode: Literal["resampled", "epoch"] = "resampled",
        samples_per_epoch: int | None = None,
        train_weights: list[float] | None = None,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        strict: bool = False,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        prefetch_factor: int = 2,
        worker_start_method: Literal["forkserver", "spawn", "fork"] | None = None,
    ) -> None:
        super().__init__()
        if mode not in ("resampled", "epoch"):
            raise ValueError(f"data.mode must be 'resampled' or 'epoch', got {mode!r}")
        if train_weights is not None and mode != "resampled":
            raise ValueError("data.train_weights only apply in resampled mode; set data.mode: resampled or drop them")
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be positive, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        if train_shards is None and val_shards is None and test_shards is None and predict_shards is None:
            raise ValueError("no shards given: set data.train_shards (and data.val_shards)")
        self.shards: dict[str, str | list[str] | None] = {
            "train": train_shards,
            "val": val_shards,
            "test": test_shards if test_shards is not None else val_shards,
            "predict": predict_shards if predict_shards is not None else val_shards,
        }
        # the config field each split's shards came from, for error messages
        self._fields = {
            "train": "data.train_shards",
            "val": "data.val_shards",
            "test": "data.test_shards" if test_shards is not None else "data.val_shards",
            "predict": "data.predict_shards" if predict_shards is not None else "data.val_shards",
        }
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.mode = mode
        self.samples_per_epoch = samples_per_epoch
        self.train_weights = train_weights
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.strict = strict
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.persistent_workers = persistent_workers
        self.prefetch_factor = prefetch_factor
        if worker_start_method is None:
            worker_start_method = "forkserver" if "forkserver" in mp.get_all_start_methods() else None
        self.worker_start_method = worker_start_method
        self._start_method = worker_start_method if num_workers > 0 else None
        if self._start_method == "forkserver":
            preload_in_fork_server(type(self).__module__)
        self.stats: dict[str, DataStats] = {}
        self._sources: dict[str, list[ShardSource]] = {}
        self._metadata: dict | None = None
        self._streams: dict[str, ShardStream] = {}

    # -- shards and metadata ------------------------------------------------------------------------------
    def sources(self, split: Split) -> list[ShardSource]:
        """The split's shard sources with sample counts (resolved once; errors name the config field)."""
        if split not in self._sources:
            weights = self.train_weights if split == "train" else None
            self._sources[split] = resolve_sources(self.shards[split], weights, what=self._fields[split])
        return self._sources[split]

    @property
    def metadata(self) -> dict:
        """What the shards' index.json files say about the set (kind, classes, templates ...)."""
        if self._metadata is None:
            urls = [u for split in ("train", "val") if self.shards[split] is not None for s in self.sources(split) for u in s.urls]
            self._metadata = read_index_metadata(urls)
        return self._metadata

    def prepare_data(self) -> None:
        for split in ("train", "val"):  # demo shards are generated here, once per node
            if self.shards[split] is not None:
                self.sources(split)

    def _placement(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    # -- what subclasses provide ------------------------------------------------------------------------
    def process(self, split: Split) -> Any:
        """A function ``(raw_samples, rng) -> items`` for the split (decode, augment, tokenize ...)."""
        raise NotImplementedError

    def item_counts(self, split: Split, counts: list[int | None]) -> list[int | None]:
        """Items each shard yields, from its sample counts (the same, unless samples are packed or split)."""
        return counts

    def collate_fn(self) -> Any:
        """A picklable function turning a list of items into a batch (runs in the workers)."""
        return default_collate

    def mapper(self, split: Split, decode) -> SampleMapper:
        """Wrap a picklable ``decode(sample, rng) -> item`` into a process function with skip counting."""
        return SampleMapper(decode, self.stats.setdefault(split, DataStats(self._start_method)), self.strict, split)

    # -- loaders -------------------------------------------------------------------------------------------
    def stream(self, split: Split) -> ShardStream:
        if self.shards[split] is None:
            raise ValueError(f"no {split} shards: set {self._fields[split]}")
        sources = self.sources(split)
        urls = [u for s in sources for u in s.urls]
        counts = self.item_counts(split, [c for s in sources for c in s.counts])
        source_ids = [i for i, s in enumerate(sources) for _ in s.urls]
        rank, world_size = self._placement()
        self.stats.setdefault(split, DataStats(self._start_method))
        train = split == "train"
        weights = None
        if train and self.train_weights is not None:
            weights = self.train_weights
        elif train:  # sources weighted by their size: the same as one concatenated list
            weights = [float(len(s.urls)) for s in sources]
        stream = ShardStream(
            urls,
            counts,
            process=self.process(split),
            collate=self.collate_fn(),
            batch_size=self.batch_size if train else self.val_batch_size,
            mode=self.mode if train else "eval",
            source_ids=source_ids,
            source_weights=weights,
            samples_per_epoch=self.samples_per_epoch if train else None,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
            num_workers=self.num_workers,
            stats=self.stats[split],
            strict=self.strict,
            name=split,
            start_method=self._start_method,
        )
        if train and self.mode == "epoch" and rank == 0:
            repeated, dropped = stream.tail()
            log.info(
                "train: %d samples in %d shards; %d batches of %d per rank per epoch; per epoch %d samples "
                "repeat and %d wait for a later epoch so that every rank yields the same number of batches",
                stream.total_samples, len(urls), stream.batches_per_rank, self.batch_size, repeated, dropped,
            )
        trainer = self.trainer
        if train and trainer is not None:
            stream.set_epoch(trainer.current_epoch)
        self._streams[split] = stream
        return stream

    def _loader(self, split: Split) -> ShardLoader:
        loader = ShardLoader(
            self.stream(split),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and split == "train",
            prefetch_factor=self.prefetch_factor,
            multiprocessing_context=self.worker_start_method if self.num_workers > 0 else None,
        )
        if split == "train" and self.trainer is not None:
            # the data position a checkpoint records is that of the batches the trainer has trained on
            # (it fetches ahead): its count of processed batches in the epoch
            loader.consumed_fn = consumed_batches(self.trainer)
        return loader

    def train_dataloader(self) -> ShardLoader:
        return self._loader("train")

    def val_dataloader(self) -> ShardLoader | list:
        return self._loader("val") if self.shards["val"] is not None else []

    def test_dataloader(self) -> ShardLoader:
        return self._loader("test")

    def predict_dataloader(self) -> ShardLoader:
        return self._loader("predict")

    # the training stream's position is the train loader's state (ShardLoader.state_dict), which Lightning
    # saves with the fit loop; the data module keeps what checks a resumed run's settings
    def state_dict(self) -> dict[str, Any]:
        stream = self._streams.get("train")
        return {"train_epoch": stream.epoch if stream is not None else 0, "seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("seed", self.seed) != self.seed:
            log.warning("data.seed differs from the checkpoint's (%s != %s)", self.seed, state_dict["seed"])


def consumed_batches(trainer: pl.Trainer):
    """A function returning the training batches the trainer has processed in the current epoch."""
    ref = weakref.ref(trainer)

    def consumed() -> int | None:
        t = ref()
        return None if t is None else int(t.fit_loop.epoch_loop.batch_progress.current.processed)

    return consumed


_FORK_SERVER_PRELOAD = ["__main__", "torch", "timm.data", "mmpretrain.data.stream"]


def preload_in_fork_server(*modules: str) -> None:
    """Have the fork server import ``modules`` (and torch, timm's transforms, our stream) once, so that each
    worker forked from it starts in a fraction of a second instead of importing them itself (seconds per
    worker, at every validation). Takes effect when the fork server has not started yet."""
    for module in modules:
        if module not in _FORK_SERVER_PRELOAD:
            _FORK_SERVER_PRELOAD.append(module)
    mp.set_forkserver_preload(list(_FORK_SERVER_PRELOAD))
