"""The span sampler's statistics and rules, the batch layout, and span sampling inside the text data module."""

from __future__ import annotations

import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmpretrain.data.semicausal import ImageCaptionDataModule
from mmpretrain.data.spans import SpanSampler, collate_spans, document_runs
from mmpretrain.data.text import TextDataModule
from mmpretrain.data.writer import ShardWriter
from mmpretrain.models.metalm import IGNORE_INDEX, semicausal_targets, span_token_mask


def random_doc_ids(rng: random.Random, length: int, shortest: int, longest: int, pad: int = 0) -> list[int]:
    ids: list[int] = []
    doc = 0
    while len(ids) < length - pad:
        ids += [doc] * rng.randint(shortest, longest)
        doc += 1
    return ids[: length - pad] + [-1] * pad


def check_rules(spans: list[tuple[int, int]], doc_ids: list[int], sampler: SpanSampler) -> None:
    """Lengths in range, inside one document, off padding, sorted, never overlapping or touching."""
    for start, length in spans:
        assert sampler.min_len <= length <= sampler.max_len
        docs = doc_ids[start : start + length]
        assert len(docs) == length and docs[0] >= 0 and len(set(docs)) == 1, (start, length)
    for (s0, l0), (s1, _) in zip(spans, spans[1:]):
        assert s0 + l0 < s1, spans  # at least one token between consecutive spans


def test_statistics_over_many_sequences():
    """2000 sequences of 2048 tokens (documents of 100-1500 tokens, some padding): the paper's 64-128 at 25%."""
    sampler = SpanSampler(64, 128, 0.25)
    coverages, misses, lengths, starts = [], [], [], []
    for seed in range(2000):
        rng = random.Random(seed)
        doc_ids = random_doc_ids(rng, 2048, 100, 1500, pad=rng.choice([0, 0, 300]))
        spans = sampler(doc_ids, rng)
        check_rules(spans, doc_ids, sampler)
        valid = sum(d >= 0 for d in doc_ids)
        coverages.append(sum(n for _, n in spans) / valid)
        misses.append(sum(n for _, n in spans) - 0.25 * valid)
        lengths += [n for _, n in spans]
        starts += [s for s, _ in spans]
    assert abs(statistics.mean(coverages) - 0.25) < 0.01
    assert statistics.pstdev(coverages) < 0.03
    assert max(abs(m) for m in misses) <= 64  # within half the longest span of the target in every sequence
    # uniform lengths: mean 96, every length drawn, flat histogram (each of 65 values ~1.5% of draws)
    assert abs(statistics.mean(lengths) - 96) < 1.5
    assert set(lengths) == set(range(64, 129))
    counts = [lengths.count(n) / len(lengths) for n in range(64, 129)]
    assert max(counts) < 2.2 / 65 and min(counts) > 0.4 / 65
    # starts spread over the whole sequence
    assert min(starts) < 50 and max(starts) > 2048 - 300 - 128 - 50


