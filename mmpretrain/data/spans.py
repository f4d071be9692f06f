"""Random non-causal spans for semi-causal language modeling (METALM), drawn per packed sequence.

The rules, which the model's loss relies on (:func:`mmpretrain.models.metalm.semicausal_targets`):

- A span is a run of ``min_len`` to ``max_len`` consecutive tokens of **one document** (one ``doc_ids``
  value >= 0): never across a document boundary, never on padding (``doc_ids`` -1).
- Spans never overlap and never touch: the token right after a span is never a span token. So the token
  after each span is a decoder loss target (when it exists in the sequence and is not padding), predicted
  from the span's last position, as METALM's objective asks; the tokens inside spans never are.
- Lengths are drawn uniformly from ``[min_len, max_len]``; a span of the drawn length is placed at a
  start drawn uniformly among all the starts where it fits (inside one document, on free tokens, not
  touching another span).
- Spans are added while adding the drawn one brings the covered tokens closer to the target
  ``coverage x (non-padding tokens)``, i.e. while ``covered + length / 2 < target``; the first draw that
  would overshoot by more than it fills ends the sequence. Coverage is then about ``coverage`` on
  average (a bit under: the last span's length is left undrawn), within half a span per sequence. A
  length that fits nowhere is drawn again, at most ``max_misses`` times in a row: in sequences of short
  documents (shorter than ``min_len``) or crowded ones, coverage falls short and the lengths lean short
  rather than the rules bending.

Everything comes from the ``random.Random`` given (the data workers' seeded generator), so the spans of a
run are reproducible. ``SpanSampler`` pickles (it travels to the dataloader workers).
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Sequence
from itertools import accumulate
from typing import Any

import torch

__all__ = ["SpanSampler", "collate_spans", "document_runs"]


def document_runs(doc_ids: Sequence[int] | torch.Tensor) -> list[tuple[int, int]]:
    """``[start, end)`` of each run of equal document ids >= 0 (padding, id -1, is no run)."""
    ids = doc_ids.tolist() if isinstance(doc_ids, torch.Tensor) else list(doc_ids)
    runs = []
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or ids[i] != ids[start]:
            if ids[start] >= 0:
                runs.append((start, i))
            start = i
    return runs


class SpanSampler:
    """Draws the non-causal spans of one packed sequence (see the module docstring for the rules).

    Args:
        min_len: shortest span, in tokens (>= 1).
        max_len: longest span (>= ``min_len``).
        coverage: the fraction of the non-padding tokens to cover, in ``[0, 1)``; 0 draws no spans.
        max_misses: draws in a row of a length that fits nowhere before the sequence is left as it is.
    """

    def __init__(self, min_len: int = 64, max_len: int = 128, coverage: float = 0.25, max_misses: int = 8) -> None:
        if min_len < 1 or max_len < min_len:
            raise ValueError(f"spans: need 1 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")
        if not 0.0 <= coverage < 1.0:
            raise ValueError(f"spans: coverage must be in [0, 1), got {coverage}")
        if max_misses < 1:
            raise ValueError(f"spans: max_misses must be >= 1, got {max_misses}")
        self.min_len = int(min_len)
        self.max_len = int(max_len)
        self.coverage = float(coverage)
        self.max_misses = int(max_misses)

    @classmethod
    def from_config(cls, config: dict[str, Any] | SpanSampler | None, what: str = "data.spans") -> SpanSampler | None:
        """A sampler from a config mapping (``{"min_len": 64, "max_len": 128, "coverage": 0.25}``)."""
        if config is None or isinstance(config, SpanSampler):
            return config
        if not isinstance(config, dict):
            raise ValueError(f"{what}: expected a mapping with min_len, max_len, coverage; got {config!r}")
        unknown = set(config) - {"min_len", "max_len", "coverage", "max_misses"}
        if unknown:
            raise ValueError(f"{what}: unknown keys {sorted(unknown)}; use min_len, max_len, coverage, max_misses")
        try:
            return cls(**config)
        except ValueError as err:
            raise ValueError(f"{what}: {err}") from None

    def __repr__(self) -> str:
        return (f"SpanSampler(min_len={self.min_len}, max_len={self.max_len}, coverage={self.coverage}, "
                f"max_misses={self.max_misses})")

    def __call__(self, doc_ids: Sequence[int] | torch.Tensor, rng: random.Random) -> list[tuple[int, int]]:
        """``(start, length)`` of each span of a sequence with these document ids, sorted by start."""
        runs = [[a, b, False, False] for a, b in document_runs(doc_ids)]  # [start, end, span_before, span_after]
        valid = sum(b - a for a, b, _, _ in runs)
        target = self.coverage * valid
        spans: list[tuple[int, int]] = []
        covered = misses = 0
        while misses < self.max_misses:
            length = rng.randint(self.min_len, self.max_len)
            if covered + length / 2 >= target:
                break
            # starts s with the span inside [a, b), not right after a span (s > a if one ends at a - 1),
            # and its next token not a span token (s + length < b if one starts at b)
            ends = list(accumulate(max(0, (b - length - after) - (a + before) + 1) for a, b, before, after in runs))
            total = ends[-1] if ends else 0
            if total == 0:
                misses += 1
                continue
            misses = 0
            pick = rng.randrange(total)
            i = bisect_right(ends, pick)
            pick -= ends[i - 1] if i else 0
            a, b, before, after = runs[i]
            start = a + before + pick
            end = start + length
            pieces = []
            if start > a:
                pieces.append([a, start, before, True])
            if end < b:
                pieces.append([end, b, True, after])
            runs[i : i + 1] = pieces
            for run in runs:  # runs of neighbouring documents that now touch the span
                if run[1] == start:
                    run[3] = True
                if run[0] == end:
                    run[2] = True
            spans.append((start, length))
            covered += length
        spans.sort()
        return spans


def collate_spans(span_lists: Sequence[torch.Tensor], input_ids: torch.Tensor, pad_id: int,
                  multiple: int = 8) -> dict[str, torch.Tensor]:
    """The span layout of a batch: ``spans`` and the packed encoder inputs ``span_ids``.

    Args:
        span_lists: per sequence, a long tensor ``(n_i, 2)`` of ``(start, length)``.
        input_ids: the batch's tokens ``(B, T)``.
        pad_id: fills ``span_ids`` past each span's end (the encoder masks those positions).
        multiple: ``span_ids``' width is the longest span rounded up to this multiple.

    Returns:
        ``spans``: long ``(N, 3)``, one row ``(batch row, start, length)`` per span of the batch, in batch
        order; ``span_ids``: long ``(N, L)``, row ``i`` holding the tokens of span ``i`` then padding.
    """
    rows = [torch.cat([torch.full((len(s), 1), i, dtype=torch.long), s.view(-1, 2).long()], dim=1)
            for i, s in enumerate(span_lists)]
    spans = torch.cat(rows) if rows else torch.zeros(0, 3, dtype=torch.long)
    longest = int(spans[:, 2].max()) if len(spans) else 1
    width = -(-longest // multiple) * multiple
    span_ids = torch.full((len(spans), width), pad_id, dtype=torch.long)
    for i, (row, start, length) in enumerate(spans.tolist()):
        span_ids[i, :length] = input_ids[row, start : start + length]
    return {"spans": spans, "span_ids": span_ids}
