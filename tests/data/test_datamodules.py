"""The three sample kinds through their data modules: image-label, image-text, text documents."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmpretrain.data.classification import ImageLabelDataModule
from mmpretrain.data.image_text import ImageTextDataModule
from mmpretrain.data.text import TextDataModule
from mmpretrain.data.writer import ShardWriter


def test_image_label_batches(image_shards):
    urls = image_shards([10, 6])
    dm = ImageLabelDataModule(train_shards=urls, val_shards=urls[1], image_size=12, batch_size=4, num_workers=0,
                              mode="epoch", train_transform={"scale": [0.5, 1.0]})
    assert dm.num_classes == 3 and dm.class_names == ["c0", "c1", "c2"]
    batches = list(dm.train_dataloader())
    assert len(batches) == 16 // 4
    b = batches[0]
    assert b["image"].shape == (4, 3, 12, 12) and b["image"].dtype == torch.float32
    assert b["label"].dtype == torch.long and len(b["key"]) == 4
    val = list(dm.val_dataloader())
    assert sum(len(v["label"]) for v in val) == 6


def test_image_text_batches_tokenized_in_workers(image_shards):
    urls = image_shards([8, 8])
    dm = ImageTextDataModule(train_shards=urls, val_shards=urls[0], tokenizer="demo", context_length=16,
                             image_size=12, batch_size=4, num_workers=2, label_key="cls")
    assert dm.vocab_size > 100
    b = next(iter(dm.train_dataloader()))
    assert b["image"].shape == (4, 3, 12, 12)
    assert b["input_ids"].shape == (4, 16) and b["input_ids"].dtype == torch.long
    text = dm.tokenizer.decode(b["input_ids"][0].tolist())
    assert "sample" in text
    v = next(iter(dm.val_dataloader()))
    assert v["label"].tolist() == [n % 3 for n in (0, 2, 4, 6)]  # worker 0 of 2 reads every other sample
    prompts = dm.zero_shot_prompts()
    assert prompts.shape[0] == 3 and prompts.shape[-1] == 16


def write_docs(directory: Path, docs: list[str], prefix: str = "train", shard_size: int = 5) -> str:
    with ShardWriter(directory, prefix=prefix, shard_size=shard_size, metadata={"kind": "text"}) as w:
        for i, d in enumerate(docs):
            w.write({"__key__": f"{i:05d}", "txt": d})
    return str(directory / f"{prefix}-*.tar")


def test_text_documents_pack_into_sequences(tmp_path):
    docs = [" ".join(f"word{i}_{j}" for j in range(3 + i % 7)) for i in range(30)]
    pattern = write_docs(tmp_path, docs)
    dm = TextDataModule(train_shards=pattern, val_shards=pattern, tokenizer="demo", seq_len=32, batch_size=2,
                        num_workers=0, mode="epoch")
    train = list(dm.train_dataloader())
    assert len(train) == len(dm.train_dataloader()) > 0
    assert all(b["input_ids"].shape == (2, 32) for b in train)
    val = list(dm.val_dataloader())
    ids = torch.cat([b["input_ids"] for b in val]).flatten()
    doc_ids = torch.cat([b["doc_ids"] for b in val]).flatten()
    real = ids[doc_ids >= 0]
    eos = dm.tokenizer.eos_id
    assert int((real == eos).sum()) == len(docs)  # every document once, each closed by end-of-text
    tok = dm.tokenizer
    expected = [t for d in docs for t in [*tok.encode(d), eos]]
    assert real.tolist() == expected  # evaluation reads documents in order, nothing lost


def test_doc_ids_restart_in_each_sequence(tmp_path):
    pattern = write_docs(tmp_path, ["alpha beta gamma delta"] * 12)
    dm = TextDataModule(val_shards=pattern, tokenizer="demo", seq_len=8, batch_size=4, num_workers=0)
    for b in dm.val_dataloader():
        for row in b["doc_ids"]:
            real = row[row >= 0]
            assert real[0] == 0 and bool((real.diff() >= 0).all())


@pytest.mark.parametrize("kind", ["image-text", "text"])
def test_missing_caption_or_text_is_skipped_and_counted(tmp_path, kind):
    from tests.conftest import jpeg_bytes

    with ShardWriter(tmp_path, prefix="s", shard_size=10) as w:
        for i in range(6):
            sample = {"__key__": f"{i:03d}", "jpg": jpeg_bytes((9, 9, 9)), "txt": f"caption {i}"}
            if i == 3:
                del sample["txt"]
            w.write(sample)
    pattern = str(tmp_path / "s-000000.tar")
    if kind == "image-text":
        dm = ImageTextDataModule(val_shards=pattern, tokenizer="demo", image_size=8, batch_size=2, num_workers=0)
        n = sum(len(b["key"]) for b in dm.val_dataloader())
        assert n == 5 and dm.stats["val"].snapshot() == {"missing_caption": 1}
    else:
        dm = TextDataModule(val_shards=pattern, tokenizer="demo", seq_len=4, batch_size=2, num_workers=0)
        list(dm.val_dataloader())
        assert dm.stats["val"].snapshot() == {"missing_text": 1}


def test_pipe_urls_and_brace_lists_read_like_local_paths(image_shards):
    urls = image_shards([3, 4])
    piped = [f"pipe:cat {u}" for u in urls]
    dm = ImageLabelDataModule(val_shards=piped, num_classes=3, image_size=8, batch_size=2, num_workers=0)
    keys = sorted(k.split(":", 1)[1].rsplit(":", 1)[-1] for b in dm.val_dataloader() for k in b["key"])
    assert keys == [f"{n:06d}" for n in range(7)]
    # pipe: shards have no index, so training needs an epoch length
    with pytest.raises(ValueError, match="samples_per_epoch"):
        ImageLabelDataModule(train_shards=piped, num_classes=3, image_size=8, num_workers=0).train_dataloader()
    dm = ImageLabelDataModule(train_shards=piped, num_classes=3, image_size=8, batch_size=2, num_workers=0,
                              samples_per_epoch=6)
    assert len(list(dm.train_dataloader())) == 3
