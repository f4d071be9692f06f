"""DeepSpeed ZeRO on one GPU (skipped without CUDA or deepspeed): the METALM and CLIP demo models train a few steps
under deepspeed_stage_2 and deepspeed_stage_3, save a ZeRO checkpoint directory, resume from it, and export it;
the export computes what the trained model computes.

    pytest -q tests/tasks/test_deepspeed.py        # on a CUDA machine with pip install 'mmpretrain[deepspeed]'
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("DeepSpeed strategies need CUDA", allow_module_level=True)
pytest.importorskip("deepspeed")

import lightning.pytorch as pl  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from mmpretrain.checkpoints import StepCheckpoint, find_last_checkpoint, is_zero_checkpoint  # noqa: E402
from mmpretrain.export import export_checkpoint  # noqa: E402

VOCAB = 300  # a byte-level BPE tokenizer (trained below) needs 256 ids and its special tokens


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    """The tokenizer the exports carry: training here runs on bare loaders, so no data module names one."""
    from mmpretrain.data.tokenizer import train_bpe

    texts = [f"a {c} {s} on a {b} background, number {n}" for n, (c, s, b) in enumerate(
        [("red", "circle", "blue"), ("green", "square", "white"), ("blue", "star", "black")] * 20)]
    return str(train_bpe(texts, VOCAB, tmp_path_factory.mktemp("tokenizer"), min_frequency=1))


def _metalm_batches(n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(3, VOCAB, (4, 32), generator=g)} for _ in range(n)]


def _clip_batches(n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    batches = [{"image": torch.randn(4, 3, 64, 64, generator=g), "input_ids": torch.randint(3, VOCAB, (4, 12), generator=g)}
               for _ in range(n)]
    for b in batches:
        b["input_ids"][:, -1] = 0  # the tokenizer's end of text, where the text tower pools
    return batches


def _make(kind: str):
    if kind == "metalm":
        from mmpretrain.tasks.semicausal_lm import SemiCausalLM

        return SemiCausalLM(preset="metalm_demo", vocab_size=VOCAB, bos_id=1, eos_id=0, pad_id=2,
                            grad_checkpointing=True), _metalm_batches
    from mmpretrain.tasks.contrastive import ContrastivePretraining

    return ContrastivePretraining(preset="clip_demo", vocab_size=VOCAB, eot_id=0, grad_checkpointing=True), \
        _clip_batches


def _trainer(root: Path, strategy: str, steps: int) -> pl.Trainer:
    checkpoint = StepCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=2, save_last=True, monitor="step",
                                mode="max", save_top_k=-1, filename="step{step:08d}", auto_insert_metric_name=False)
    return pl.Trainer(accelerator="cuda", devices=1, strategy=strategy, precision="bf16-mixed", max_steps=steps,
                      default_root_dir=root, logger=False, enable_progress_bar=False, callbacks=[checkpoint],
                      gradient_clip_val=1.0, num_sanity_val_steps=0, limit_val_batches=0)


def _loader(batches: list) -> DataLoader:
    return DataLoader(batches, batch_size=None)


@pytest.mark.parametrize("strategy", ["deepspeed_stage_2", "deepspeed_stage_3"])
@pytest.mark.parametrize("kind", ["metalm", "clip"])
def test_train_checkpoint_resume_export(kind: str, strategy: str, tmp_path: Path, tokenizer_dir: str) -> None:
    task, batches = _make(kind)
    trainer = _trainer(tmp_path, strategy, steps=4)
    trainer.fit(task, _loader(batches(8)))
    assert trainer.global_step == 4
    last = find_last_checkpoint(tmp_path / "checkpoints")
    assert last is not None and last.name == "last.ckpt" and is_zero_checkpoint(last), last
    assert last.is_symlink()  # save_last becomes "link" under DeepSpeed: no second copy of the shards
    # resume as-is: the step count and the weights continue
    resumed, _ = _make(kind)
    trainer2 = _trainer(tmp_path / "resumed", strategy, steps=6)
    trainer2.fit(resumed, _loader(batches(8)), ckpt_path=str(last))
    assert trainer2.global_step == 6
    # export the sharded directory: consolidated to fp32, then the usual export
    out = export_checkpoint(last, tmp_path / "hf", tokenizer=tokenizer_dir)
    assert (out / "config.json").is_file()
    from mmpretrain.checkpoints import read_checkpoint
    from mmpretrain.export import load_task

    rebuilt = load_task(read_checkpoint(last))
    task.model.float().cpu().eval()
    if strategy == "deepspeed_stage_3":
        return  # the live model is sharded; the consolidated weights are compared through the export below
    with torch.no_grad():
        if kind == "metalm":
            ids = batches(1)[0]["input_ids"]
            torch.testing.assert_close(rebuilt.model(ids), task.model(ids), rtol=2e-2, atol=2e-2)
        else:
            batch = batches(1)[0]
            torch.testing.assert_close(rebuilt.model.encode_text(batch["input_ids"]),
                                       task.model.encode_text(batch["input_ids"]), rtol=2e-2, atol=2e-2)


def test_export_logits_equal_the_consolidated_model(tmp_path: Path, tokenizer_dir: str) -> None:
    import transformers

    task, batches = _make("metalm")
    trainer = _trainer(tmp_path, "deepspeed_stage_3", steps=2)
    trainer.fit(task, _loader(batches(4)))
    last = find_last_checkpoint(tmp_path / "checkpoints")
    out = export_checkpoint(last, tmp_path / "hf", tokenizer=tokenizer_dir)
    from mmpretrain.checkpoints import read_checkpoint
    from mmpretrain.export import load_task

    rebuilt = load_task(read_checkpoint(last))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    ids = batches(1)[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, rebuilt.model(ids), rtol=1e-5, atol=1e-5)
