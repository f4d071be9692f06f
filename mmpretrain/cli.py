"""The ``mmpretrain`` command: Lightning's CLI with our defaults.

    mmpretrain fit --config recipes/classification/demo.yaml
    mmpretrain fit --config recipes/classification/demo.yaml --data.train_shards 'shards/train-{000000..000009}.tar'
    mmpretrain fit --config recipes/classification/demo.yaml --print_config
    mmpretrain export --checkpoint runs/tb/version_0/checkpoints/last.ckpt --output exported/

Model and data are chosen by ``class_path`` in the YAML. What only the data knows (number of classes,
class names, vocabulary size) is linked into the model, never repeated by hand. Defaults: bf16-mixed
on GPU and 32-true on CPU; TensorBoard and CSV logs under ``runs/``; a progress bar; learning rate and
throughput (samples/s, and MFU where the task counts its FLOPs) monitors; a checkpoint every
``checkpoint.every_n_train_steps`` steps, at the end, and at the next step boundary after SIGUSR1/SIGTERM
(``last.ckpt`` always the newest; ``--checkpoint.save_top_k K`` keeps the last ``K`` step checkpoints),
each written atomically. ``--ckpt_path last`` resumes from the newest ``last.ckpt`` under the run
directory, exactly where it stopped (docs/reliability.md).

Strategies (docs/scaling.md): ``--trainer.strategy ddp``, ``deepspeed_stage_1``, ``deepspeed_stage_2``,
``deepspeed_stage_2_offload``, ``deepspeed_stage_3``, ``deepspeed_stage_3_offload``, or a DeepSpeed JSON file
through ``class_path: lightning.pytorch.strategies.DeepSpeedStrategy`` with ``init_args: {config: PATH}``
(recipes/deepspeed/). The name, the package and the config file are checked before anything is built; a
relative ``PATH`` is taken from the current directory if the file is there, else from the directory of the
recipe that set it (``config: ../deepspeed/zero3_offload.json`` in recipes/metalm/ works from anywhere).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.strategies import StrategyRegistry
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from mmpretrain.checkpoints import StepCheckpoint, find_last_checkpoint, install_atomic_checkpoint_io
from mmpretrain.data.stats import DataStatsMonitor
from mmpretrain.launch import check_trainer_matches_launch
from mmpretrain.throughput import MFUThroughputMonitor

# values only the data module knows, linked into the task when both have them
DATA_TO_MODEL_LINKS = ("num_classes", "class_names", "vocab_size")


def batch_size_of(batch: Any) -> int:
    """Samples in a batch: the length of its first tensor (batches are dicts of tensors and key lists)."""
    if isinstance(batch, dict):
        for value in batch.values():
            if isinstance(value, torch.Tensor) and value.ndim > 0:
                return int(value.shape[0])
    if isinstance(batch, (list, tuple)) and batch:
        return batch_size_of(batch[0]) if not isinstance(batch[0], torch.Tensor) else int(batch[0].shape[0])
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    raise TypeError(f"cannot tell the batch size of a {type(batch).__name__}")


def items_of(batch: Any) -> int:
    """Items for throughput: tokens for token batches (``input_ids``), else samples."""
    if isinstance(batch, dict) and isinstance(batch.get("input_ids"), torch.Tensor):
        return int(batch["input_ids"].numel())
    return batch_size_of(batch)


class MMPretrainCLI(LightningCLI):
    """LightningCLI with mmpretrain's links, default callbacks and loggers."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("trainer_defaults", default_trainer_settings())
        super().__init__(LightningModule, LightningDataModule, *args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for name in DATA_TO_MODEL_LINKS:
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")
        parser.add_lightning_class_args(StepCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.every_n_train_steps": 1000,
                "checkpoint.save_last": True,
                # ranked by step: save_top_k K keeps the last K step checkpoints (-1: all)
                "checkpoint.monitor": "step",
                "checkpoint.mode": "max",
                "checkpoint.save_top_k": -1,
                "checkpoint.filename": "step{step:08d}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_strategy_setting(config.trainer.strategy, config_files(self.config, self.subcommand))
        # the default loggers write under trainer.default_root_dir, wherever the user moved it
        root = config.trainer.default_root_dir
        loggers = config.trainer.logger
        if root and isinstance(loggers, list):
            for logger in loggers:
                init = getattr(logger, "init_args", None)
                if init is not None and getattr(init, "save_dir", None) == DEFAULT_ROOT:
                    init.save_dir = root

    def instantiate_trainer(self, **kwargs: Any):
        # a 50-step window: rates and MFU appear after 50 steps instead of Lightning's default 100
        throughput = MFUThroughputMonitor(batch_size_fn=batch_size_of, length_fn=items_of, window_size=50)
        extra = [throughput, DataStatsMonitor()]
        # keyword arguments replace the config's trainer settings: keep the callbacks given in trainer.callbacks
        configured = self._get(self.config_init, "trainer", default={}).get("callbacks") or []
        configured = configured if isinstance(configured, list) else [configured]
        kwargs["callbacks"] = configured + list(kwargs.get("callbacks") or []) + extra
        trainer = super().instantiate_trainer(**kwargs)
        # torchrun / srun started as many processes per node and nodes as the trainer expects, or fail now
        check_trainer_matches_launch(trainer)
        install_atomic_checkpoint_io(trainer)  # a kill mid-write never leaves a broken checkpoint
        return trainer

    # -- --ckpt_path last: the newest last.ckpt of the run, in whichever logger version wrote it ----------
    def _resolve_last_checkpoint(self) -> None:
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") != "last":
            return
        callback = self.trainer.checkpoint_callback
        roots = [getattr(callback, "dirpath", None), self.trainer.default_root_dir]
        found = find_last_checkpoint(*roots)
        if found is None:
            # not an error: a job script can always pass --ckpt_path last, the first run starts afresh
            rank_zero_warn(f"--ckpt_path last: no last.ckpt under {', '.join(str(r) for r in roots if r)}; "
                           f"starting from scratch")
            config["ckpt_path"] = None
            return
        rank_zero_info(f"--ckpt_path last: resuming from {found}")
        config["ckpt_path"] = str(found)

    def before_fit(self) -> None:
        self._resolve_last_checkpoint()

    def before_validate(self) -> None:
        self._resolve_last_checkpoint()

    def before_test(self) -> None:
        self._resolve_last_checkpoint()

    def before_predict(self) -> None:
        self._resolve_last_checkpoint()


DEFAULT_ROOT = "runs"

DEEPSPEED_INSTALL = "pip install 'mmpretrain[deepspeed]'"


def config_files(config: Any, subcommand: str | None = None) -> list[Path]:
    """The ``--config`` files of a parsed command line, absolute, in the order given (later ones override):
    those before the subcommand, then the subcommand's own."""
    found: list[Path] = []
    spaces = [config] + ([config.get(subcommand)] if subcommand else [])
    for space in spaces:
        given = space.get("config") if space is not None and hasattr(space, "get") else None
        for path in given or []:
            # jsonargparse keeps the directory it was parsed from: ``absolute`` does not depend on a later chdir
            found.append(Path(getattr(path, "absolute", None) or Path(os.fspath(path)).resolve()))
    return found


def _strategy_config_in(recipe: Path) -> Any:
    """``trainer.strategy.init_args.config`` as written in a recipe (at its top or under a subcommand's key),
    or ``None``."""
    try:
        doc = yaml.safe_load(recipe.read_text())
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(doc, dict):
        return None
    for space in [doc, *(v for v in doc.values() if isinstance(v, dict))]:
        node: Any = space
        for key in ("trainer", "strategy", "init_args", "config"):
            node = node.get(key) if isinstance(node, dict) else None
        if node is not None:
            return node
    return None


def resolve_strategy_config(path: str | os.PathLike, recipes: Sequence[str | os.PathLike] = ()) -> Path:
    """The DeepSpeed config file that ``trainer.strategy.init_args.config`` names.

    A relative ``path`` is looked up as given (relative to the current directory) and, if no file is there,
    relative to the directory of the recipe that set it: the last of ``recipes`` (the ``--config`` files, in
    order) that writes this value. Raises ``ValueError`` naming every place it looked.
    """
    given = Path(path)
    places = [(given, "as given")]
    if not given.is_absolute():
        places[0] = (given, "relative to the current directory")
        for recipe in reversed([Path(r) for r in recipes]):
            value = _strategy_config_in(recipe)
            if value is not None and os.fspath(value) == os.fspath(path):
                places.append((recipe.parent / given, f"relative to the recipe {recipe} that set it"))
                break
    for place, _ in places:
        if place.is_file():
            return place
    looked = "; ".join(f"{os.path.abspath(place)} ({why})" for place, why in places)
    raise ValueError(f"trainer.strategy.init_args.config {os.fspath(path)}: no such DeepSpeed config file; looked "
                     f"for {looked}. Give a path relative to the recipe or the current directory, or an absolute "
                     f"one (see recipes/deepspeed/ for examples)")


def check_strategy_setting(strategy: Any, recipes: Sequence[str | os.PathLike] = ()) -> None:
    """Fail before anything is built when ``trainer.strategy`` names no strategy, names DeepSpeed without the
    package installed, or gives a DeepSpeed config file that does not exist. ``strategy``: the config's value
    (a name, a ``class_path``/``init_args`` namespace or dict, or an instance).

    A relative DeepSpeed config path is found by :func:`resolve_strategy_config` (the current directory, then
    the directory of the recipe among ``recipes``, the ``--config`` files, that set it); found beside the
    recipe, the path in ``strategy``'s ``init_args`` is replaced by the file's absolute path, so that the
    strategy reads the file that was checked."""
    if strategy is None:
        return
    init_args: Any = None
    if isinstance(strategy, str):
        names = StrategyRegistry.available_strategies()
        if strategy != "auto" and strategy not in names:
            common = ["auto", "ddp", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_2_offload",
                      "deepspeed_stage_3", "deepspeed_stage_3_offload"]
            raise ValueError(f"trainer.strategy {strategy!r} is not a strategy name; use one of {', '.join(common)} "
                             f"(all: {', '.join(names)}), or class_path: lightning.pytorch.strategies.DeepSpeedStrategy "
                             f"with init_args.config pointing to a DeepSpeed JSON file (recipes/deepspeed/)")
        deepspeed, shown, config = strategy.startswith("deepspeed"), strategy, None
    else:
        get = strategy.get if isinstance(strategy, dict) or hasattr(strategy, "get") else None
        class_path = get("class_path") if get is not None else None
        if class_path is None:  # an instance: it has read its config already
            class_path = f"{type(strategy).__module__}.{type(strategy).__qualname__}"
            config = getattr(strategy, "config", None) if "DeepSpeed" in class_path else None
        else:
            init_args = get("init_args") or {}
            config = init_args.get("config") if hasattr(init_args, "get") else None
        deepspeed, shown = "deepspeed" in str(class_path).lower(), str(class_path)
    if not deepspeed:
        return
    if importlib.util.find_spec("deepspeed") is None:
        raise ValueError(f"trainer.strategy {shown} needs DeepSpeed, which is not installed: {DEEPSPEED_INSTALL} "
                         f"(on a CUDA machine), or use trainer.strategy ddp")
    if isinstance(config, (str, os.PathLike)):
        found = resolve_strategy_config(config, recipes)
        if found != Path(config) and init_args is not None and hasattr(init_args, "__setitem__"):
            init_args["config"] = str(found.resolve())


def default_trainer_settings() -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    root = DEFAULT_ROOT
    return {
        "precision": "bf16-mixed" if cuda else "32-true",
        "default_root_dir": root,
        "logger": [
            {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": root, "name": "tb"}},
            {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": root, "name": "csv"}},
        ],
        "log_every_n_steps": 10,
    }


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``mmpretrain`` console script and ``python -m mmpretrain``."""
    torch.set_float32_matmul_precision("high")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download at run time
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # our streams split work across workers themselves, so the advertised length is exact
    warnings.filterwarnings("ignore", message=".*Your `IterableDataset` has `__len__` defined.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] == "export":
        from mmpretrain.export import main as export_main

        raise SystemExit(export_main(argv[1:]))
    MMPretrainCLI(args=args)


if __name__ == "__main__":
    main()