def test_short_documents_hold_no_span_and_coverage_falls_short():
    sampler = SpanSampler(16, 32, 0.5)
    rng = random.Random(0)
    for _ in range(200):
        doc_ids = random_doc_ids(rng, 512, 5, 40)
        spans = sampler(doc_ids, rng)
        check_rules(spans, doc_ids, sampler)
    # documents of 10 tokens: nothing fits
    assert sampler([i // 10 for i in range(200)], rng) == []


def test_adjacent_documents_never_get_touching_spans():
    """Two documents of exactly one span each: both spans would touch at the boundary; only one is drawn."""
    sampler = SpanSampler(8, 8, 0.99)
    doc_ids = [0] * 8 + [1] * 8
    for seed in range(50):
        spans = sampler(doc_ids, random.Random(seed))
        check_rules(spans, doc_ids, sampler)
        assert len(spans) == 1


def test_same_generator_state_gives_the_same_spans():
    sampler = SpanSampler(8, 16, 0.3)
    doc_ids = random_doc_ids(random.Random(1), 256, 20, 100)
    assert sampler(doc_ids, random.Random(7)) == sampler(doc_ids, random.Random(7))
    assert sampler(doc_ids, random.Random(7)) != sampler(doc_ids, random.Random(8))
    assert sampler(doc_ids, random.Random(7)) and SpanSampler(8, 16, 0.0)(doc_ids, random.Random(7)) == []


def test_document_runs_skip_padding():
    assert document_runs([0, 0, 1, 1, 1, 2, -1, -1]) == [(0, 2), (2, 5), (5, 6)]
    assert document_runs(torch.tensor([-1, -1])) == []


def test_configuration_errors_name_the_field():
    with pytest.raises(ValueError, match="data.spans: unknown keys"):
        SpanSampler.from_config({"min": 3})
    with pytest.raises(ValueError, match="data.spans: .*min_len <= max_len"):
        SpanSampler.from_config({"min_len": 9, "max_len": 3})
    with pytest.raises(ValueError, match="coverage"):
        SpanSampler(coverage=1.0)
    assert SpanSampler.from_config(None) is None


def test_collated_layout_and_the_loss_mask():
    """spans rows (row, start, length), span_ids packed; span tokens are never targets, the token after each span is."""
    input_ids = torch.arange(100, 140).view(2, 20)
    per_row = [torch.tensor([[2, 5], [10, 3]]), torch.tensor([[15, 4]])]
    batch = collate_spans(per_row, input_ids, pad_id=-7, multiple=8)
    assert batch["spans"].tolist() == [[0, 2, 5], [0, 10, 3], [1, 15, 4]]
    assert batch["span_ids"].shape == (3, 8)
    assert batch["span_ids"][0].tolist() == [102, 103, 104, 105, 106, -7, -7, -7]
    assert batch["span_ids"][2, :4].tolist() == [135, 136, 137, 138]
    inside = span_token_mask(batch["spans"], 2, 20)
    assert inside.sum() == 12 and inside[0, 2:7].all() and inside[1, 15:19].all() and not inside[1, 19]
    targets = semicausal_targets(input_ids, batch["spans"])
    # column t holds the target of position t, token t + 1
    for row, start, length in batch["spans"].tolist():
        assert (targets[row, start - 1 : start + length - 1] == IGNORE_INDEX).all()  # span tokens: no target
        assert targets[row, start + length - 1] == input_ids[row, start + length]  # the token after: a target
    assert targets[1, 19] == IGNORE_INDEX  # the last column predicts nothing
    assert (targets != IGNORE_INDEX).sum() == 2 * 19 - 12
    empty = collate_spans([torch.zeros(0, 2, dtype=torch.long)], input_ids[:1], pad_id=0)
    assert empty["spans"].shape == (0, 3) and empty["span_ids"].shape == (0, 8)


def write_docs(directory: Path, count: int, prefix: str = "train") -> str:
    rng = random.Random(0)
    with ShardWriter(directory, prefix=prefix, shard_size=20, metadata={"kind": "text"}) as w:
        for i in range(count):
            words = " ".join(f"w{rng.randint(0, 50)}" for _ in range(rng.randint(20, 120)))
            w.write({"__key__": f"{i:05d}", "txt": words})
    return str(directory / f"{prefix}-*.tar")


def test_text_module_draws_spans_in_the_workers(tmp_path):
    pattern = write_docs(tmp_path, 60)
    kwargs = dict(train_shards=pattern, val_shards=pattern, tokenizer="demo", seq_len=64, batch_size=4,
                  mode="epoch", spans={"min_len": 4, "max_len": 12, "coverage": 0.25})
    dm = TextDataModule(num_workers=2, worker_start_method="fork", **kwargs)  # fork: quick to start
    sampler = dm.span_sampler
    covered = total = 0
    for b in dm.train_dataloader():
        spans, span_ids, ids = b["spans"], b["span_ids"], b["input_ids"]
        assert spans.shape[1] == 3 and span_ids.shape[0] == spans.shape[0] and span_ids.shape[1] % 8 == 0
        for i, (row, start, length) in enumerate(spans.tolist()):
            assert span_ids[i, :length].tolist() == ids[row, start : start + length].tolist()
        for row in range(ids.shape[0]):
            mine = [(s, n) for r, s, n in spans.tolist() if r == row]
            check_rules(mine, b["doc_ids"][row].tolist(), sampler)
        covered += int(spans[:, 2].sum())
        total += ids.numel()
    assert 0.17 < covered / total < 0.3


def test_span_draws_are_reproducible_and_leave_the_documents_alone(tmp_path):
    pattern = write_docs(tmp_path, 60)
    kwargs = dict(train_shards=pattern, val_shards=pattern, tokenizer="demo", seq_len=64, batch_size=4,
                  mode="epoch", num_workers=0)
    dm = TextDataModule(spans={"min_len": 4, "max_len": 12, "coverage": 0.25}, **kwargs)
    # validation: the same spans every time, padding (doc_ids -1) never in a span
    first, second = list(dm.val_dataloader()), list(dm.val_dataloader())
    assert all(torch.equal(a["spans"], b["spans"]) for a, b in zip(first, second))
    for b in first:
        assert not (span_token_mask(b["spans"], *b["input_ids"].shape) & (b["doc_ids"] < 0)).any()
    assert (first[-1]["doc_ids"] < 0).any()  # the padded tail was there to check
    # and in another process (a fresh interpreter: nothing hashed from its addresses may seed the spans)
    code = ("import sys, torch; from mmpretrain.data.text import TextDataModule; "
            f"dm = TextDataModule(val_shards={pattern!r}, tokenizer='demo', seq_len=64, batch_size=4, num_workers=0, "
            "spans={'min_len': 4, 'max_len': 12, 'coverage': 0.25}); "
            "print(torch.cat([b['spans'] for b in dm.val_dataloader()]).tolist())")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str(torch.cat([b["spans"] for b in first]).tolist())
    # the documents are the same with and without spans (the spans' generator draws nothing from the stream's)
    batches = list(dm.train_dataloader())
    plain_batches = list(TextDataModule(**kwargs).train_dataloader())
    assert len(batches) == len(plain_batches)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, plain_batches))
    assert "spans" not in plain_batches[0] and "spans" in batches[0]


def test_image_caption_batches(image_shards):
    urls = image_shards([8])
    dm = ImageCaptionDataModule(train_shards=urls, tokenizer="demo", context_length=8, image_size=16, batch_size=4,
                                num_workers=0)
    b = next(iter(dm.train_dataloader()))
    tok = dm.tokenizer
    assert b["image"].shape == (4, 3, 16, 16) and b["input_ids"].shape == b["doc_ids"].shape == (4, 8)
    for ids, docs in zip(b["input_ids"].tolist(), b["doc_ids"].tolist()):
        n = docs.count(0)
        assert docs == [0] * n + [-1] * (8 - n)
        assert ids[0] == tok.bos_id and ids[n - 1] == tok.eos_id and ids[n:] == [tok.pad_id] * (8 - n)
        assert "sample" in tok.decode(ids[:n])
