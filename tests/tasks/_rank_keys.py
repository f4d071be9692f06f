"""Test helpers loaded into runs started by torchrun (``--trainer.callbacks+=tests.tasks._rank_keys.RecordKeys``),
and a ``python -m tests.tasks._rank_keys`` entry that reports the world torchrun set up."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback


class RecordKeys(Callback):
    """Append the sample keys of every training batch this rank trains on to ``<directory>/rank<R>.jsonl``,
    one line per batch: ``{"step": global_step, "epoch": epoch, "keys": [...]}``."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        keys = batch.get("key") if isinstance(batch, dict) else None
        if keys is None:
            raise KeyError(f"RecordKeys: the training batch has no 'key' list (it has {sorted(batch)})")
        self.directory.mkdir(parents=True, exist_ok=True)
        line = {"step": trainer.global_step, "epoch": trainer.current_epoch, "keys": list(keys)}
        with open(self.directory / f"rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")


def read_keys(directory: Path, rank: int) -> list[dict]:
    with open(Path(directory) / f"rank{rank}.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


if __name__ == "__main__":
    # under torchrun: build a trainer from the arguments ``NUM_NODES DEVICES`` and run the launch check
    from lightning.pytorch import Trainer

    from mmpretrain.launch import check_trainer_matches_launch

    num_nodes, devices = int(sys.argv[1]), int(sys.argv[2])
    strategy = "ddp" if num_nodes * devices > 1 else "auto"
    trainer = Trainer(accelerator="cpu", devices=devices, num_nodes=num_nodes, strategy=strategy, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    check_trainer_matches_launch(trainer)
    print(f"rank {os.environ.get('RANK')}: launch matches", flush=True)
