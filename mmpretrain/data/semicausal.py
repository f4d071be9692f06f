"""Image-caption batches for semi-causal (METALM) image-text pretraining: the image, then its caption's tokens.

Text batches with spans come from :class:`mmpretrain.data.text.TextDataModule` (its ``spans`` option); this
module holds the image-text side.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from mmpretrain.data.decode import SkipSample, decode_image, image_member, read_label, read_text
from mmpretrain.data.image_text import ImageTextDataModule, ImageTextDecoder, collate_image_text
from mmpretrain.data.tokenizer import Tokenizer

__all__ = ["CaptionDecoder", "ImageCaptionDataModule", "collate_image_caption"]


class ImageCaptionDataModule(ImageTextDataModule):
    """Images with their captions for captioning-style (prefix) language modeling.

    Batches are ``{"image": float (B, 3, H, W), "input_ids": long (B, context_length), "doc_ids": long
    (B, context_length), "key": list[str]}`` (plus ``"label"`` with ``label_key``, as in
    :class:`~mmpretrain.data.image_text.ImageTextDataModule`). Each caption row is ``[bos] caption [eos]``
    then ``pad_id``, cut to ``context_length`` keeping the end-of-text token; ``doc_ids`` is 0 on the
    caption's tokens and -1 on the padding, the convention of the text data module (no loss there).

    The model reads the image as a non-causal span before the caption: the beginning-of-text token is the
    fixed prompt that generation starts from, so it is an input and never a target; every later caption
    token (the end-of-text token included) is one.

    Args:
        context_length: tokens per caption row (``[bos]`` and ``[eos]`` included).
        **kwargs: everything else of :class:`~mmpretrain.data.image_text.ImageTextDataModule` (tokenizer,
            image size, transforms, caption key, shards, batching, workers ...).
    """

    def __init__(self, *, context_length: int = 64, **kwargs: Any) -> None:
        super().__init__(context_length=context_length, **kwargs)

    def process(self, split):
        mapper = super().process(split)
        base: ImageTextDecoder = mapper.decode
        mapper.decode = CaptionDecoder(base.transform, base.tokenizer, base.context_length, base.image_key,
                                       base.caption_key, base.label_key, base.class_to_index)
        return mapper

    def collate_fn(self):
        return collate_image_caption


class CaptionDecoder(ImageTextDecoder):
    """Raw sample -> dict(image, input_ids, doc_ids, key[, label]); picklable, runs in the workers."""

    def __call__(self, sample: dict, rng: random.Random) -> dict[str, Any]:
        caption = read_text(sample, self.caption_key, rng, what="caption")
        image = self.transform(decode_image(image_member(sample, self.image_key)))
        tok: Tokenizer = self.tokenizer
        ids = [tok.bos_id, *tok.encode(caption)][: self.context_length - 1] + [tok.eos_id]
        n = len(ids)
        input_ids = torch.full((self.context_length,), tok.pad_id, dtype=torch.long)
        input_ids[:n] = torch.tensor(ids, dtype=torch.long)
        doc_ids = torch.full((self.context_length,), -1, dtype=torch.long)
        doc_ids[:n] = 0
        item = {"image": image, "input_ids": input_ids, "doc_ids": doc_ids,
                "key": f"{sample['__url__']}:{sample['__key__']}"}
        if self.label_key is not None:
            try:
                item["label"] = read_label(sample, self.label_key, self.class_to_index)
            except SkipSample:
                item["label"] = -1
        return item


collate_image_caption = collate_image_text  # the same batch, with doc_ids stacked like the other tensors
