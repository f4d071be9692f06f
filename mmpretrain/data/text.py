"""Text documents (``txt``, or a field of the ``json`` member), tokenized and packed into fixed-length sequences."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from itertools import islice
from typing import Any

import torch

from mmpretrain.data.datamodule import ShardDataModule, Split
from mmpretrain.data.decode import read_text
from mmpretrain.data.shards import iter_shard_samples
from mmpretrain.data.spans import SpanSampler, collate_spans
from mmpretrain.data.stats import DataStats
from mmpretrain.data.stream import map_samples
from mmpretrain.data.tokenizer import Tokenizer

log = logging.getLogger("mmpretrain.data")


class TextDataModule(ShardDataModule):
    """Documents tokenized in the workers and packed end to end into sequences of ``seq_len`` tokens.

    Each document is followed by the end-of-text token; a document may continue into the next
    sequence. Batches are ``{"input_ids": long (B, seq_len), "doc_ids": long (B, seq_len), "key": list[str]}``
    where ``doc_ids`` numbers the documents within each sequence (0, 0, 0, 1, 1 ...), so models can keep
    attention or spans inside one document. Evaluation streams also yield each worker's last partial
    sequence, padded, with ``doc_ids`` -1 on the padding (exclude those positions from losses).

    With ``spans`` set (semi-causal language modeling, METALM), the workers also draw random non-causal
    spans in each sequence (:class:`~mmpretrain.data.spans.SpanSampler`: lengths uniform in
    ``[min_len, max_len]``, about ``coverage`` of the tokens, inside one document, never touching) from
    their seeded generator, and batches carry the span layout as well:
    ``"spans"``: long ``(N, 3)``, a row ``(batch row, start, length)`` per span of the batch; ``"span_ids"``:
    long ``(N, L)``, each span's tokens packed for the encoder, padded with the tokenizer's ``pad_id`` to
    the longest span (rounded up to a multiple of 8). Validation draws its spans the same way from a fixed
    seed, so every validation sees the same spans.

    An epoch in ``epoch`` mode is measured in sequences, which the shards do not record: unless
    ``samples_per_epoch`` is given, it is estimated from the document counts and the tokens per document
    of up to ``estimate_docs`` documents of the first shard (logged).

    Args:
        tokenizer: a local tokenizer directory, or ``"demo"``.
        seq_len: tokens per packed sequence.
        text_key: ``"txt"`` or a JSON field (``"json:text"``).
        add_bos: start every document with the beginning-of-text token.
        estimate_docs: documents tokenized to estimate the epoch length.
        spans: draw non-causal spans: ``{"min_len": 64, "max_len": 128, "coverage": 0.25}`` (any of the keys;
            these are the defaults); None for plain causal language-model batches.
        **kwargs: shard, batching and worker options of :class:`ShardDataModule`.
    """

    def __init__(
        self,
        *,
        tokenizer: str = "demo",
        seq_len: int = 2048,
        text_key: str = "txt",
        add_bos: bool = False,
        estimate_docs: int = 200,
        spans: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("shuffle_buffer", 100)
        super().__init__(**kwargs)
        # into checkpoints (export needs the image size and normalisation); what is linked into the
        # model stays out: Lightning refuses hparams that differ between model and data
        self.save_hyperparameters()
        if seq_len < 2:
            raise ValueError(f"data.seq_len must be at least 2, got {seq_len}")
        self.tokenizer_path = tokenizer
        self.tokenizer = Tokenizer.from_dir(tokenizer)
        self.seq_len = seq_len
        self.text_key = text_key
        self.add_bos = add_bos
        self.estimate_docs = estimate_docs
        self.span_sampler = SpanSampler.from_config(spans, what="data.spans")

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def process(self, split: Split):
        return TextPacker(self.tokenizer, self.seq_len, self.text_key, self.add_bos,
                          self.stats.setdefault(split, DataStats(self._start_method)), self.strict, split,
                          spans=self.span_sampler)

    def collate_fn(self):
        return collate_text if self.span_sampler is None else SpanCollate(self.tokenizer.pad_id)

    def stream(self, split: Split):
        if split == "train" and self.samples_per_epoch is None:
            self.samples_per_epoch = self.estimate_sequences()
        return super().stream(split)

    def item_counts(self, split: Split, counts: list[int | None]) -> list[int | None]:
        # a shard's document count says nothing exact about its sequences: eval streams have no length
        return [None] * len(counts)

    def estimate_sequences(self) -> int:
        """Packed sequences in one pass over the training shards, estimated from a sample of documents."""
        sources = self.sources("train")
        docs = sum(c for s in sources for c in s.counts if c is not None)
        if any(c is None for s in sources for c in s.counts):
            raise ValueError("data.samples_per_epoch: the training shards' document counts are unknown; set it")
        first = sources[0].urls[0]
        lengths = []
        for sample in islice(iter_shard_samples(first), self.estimate_docs):
            try:
                lengths.append(len(self.tokenizer.encode(read_text(sample, self.text_key))) + 1 + self.add_bos)
            except Exception:  # bad documents are counted in the real pass
                continue
        if not lengths:
            raise ValueError(f"data.train_shards: no readable '{self.text_key}' document in {first}")
        tokens_per_doc = sum(lengths) / len(lengths)
        sequences = int(docs * tokens_per_doc // self.seq_len)
        log.info("train: about %d sequences of %d tokens per epoch (%d documents, %.1f tokens each)",
                 sequences, self.seq_len, docs, tokens_per_doc)
        return max(sequences, 1)


class TextPacker:
    """Raw document samples -> packed sequences (dicts of input_ids, doc_ids, key[, spans]); picklable.

    With a span sampler, each sequence also gets ``"spans"``: long ``(n, 2)`` rows of ``(start, length)``,
    drawn from a generator seeded by the worker's (without consuming its draws: the documents and their
    order are the same with and without spans).
    """

    def __init__(self, tokenizer: Tokenizer, seq_len: int, text_key: str, add_bos: bool, stats: DataStats,
                 strict: bool, name: str, spans: SpanSampler | None = None) -> None:
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.text_key = text_key
        self.add_bos = add_bos
        self.stats = stats
        self.strict = strict
        self.name = name
        self.pad_tail = name != "train"
        self.spans = spans

    def _item(self, ids: list[int], doc_ids: list[int], key: str, rng: random.Random | None) -> dict[str, Any]:
        item = {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "doc_ids": torch.tensor(doc_ids, dtype=torch.long),
            "key": key,
        }
        if self.spans is not None and rng is not None:
            item["spans"] = torch.tensor(self.spans(doc_ids, rng), dtype=torch.long).view(-1, 2)
        return item

    def tokenize(self, sample: dict) -> tuple[list[int], str]:
        ids = self.tokenizer.encode(read_text(sample, self.text_key))
        if self.add_bos:
            ids = [self.tokenizer.bos_id, *ids]
        return [*ids, self.tokenizer.eos_id], f"{sample['__url__']}:{sample['__key__']}"

    def __call__(self, samples: Iterator[dict], rng: random.Random) -> Iterator[dict[str, Any]]:
        ids: list[int] = []
        docs: list[int] = []
        keys: list[tuple[int, str]] = []  # (start offset in the buffer, key) of each document
        documents = map_samples(samples, self.tokenize, self.stats, self.strict, self.name)
        # the spans' own generator: a pure function of the worker's generator state, drawing nothing from it
        # (the state's integers only: before Python 3.12 hash(None), also in the state, changes between runs)
        span_rng = random.Random(hash(rng.getstate()[1])) if self.spans is not None else None
        for doc, (tokens, key) in enumerate(documents):
            keys.append((len(ids), key))
            ids.extend(tokens)
            docs.extend([doc] * len(tokens))
            while len(ids) >= self.seq_len:
                first_doc = docs[0]
                yield self._item(ids[: self.seq_len], [d - first_doc for d in docs[: self.seq_len]], keys[0][1],
                                 span_rng)
                ids, docs = ids[self.seq_len :], docs[self.seq_len :]
                keys = [(offset - self.seq_len, k) for offset, k in keys]
                while len(keys) > 1 and keys[1][0] <= 0:  # keep the document the next sequence starts in
                    keys.pop(0)
        if ids and self.pad_tail:
            # evaluation sees every token: the last partial sequence is padded, its padding marked doc_id -1
            pad = self.seq_len - len(ids)
            first_doc = docs[0]
            yield self._item(ids + [self.tokenizer.pad_id] * pad, [d - first_doc for d in docs] + [-1] * pad,
                             keys[0][1], span_rng)


def collate_text(items: list[dict]) -> dict[str, Any]:
    return {
        "input_ids": torch.stack([it["input_ids"] for it in items]),
        "doc_ids": torch.stack([it["doc_ids"] for it in items]),
        "key": [it["key"] for it in items],
    }


class SpanCollate:
    """Collates packed sequences with spans: :func:`collate_text` plus the batch's span layout
    (:func:`~mmpretrain.data.spans.collate_spans`); picklable."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: list[dict]) -> dict[str, Any]:
        batch = collate_text(items)
        batch.update(collate_spans([it["spans"] for it in items], batch["input_ids"], self.pad_id))
        return batch
